"""The training and evaluation loops, device / precision / distributed setup. Reads top to bottom."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .errors import UsageError
from .extractor import FeatureExtractor, progress
from .fileio import write_json  # noqa: F401 - the metrics writer, used by rga.train and rga.evaluate
from .transforms import build_test_transform


# --------------------------------------------------------------------------- device & distributed

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


def to_device(imgs, rt: Runtime):
    """A batch of images on the run's device, in its memory layout."""
    imgs = imgs.to(rt.device, non_blocking=True)
    return imgs.contiguous(memory_format=torch.channels_last) if rt.channels_last else imgs


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
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- logging

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


# --------------------------------------------------------------------------- data

def build_train_loader(dataset, sampler, transform, *, workers, device):
    """The training images through `transform` (rga.transforms.build_train_transform), batched by
    `sampler` (a PK batch sampler)."""
    from .data import ImageDataset
    return DataLoader(ImageDataset(dataset.train, transform=transform), batch_sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False)


def build_test_loader(items, *, height, width, batch_size, workers, device):
    from .data import ImageDataset
    # A private generator: building this loader's iterator then draws no number from the global
    # torch RNG, so evaluating (or not) never changes the training run that follows.
    return DataLoader(ImageDataset(items, transform=build_test_transform(height, width)), batch_size=batch_size,
                      shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- training

def train_one_epoch(model, loader, criterion, optimizer, rt: Runtime, *, scaler=None, show_progress=True,
                    desc="train") -> dict:
    """One pass over `loader`. Returns the epoch's mean loss terms and accuracies (this rank's)."""
    model.train()
    sums, count = {}, 0
    t0 = time.perf_counter()
    for imgs, pids, _camids, _paths in progress(loader, total=len(loader), desc=desc, enabled=show_progress):
        imgs = to_device(imgs, rt)
        pids = pids.to(rt.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(rt.device, rt.amp_dtype):
            outputs = model(imgs)
        loss, parts = criterion(outputs, pids)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"loss became {loss.item()} (lower --lr, or try --amp off)")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += 1
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out["batches"] = count
    out["seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------- evaluation

@dataclass
class EvalSettings:
    """What an evaluation needs besides the model, the dataset and the runtime: the input size,
    the loader, and the retrieval options (rga.config.EvalConfig's fields)."""
    height: int
    width: int
    batch_size: int = 128
    workers: int = 0
    flip: bool = False
    feat: str = "bn"
    metric: str = "cosine"
    rerank: bool = False
    progress: bool = True

    @classmethod
    def of(cls, cfg, height: int | None = None, width: int | None = None) -> "EvalSettings":
        """From a rga.config.RunConfig (the input size from its model section unless given)."""
        e = cfg.eval
        return cls(height or cfg.model.height, width or cfg.model.width, cfg.data.test_batch_size,
                   cfg.data.workers, e.flip_test, e.eval_feat, e.metric, e.rerank, cfg.run.progress)


def evaluate_model(model, dataset, spec: EvalSettings, rt: Runtime) -> dict:
    """Query/gallery features -> rga.metrics.evaluate_features: CMC ranks, mAP, mINP and the counts.
    The one evaluation of rga.train (Trainer.evaluate) and rga.evaluate. `spec.feat` picks
    model.neck_feat for the duration."""
    from . import metrics

    if spec.feat not in ("bn", "pool"):
        raise UsageError(f"--feat must be bn or pool, got {spec.feat}")
    old_feat, was_training = getattr(model, "neck_feat", None), model.training
    try:
        t0 = time.perf_counter()
        extractor = FeatureExtractor(model, device=rt.device, feat=spec.feat, height=spec.height, width=spec.width,
                                     normalize=False, amp_dtype=rt.amp_dtype, channels_last=rt.channels_last)
        parts = [extractor.extract_loader(build_test_loader(items, height=spec.height, width=spec.width,
                                                            batch_size=spec.batch_size, workers=spec.workers,
                                                            device=rt.device),
                                          flip=spec.flip, show_progress=spec.progress, desc=desc)
                 for items, desc in ((dataset.query, "query"), (dataset.gallery, "gallery"))]
        (qf, q_pids, q_camids), (gf, g_pids, g_camids) = parts
        t1 = time.perf_counter()
        res = metrics.evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, metric=spec.metric,
                                        rerank=spec.rerank, device=rt.device if rt.device.type == "cuda" else None)
    finally:
        if old_feat is not None:
            model.neck_feat = old_feat
        model.train(was_training)
    cmc = np.asarray(res["cmc"], dtype=np.float64)

    def rank(k):
        return float(cmc[k - 1]) if len(cmc) >= k else float(cmc[-1]) if len(cmc) else 0.0

    return {"R1": rank(1), "R5": rank(5), "R10": rank(10), "R20": rank(20), "mAP": float(res["mAP"]),
            "mINP": float(res["mINP"]), "cmc": [float(v) for v in cmc], "num_valid_queries": int(res["num_valid_queries"]),
            "num_query": len(dataset.query), "num_gallery": len(dataset.gallery),
            "num_test_ids": len(set(int(p) for p in q_pids)),
            "feat": spec.feat, "metric": spec.metric, "rerank": bool(spec.rerank), "flip": bool(spec.flip),
            "extract_seconds": t1 - t0, "match_seconds": time.perf_counter() - t1}


def format_metrics(m: dict) -> str:
    return (f"R1 {100 * m['R1']:.2f}%  R5 {100 * m['R5']:.2f}%  R10 {100 * m['R10']:.2f}%  "
            f"R20 {100 * m['R20']:.2f}%  mAP {100 * m['mAP']:.2f}%  mINP {100 * m['mINP']:.2f}%  "
            f"({m['num_valid_queries']} queries, {m['num_gallery']} gallery, {m['num_test_ids']} query ids; "
            f"chance R1 ~ {100 / max(m['num_test_ids'], 1):.2f}%)")
