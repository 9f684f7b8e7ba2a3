"""Where and how a run computes: the device, the process group, the precision (autocast), the memory
layout (channels-last), the seed, the log and the progress bar. Used by the training and evaluation
loops (rga.engine) and by the feature extractor, so each setting is applied in one place."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .errors import UsageError


def progress(iterable, *, total=None, desc="", enabled=True):
    """tqdm only on an interactive terminal and only where enabled (rank 0)."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


@dataclass
class Runtime:
    """Where and how a run computes: the device, the process group, the precision, the layout."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None  # autocast dtype, None: full precision
    channels_last: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device_arg: str = "auto", dist_backend: str = "auto", timeout_min: float = 30.0, *,
                  amp: str = "off", channels_last: str = "off") -> Runtime:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group; resolve the
    --amp and --channels-last settings (auto/on/off) for that device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA GPU is available (use --device cpu)")
        device = torch.device("cuda", local_rank if world_size > 1 else (torch.device(device_arg).index or 0))
        torch.cuda.set_device(device)
    elif device_arg == "cpu":
        device = torch.device("cpu")
    else:
        raise UsageError(f"unknown --device '{device_arg}' (auto, cpu, cuda, cuda:N)")
    if world_size > 1 and not dist.is_initialized():
        backend = dist_backend if dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank,
                   amp_dtype=resolve_amp(amp, device),
                   channels_last=channels_last == "on" or (channels_last == "auto" and device.type == "cuda"))


def place_model(model, rt: Runtime):
    """The model on the run's device, in its memory layout."""
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def prepare_batch(imgs: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch of images on ``device``, in channels-last layout when asked: the one place a batch is
    placed, for training (to_device) and for feature extraction (rga.extractor)."""
    imgs = imgs.to(device, non_blocking=True)
    return imgs.contiguous(memory_format=torch.channels_last) if channels_last else imgs


def to_device(imgs, rt: Runtime):
    """A batch of images on the run's device, in its memory layout."""
    return prepare_batch(imgs, rt.device, rt.channels_last)


def cleanup_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def resolve_amp(amp: str, device: torch.device):
    """'auto' -> bf16 on a GPU that has it, else fp16 on GPU; off on CPU. Returns a dtype or None."""
    if amp == "off":
        return None
    if device.type != "cuda":
        if amp == "auto":
            return None
        raise UsageError(f"--amp {amp} needs a CUDA GPU; on CPU use --amp off (the default there)")
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype):
    """torch.autocast at ``dtype`` on ``device``'s type, or nothing for dtype None (full precision):
    the one precision switch of training and feature extraction."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_logger(output_dir: Path | None, is_main: bool, name: str = "rga") -> logging.Logger:
    logger = logging.getLogger(f"{name}.{os.getpid()}.{id(output_dir)}")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(fmt)
    logger.addHandler(sh)
    if output_dir is not None and is_main:
        fh = logging.FileHandler(Path(output_dir) / "train.log")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)
