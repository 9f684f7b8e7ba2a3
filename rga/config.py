"""Config files and presets for the command lines.

Precedence, lowest first: the parser's defaults (the paper's recipe) < --preset < --config file <
flags given on the command line. A config file is JSON (or YAML when PyYAML is installed) holding
a flat object whose keys are flag names, with dashes or underscores: {"epochs": 120, "batch-ids": 8}.
An unknown key or a value outside a flag's choices is an error, never silently ignored.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PRESETS = {
    # The paper's recipe: exactly the parser defaults.
    "paper": {},
    # The README quick start: small backbone, small images, few epochs, on the synthetic data.
    # Sized to finish in about 6 minutes on an idle 2-core CPU (well under 15). Random weights (no
    # ImageNet weights offline) and ~500 steps: no warm-up, no random erasing, a translation
    # scaled to the 64x32 input, so that the short run learns fast.
    "quick": {
        "dataset": "synthetic",
        "arch": "rga_sc",
        "backbone": "resnet18",
        "height": 64,
        "width": 32,
        "batch_ids": 8,
        "batch_instances": 4,
        "epochs": 14,
        "pad": 4,
        "erasing_prob": 0.0,
        "warmup_epochs": 0,
        "milestones": [10],
        "lr": 8e-4,
        "eval_every": 0,
        "workers": 0,
        "threads": 0,
        "test_batch_size": 64,
        "output_dir": "runs/quick",
    },
}


class ConfigError(ValueError):
    pass


def load_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ConfigError(f"{path} is YAML but PyYAML is not installed (pip install pyyaml), "
                              "or write the config as JSON") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"could not parse {path}: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"could not parse {path} as JSON: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a flat object of flag names to values")
    return data


def _normalise(parser: argparse.ArgumentParser, values: dict, source: str) -> dict:
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}
    out = {}
    for key, value in values.items():
        dest = key.lstrip("-").replace("-", "_")
        if dest in ("config", "preset"):
            raise ConfigError(f"{source}: '{key}' cannot be set inside a config")
        if dest not in actions:
            raise ConfigError(f"{source}: unknown option '{key}' (not a flag of this command)")
        action = actions[dest]
        if action.choices is not None and value is not None:
            vals = value if isinstance(value, list) else [value]
            bad = [v for v in vals if v not in action.choices]
            if bad:
                raise ConfigError(f"{source}: '{key}' must be one of {sorted(map(str, action.choices))}, got {bad}")
        if action.type is not None and value is not None and callable(action.type) and not isinstance(value, bool):
            try:
                value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{source}: bad value for '{key}': {value!r} ({e})") from e
        out[dest] = value
    return out


def parse_args_with_config(parser: argparse.ArgumentParser, argv=None, presets=PRESETS) -> argparse.Namespace:
    """Parse argv, filling defaults from --preset and --config first (flags win)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    defaults = {}
    try:
        if known.preset is not None:
            if known.preset not in presets:
                raise ConfigError(f"unknown preset '{known.preset}'; choose from {sorted(presets)}")
            defaults.update(_normalise(parser, presets[known.preset], f"preset '{known.preset}'"))
        if known.config is not None:
            defaults.update(_normalise(parser, load_config_file(known.config), known.config))
    except ConfigError as e:
        parser.error(str(e))
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def add_config_arguments(parser: argparse.ArgumentParser, presets=PRESETS) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="JSON (or YAML) file of flag values; flags on the command line override it")
    if not presets:
        return
    parser.add_argument("--preset", choices=sorted(presets),
                        help="named set of flag values applied before --config: "
                             + "; ".join(f"{k}: {v if v else 'the paper recipe (the defaults)'}"
                                         for k, v in presets.items()))


def parse_kv(text: str):
    """'key=value' -> (key, value); the value is read as JSON when it can be (numbers, true, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    return key.strip(), value
