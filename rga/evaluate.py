"""Evaluate a checkpoint: `python -m rga.evaluate --checkpoint runs/x/checkpoint_ep0600.pth [flags]`.

The model (arch, backbone, input size, number of classes) and the dataset are read from the
checkpoint's saved training config unless given as flags. Prints CMC R1/R5/R10/R20, mAP and mINP,
and writes them as JSON with --output.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .checkpoint import CheckpointError, extract_model_state, load_checkpoint, resolve_checkpoint
from .config import add_config_arguments, parse_args_with_config
from .data.check import check_dataset
from .errors import run_cli
from .runfolder import check_output_file
from .engine import evaluate_model, format_metrics, resolve_amp, setup_runtime, write_json
from .train import (ARCHS, DEFAULT_WORKERS, add_runtime_arguments, check_fused_backend, fused_arg, load_dataset,
                    make_model, nonneg_int, parse_kv, positive_int)

# model/data flags whose default comes from the checkpoint's config when not given
FROM_CHECKPOINT = {"dataset": "synthetic", "data_root": "data", "arch": "rga_sc", "backbone": "resnet50",
                   "height": 256, "width": 128}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rga.evaluate", description=__doc__.split("\n")[0])
    add_config_arguments(p, presets={})
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint file written by rga.train, or a run folder (its latest checkpoint)")
    p.add_argument("--dataset", help="dataset name (default: the checkpoint's)")
    p.add_argument("--data-root", help="dataset folder (default: the checkpoint's)")
    p.add_argument("--dataset-opt", action="append", type=parse_kv, default=None, metavar="KEY=VALUE",
                   help="extra keyword for rga.data.build_dataset, repeatable (default: the checkpoint's)")
    p.add_argument("--arch", choices=ARCHS, help="model (default: the checkpoint's)")
    p.add_argument("--backbone", help="backbone (default: the checkpoint's)")
    p.add_argument("--height", type=positive_int, help="input height (default: the checkpoint's)")
    p.add_argument("--width", type=positive_int, help="input width (default: the checkpoint's)")
    p.add_argument("--fused-rga", type=fused_arg, nargs="?", const=True, default=False, metavar="BACKEND",
                   help="run the RGA modules through the fused relation path")
    p.add_argument("--feat", choices=("bn", "pool"), default="bn",
                   help="retrieval feature: after the BN neck (bn) or the pooled one before it (pool)")
    p.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine", help="retrieval distance")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    p.add_argument("--flip", action="store_true", help="average features of each image and its mirror (off by default)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="feature extraction batch size")
    p.add_argument("--workers", type=nonneg_int, default=DEFAULT_WORKERS, help="DataLoader worker processes")
    p.add_argument("--output", metavar="JSON", help="also write the metrics to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars even on a terminal")
    add_runtime_arguments(p)
    return p


def evaluate(args) -> dict:
    if args.output:
        check_output_file(args.output)  # before the work, not after printing the metrics
    ckpt_path = resolve_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    state = extract_model_state(ckpt)
    saved = ckpt.get("config", {}) or {}
    for key, fallback in FROM_CHECKPOINT.items():
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key, fallback))
    if args.dataset_opt is None:  # the checkpoint's dataset options, if it is the checkpoint's dataset
        args.dataset_opt = list(saved.get("dataset_opt", [])) if args.dataset == saved.get("dataset") else []
    args.pretrained = None  # the checkpoint holds every weight
    num_classes = ckpt.get("num_classes")
    if num_classes is None:  # a bare state_dict: read the classifier size from it
        cls = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
        if not cls:
            raise CheckpointError(f"cannot tell the number of classes from {ckpt_path}")
        num_classes = cls[-1].shape[0]

    if args.threads:
        torch.set_num_threads(args.threads)
    rt = setup_runtime(args.device, "auto")
    amp_dtype = resolve_amp(args.amp, rt.device)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and rt.device.type == "cuda")
    check_fused_backend(args.fused_rga, rt.device.type == "cuda")
    dataset = load_dataset(args)
    check_dataset(dataset, ("query", "gallery"))  # all problems in one message, before any feature
    model = make_model(args, int(num_classes), args.feat)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_path} does not fit model {args.arch}/{args.backbone}: {e}") from e
    model.to(rt.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    print(f"evaluating {ckpt_path} (epoch {ckpt.get('epoch', '?')}) on {args.dataset}: {args.arch}/{args.backbone} "
          f"{args.height}x{args.width}, feat={args.feat}, metric={args.metric}, rerank={args.rerank}, "
          f"flip={args.flip}, device {rt.device}", flush=True)
    metrics = evaluate_model(model, dataset, device=rt.device, height=args.height, width=args.width,
                             batch_size=args.batch_size, workers=args.workers, amp_dtype=amp_dtype,
                             channels_last=channels_last, flip=args.flip, feat=args.feat, metric=args.metric,
                             rerank=args.rerank, show_progress=not args.no_progress)
    metrics = {"checkpoint": str(ckpt_path), "epoch": ckpt.get("epoch"), "dataset": args.dataset, **metrics}
    print(format_metrics(metrics))
    print("\n".join(f"  {k:<5} {100 * metrics[k]:6.2f}%" for k in ("R1", "R5", "R10", "R20", "mAP", "mINP")))
    if args.output:
        write_json(metrics, args.output)
        print(f"wrote {args.output}")
    return metrics


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args_with_config(parser, argv, presets={})
    return run_cli("rga.evaluate", evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
