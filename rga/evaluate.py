"""Evaluate a checkpoint: `python -m rga.evaluate --checkpoint RUN_FOLDER_OR_FILE [flags]`.

The network is rebuilt from the checkpoint alone (rga.checkpoint.load_model): a run folder or
checkpoint of rga.train (either checkpoint format), or a file of the public RGA training script
(``state_dict``, optionally ``module.``-prefixed). The dataset and the evaluation options default
to the checkpoint's run; flags override them, and the command says so. Architecture flags
(--model, --height, --stages, the RGA options, ...) are refused when they contradict a checkpoint
that records its architecture; for public files they fill in what the weights cannot say.
Prints CMC R1/R5/R10/R20, mAP and mINP, and writes them as JSON with --output.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import config as C
from . import value_parsers as P
from .checkpoint import load_model
from .cli import add_field_arguments, check_fused_backend, given_flags, load_dataset
from .data.check import check_dataset, unmatched_note
from .engine import EvalSettings, evaluate_model, format_metrics
from .errors import UsageError, run_cli
from .fileio import write_json
from .runfolder import check_output_file
from .runtime import place_model, setup_runtime

DATA_FIELDS = ("dataset", "data_root", "dataset_opt")
EVAL_FIELDS = ("eval_feat", "metric", "rerank", "flip_test", "test_batch_size")
RUNTIME_FIELDS = ("workers", "device", "amp", "channels_last", "threads", "progress")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rga.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a run folder of rga.train (its newest checkpoint), a checkpoint file of rga.train, or a "
                        "file of the public RGA training script")
    add_field_arguments(p, DATA_FIELDS, title="data (default: the checkpoint's)")
    g = p.add_argument_group("architecture (default: the checkpoint's; refused if they contradict it; for public "
                             "files: what the weights cannot say, e.g. --model rga_cs, --height/--width)")
    g.add_argument("--model", metavar="NAME", default=argparse.SUPPRESS, help="a row name, as in rga.train")
    add_field_arguments(g, C.ARCH_FIELDS)
    add_field_arguments(p, ["fused"], title="speed")
    add_field_arguments(p, EVAL_FIELDS, title="evaluation (default: the checkpoint's run's)")
    # the short names this command has always had
    p.add_argument("--feat", dest="eval_feat", choices=("bn", "pool"), default=argparse.SUPPRESS,
                   help="same as --eval-feat")
    p.add_argument("--flip", dest="flip_test", action="store_true", default=argparse.SUPPRESS,
                   help="same as --flip-test")
    p.add_argument("--batch-size", dest="test_batch_size", default=argparse.SUPPRESS, help="same as --test-batch-size")
    add_field_arguments(p, RUNTIME_FIELDS, title="device")
    p.add_argument("--output", metavar="JSON", help="also write the metrics to this JSON file")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --output that is not rga.evaluate's metrics (a checkpoint, another file)")
    return p


def plan(ns: argparse.Namespace):
    """(ModelCheckpoint info, model, RunConfig for data/eval/runtime, notes) from the parsed flags."""
    hint_names = set(C.ARCH_FIELDS)
    hints = C.parse_values(given_flags(ns, hint_names), "command line")
    hints = {k: v for k, v in hints.items() if k in hint_names}
    fused = P.fused_arg(ns.fused) if hasattr(ns, "fused") else None
    model, info = load_model(ns.checkpoint, fused=fused, hints=hints, with_info=True)
    base = info.config if info.config is not None else C.RunConfig()
    saved = base.flat()
    layer = {k: saved[k] for k in DATA_FIELDS + EVAL_FIELDS}
    overrides = C.parse_values(given_flags(ns, set(DATA_FIELDS + EVAL_FIELDS + RUNTIME_FIELDS)), "command line")
    if overrides.get("dataset", saved["dataset"]) != saved["dataset"] and "dataset_opt" not in overrides:
        layer["dataset_opt"] = type(saved["dataset_opt"])()  # another dataset: not the checkpoint's options
    notes = []
    if info.config is not None:
        for k in DATA_FIELDS + EVAL_FIELDS:
            if k in overrides and overrides[k] != saved[k]:
                notes.append(f"{k}: {overrides[k]!r} instead of the checkpoint run's {saved[k]!r}")
    elif "dataset" not in overrides:
        raise UsageError(f"{info.path} ({info.kind}) does not say which dataset it was trained on: pass --dataset "
                         "(and --data-root)")
    cfg = C.resolve([("checkpoint", {**layer, **{k: v for k, v in overrides.items()}})])
    return info, model, cfg, notes


def evaluate(ns: argparse.Namespace) -> dict:
    if ns.output:
        check_output_file(ns.output, "metrics", force=ns.force)  # before the work, not after printing the metrics
    if getattr(ns, "threads", 0):
        torch.set_num_threads(P.nonneg_int(ns.threads))
    info, model, cfg, notes = plan(ns)
    r, e = cfg.run, cfg.eval
    rt = setup_runtime(r.device, "auto", amp=r.amp, channels_last=r.channels_last)
    check_fused_backend(model.fused, rt.device.type == "cuda")
    dataset = load_dataset(cfg.data)
    report = check_dataset(dataset, ("query", "gallery"))  # all problems in one message, before any feature
    if unmatched_note(report, dataset):
        print(unmatched_note(report, dataset), flush=True)
    place_model(model, rt)
    m = info.model
    for note in notes:
        print(f"note: overriding the checkpoint's {note}", flush=True)
    print(f"evaluating {info.path} ({info.kind}, epoch {info.epoch if info.epoch is not None else '?'}) on "
          f"{cfg.data.dataset}: {m.label()} / {m.backbone} {m.height}x{m.width}, stages "
          f"{','.join(map(str, m.stages))}, feat={e.eval_feat}, metric={e.metric}, rerank={e.rerank}, "
          f"flip={e.flip_test}, device {rt.device}", flush=True)
    metrics = evaluate_model(model, dataset, EvalSettings.of(cfg, m.height, m.width), rt)
    metrics = {"checkpoint": str(info.path), "checkpoint_kind": info.kind, "epoch": info.epoch,
               "dataset": cfg.data.dataset, "model": m.label(), **metrics}
    print(format_metrics(metrics))
    print("\n".join(f"  {k:<5} {100 * metrics[k]:6.2f}%" for k in ("R1", "R5", "R10", "R20", "mAP", "mINP")))
    if ns.output:
        write_json(metrics, ns.output)
        print(f"wrote {ns.output}")
        try:  # the CMC curve beside the JSON, when matplotlib (the [vis] extra) is installed
            from .vis.ranks import plot_cmc
            cmc_png = plot_cmc(metrics["cmc"], Path(ns.output).with_name("cmc.png"), label=m.label())
            print(f"wrote {cmc_png}")
        except ImportError:
            print('note: no cmc.png (needs matplotlib: pip install -e ".[vis]")')
    return metrics


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    return run_cli("rga.evaluate", evaluate, ns)


if __name__ == "__main__":
    sys.exit(main())
