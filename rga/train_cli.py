"""rga.train's command line: the parser (one flag per config field, in sections), the config a
command line resolves to, the run folder's name and the checks of flag combinations this machine
cannot run. The run itself is rga.train (:class:`rga.train.Trainer`)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from . import config as C
from .cli import add_field_arguments, add_layer_arguments, check_fused_backend, layers_from_args, section_fields
from .errors import CheckpointError, UsageError
from .presets import PRETRAIN_COMMANDS

#: the first line of rga.train's help
DESCRIPTION = 'Train a re-id model: `python -m rga.train [--preset paper|quick] [--config FILE] [--model NAME] [flags]`.'

SECTION_TITLES = {"model": "model", "data": "data, sampling and augmentation", "optim": "loss and optimisation",
                  "eval": "evaluation during training", "run": "run folder, checkpoints, device and speed"}


# ------------------------------------------------------------------------------------ the parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rga.train", description=DESCRIPTION)
    add_layer_arguments(p)
    for section, title in SECTION_TITLES.items():
        add_field_arguments(p, section_fields(section), title=title)
    return p


def parse_config(argv=None) -> C.RunConfig:
    """defaults < --preset < --config < flags, as a validated RunConfig (ConfigError if bad)."""
    ns = build_parser().parse_args(argv)
    return C.resolve(layers_from_args(ns, set(C.FIELDS)))


def default_output_dir(cfg: C.RunConfig, label: str | None = None) -> Path:
    return Path("runs") / f"{cfg.data.dataset}-{label or cfg.model.label()}-{cfg.model.backbone}"


def expand_output_dir(cfg: C.RunConfig, label: str | None = None) -> str:
    """--output-dir with {model}, {seed}, {dataset} and {backbone} filled in (a preset can name one
    folder per model and seed, e.g. runs/showcase/{model}-seed{seed})."""
    text = str(cfg.run.output_dir)
    fields = {"model": label or cfg.model.label(), "seed": cfg.run.seed, "dataset": cfg.data.dataset,
              "backbone": cfg.model.backbone}
    try:
        return text.format(**fields) if "{" in text else text
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--output-dir {text!r}: only {{model}}, {{seed}}, {{dataset}} and {{backbone}} can be "
                         f"filled in ({e})") from None


# ------------------------------------------------------------------------------------ pre-flight checks

def check_runtime(cfg: C.RunConfig) -> None:
    """Flag combinations this machine cannot run, caught before any heavy lifting."""
    r = cfg.run
    on_gpu = torch.cuda.is_available() and not str(r.device).startswith("cpu")
    check_fused_backend(cfg.model.fused, on_gpu)
    if r.dist_backend == "nccl" and not on_gpu:
        raise UsageError("--dist-backend nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    if r.deterministic:
        # cuBLAS is deterministic only with a fixed workspace; it must be set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if r.cuda_graphs and not on_gpu:
        raise UsageError("--cuda-graphs needs a CUDA GPU (it captures CUDA graphs); leave it off on CPU")
    if r.sync_bn and not on_gpu:
        raise UsageError("--sync-bn needs CUDA GPUs (PyTorch's DistributedDataParallel supports SyncBatchNorm "
                         "only on GPU modules); leave it off on CPU")
    p = cfg.model.pretrained
    if p not in (None, "auto") and not (Path(p).is_file() or Path(p).is_dir()):
        hint = PRETRAIN_COMMANDS.get(str(p))
        raise UsageError(f"--pretrained file not found: {p} (expected a torchvision .pth, or a run folder or checkpoint "
                         "of rga.train)" + (f"; make it first with: {hint}" if hint else ""))
    if r.resume not in (None, "auto") and not Path(r.resume).is_file():
        raise CheckpointError(f"--resume: checkpoint not found: {r.resume}")

