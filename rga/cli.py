"""Command-line plumbing shared by rga.train and rga.evaluate: flags generated from the config
dataclasses (rga.config), preset / config-file / flag layering, and the checks and loaders both
commands need. Neither command imports the other."""
from __future__ import annotations

import argparse
import dataclasses

from . import config as C
from . import value_parsers as P
from .presets import PRESETS
from .registry import model_rows
from .errors import UsageError  # a bad flag, flag combination or input: exit code 2 with the message


def flag_of(name: str) -> str:
    return C.FIELDS[name][1].metadata["flag"] or "--" + name.replace("_", "-")


def _default_text(name: str) -> str:
    f = C.FIELDS[name][1]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default)) or "[]"
    if isinstance(default, dict):
        return "{}"
    return "none" if default is None else str(default)


def add_field_arguments(parser: argparse.ArgumentParser, names, *, title: str | None = None,
                        help_suffix: str = "") -> None:
    """One flag per config field in `names`, spelled --field-name (or the field's own flag). Flags
    left out of the command line are absent from the namespace (default SUPPRESS), so the layers
    below them (preset, config file, checkpoint) keep their values."""
    group = parser.add_argument_group(title) if title else parser
    for name in names:
        f = C.FIELDS[name][1]
        parse = f.metadata["parse"]
        kw = dict(dest=name, default=argparse.SUPPRESS, metavar=f.metadata["metavar"],
                  help=f"{f.metadata['help']} (default: {_default_text(name)}){help_suffix}")
        if parse is P.boolean:
            kw.pop("metavar")
            kw["action"] = argparse.BooleanOptionalAction
        elif parse is P.kv_dict:
            kw["action"] = "append"
        elif parse is P.int_list:
            kw["nargs"] = "*"
        elif parse is P.fused_arg:
            kw.update(nargs="?", const=True)
        elif getattr(parse, "choices", None):
            kw.update(choices=parse.choices, metavar=None)
        group.add_argument(flag_of(name), **kw)


def flag_type(parse):
    """An argparse ``type=`` from a value parser of rga.config: its ValueError becomes argparse's
    error, with the parser's own reason (e.g. ``--top: must be >= 1, got 0``)."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def section_fields(*sections: str, exclude=()) -> list:
    return [n for n, (sec, _) in C.FIELDS.items() if sec in sections and n not in exclude]


def add_layer_arguments(parser: argparse.ArgumentParser, *, presets: bool = True, model: bool = True) -> None:
    """--config FILE, --preset NAME (run presets) and --model NAME (a row of the paper's tables)."""
    parser.add_argument("--config", metavar="FILE",
                        help="JSON (or YAML) file of option values, flat or by section; flags override it")
    if presets:
        parser.add_argument("--preset", choices=sorted(PRESETS),
                            help="named set of values applied before --config: paper (the defaults: the paper's "
                                 "recipe), quick (the README's CPU smoke test)")
    if model:
        names = list(model_rows())
        parser.add_argument("--model", metavar="NAME", default=argparse.SUPPRESS,
                            help="the network, by the paper's row names: sets --variant and every RGA option. "
                                 f"One of: {', '.join(names)} (default: rga_sc)")
        parser.add_argument("--arch", dest="model", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name


def given_flags(ns: argparse.Namespace, names) -> dict:
    """The command line's values of the fields in `names` (and --model) as {'--flag': value}, so
    that error messages name the flag."""
    out = {}
    for name, value in vars(ns).items():
        if name == "model":
            out["--model"] = value
        elif name in names:
            out[flag_of(name)] = value
    return out


def layers_from_args(ns: argparse.Namespace, cli_names) -> list:
    """[(source, values)] from --preset, --config and the flags in `cli_names`, lowest first."""
    layers = []
    preset = getattr(ns, "preset", None)
    if preset is not None:
        layers.append((f"preset '{preset}'", PRESETS[preset]))
    if getattr(ns, "config", None) is not None:
        layers.append((ns.config, C.load_config_file(ns.config)))
    layers.append(("command line", given_flags(ns, cli_names)))
    return layers


def check_fused_backend(fused, on_gpu: bool) -> None:
    """A --fused-rga backend name (or, for --fused-rga on/auto, an RGA_KERNELS_BACKEND value) that
    this machine cannot run is a usage error, caught up front rather than at the first forward."""
    import os

    env = os.environ.get("RGA_KERNELS_BACKEND", "auto")
    if isinstance(fused, str) and fused != "auto":
        name, source = fused, f"--fused-rga {fused}"
    elif fused and env != "auto":
        name, source = env, f"RGA_KERNELS_BACKEND={env} (environment variable, used by the fused RGA path)"
    else:
        return
    import rga_kernels

    device = "cuda" if on_gpu else "cpu"
    status = rga_kernels.backend_status(device)
    if name not in status:
        choices = "on/off/auto" if name == fused else "auto"
        raise UsageError(f"{source}: unknown backend; expected {choices} or one of {list(status)}")
    ok, why = status[name]
    if not ok:
        raise UsageError(f"{source} cannot run on {device} here: {why}; available: "
                         f"{rga_kernels.available_backends(device)}")


def load_dataset(data: C.DataConfig):
    from .data import build_dataset
    try:
        return build_dataset(data.dataset, data.data_root, **dict(data.dataset_opt))
    except (KeyError, ValueError, FileNotFoundError, TypeError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UsageError(f"could not load dataset '{data.dataset}' from '{data.data_root}': {msg}") from e


