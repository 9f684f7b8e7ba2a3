"""Train a re-id model: `python -m rga.train [--preset paper|quick] [--config FILE] [--model NAME] [flags]`.

The defaults are the paper's recipe as the public code runs it (Section 4.1; see docs/training.md),
on the synthetic dataset unless --dataset names another. Under torchrun every process trains on
its own PK batches (disjoint identities per step) with DistributedDataParallel.

`train(cfg)` reads as the recipe: open the run folder (and find the checkpoint to resume), load
the data, build or restore the model, build the training parts, then per epoch: one epoch of
training, an evaluation every `eval_every` epochs, a checkpoint every `ckpt_every` epochs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import config as C
from .models import build_from_config
from .checkpoint import (CheckpointError, atomic_save, capture_rng_state, checkpoint_name, find_latest,
                         load_checkpoint, load_model, prune_checkpoints, restore_rng_state)
from .cli import (UsageError, add_field_arguments, add_layer_arguments, check_fused_backend, find_pretrained,
                  layers_from_args, load_dataset, section_fields)
from .data.check import check_dataset
from .errors import TrainingDivergedError, run_cli
from .runfolder import acquire_run_folder, resume_checkpoint
from .engine import (barrier, build_train_loader, cleanup_runtime, close_logger, evaluate_model, format_metrics,
                     make_logger, resolve_amp, seed_everything, setup_runtime, train_one_epoch, write_json)
from .losses import ReidLoss
from .samplers import RandomIdentityBatchSampler
from .schedulers import WarmupMultiStepLR
from .transforms import build_train_transform

SECTION_TITLES = {"model": "model", "data": "data, sampling and augmentation", "optim": "loss and optimisation",
                  "eval": "evaluation during training", "run": "run folder, checkpoints, device and speed"}


# ------------------------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rga.train", description=__doc__.split("\n")[0])
    add_layer_arguments(p)
    for section, title in SECTION_TITLES.items():
        add_field_arguments(p, section_fields(section), title=title)
    return p


def parse_config(argv=None) -> C.RunConfig:
    """defaults < --preset < --config < flags, as a validated RunConfig (ConfigError if bad)."""
    ns = build_parser().parse_args(argv)
    return C.resolve(layers_from_args(ns, set(C.FIELDS)))


def default_output_dir(cfg: C.RunConfig) -> Path:
    return Path("runs") / f"{cfg.data.dataset}-{cfg.model.label()}-{cfg.model.backbone}"


# ------------------------------------------------------------------------------------ the steps

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
    if p not in (None, "auto") and not Path(p).is_file():
        raise UsageError(f"--pretrained file not found: {p}")
    if r.resume not in (None, "auto") and not Path(r.resume).is_file():
        raise CheckpointError(f"--resume: checkpoint not found: {r.resume}")


def open_run_folder(cfg: C.RunConfig, rt, log) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), by the resume rule of rga.runfolder: a
    fresh run refuses a folder that already holds checkpoints, and only the folder's newest
    checkpoint continues in it (an older one branches into a new folder). Call with the folder's
    lock held."""
    out_dir = Path(cfg.run.output_dir)
    path = resume_checkpoint(out_dir, cfg.run.resume)
    if cfg.run.resume == "auto" and path is None:
        log(f"--resume auto: no checkpoint in {out_dir}, starting from scratch")
    return path


def pretrained_source(cfg: C.RunConfig, log):
    """What build_model gets as `pretrained`: a file, or False (random init, said in the log)."""
    p, backbone = cfg.model.pretrained, cfg.model.backbone
    if p == "auto":
        found = find_pretrained(backbone)
        if found is None:
            log(f"warning: no ImageNet weights: no torchvision {backbone}-*.pth in ./pretrained or the torch hub "
                f"cache; the {backbone} starts from random weights (the paper starts from ImageNet weights: "
                "pass --pretrained FILE)")
            return False
        log(f"ImageNet weights: {found}")
        return str(found)
    if p is None:
        log(f"note: --pretrained none: the {backbone} starts from random weights (the paper starts from ImageNet)")
        return False
    return p


def new_model(cfg: C.RunConfig, num_classes: int, log):
    try:
        return build_from_config(cfg.model, num_classes, pretrained=pretrained_source(cfg, log), neck_feat=cfg.eval.eval_feat)
    except (KeyError, ValueError, FileNotFoundError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UsageError(f"could not build model {cfg.model.label()} (backbone {cfg.model.backbone}): {msg}") from e


def restored_model(cfg: C.RunConfig, ckpt: dict, path: Path, num_classes: int):
    """The checkpoint's network (load_model), which must be the one this run describes."""
    for key in ("model", "optimizer", "scheduler", "sampler", "epoch"):
        if key not in ckpt:
            raise CheckpointError(f"{path} is not a training checkpoint (no '{key}'); "
                                  "rga.evaluate can still read its weights")
    model, info = load_model(ckpt, fused=cfg.model.fused, neck_feat=cfg.eval.eval_feat, with_info=True)
    mine, theirs = cfg.model.arch_dict(), info.model.arch_dict()
    differ = {k: (theirs[k], v) for k, v in mine.items() if theirs[k] != v}
    if differ or info.num_classes != num_classes:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in differ.items())
        if info.num_classes != num_classes:
            what += f"{', ' if what else ''}classes {info.num_classes} -> {num_classes}"
        raise CheckpointError(f"{path} holds another network than this run describes ({what}); resume with the "
                              "options it was trained with, or choose another --output-dir")
    return model


def build_sampler(cfg: C.RunConfig, pids, *, rank: int = 0, world_size: int = 1) -> RandomIdentityBatchSampler:
    """PK batches of cfg.data.batch_ids identities x batch_instances images, cfg.data.sampler's epoch."""
    d = cfg.data
    try:
        return RandomIdentityBatchSampler(pids, d.batch_ids, d.batch_instances, seed=cfg.run.seed, rank=rank,
                                          world_size=world_size, mode=d.sampler)
    except ValueError as e:
        raise UsageError(str(e)) from e


@dataclass
class TrainingParts:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: WarmupMultiStepLR
    scaler: object
    criterion: ReidLoss
    sampler: RandomIdentityBatchSampler
    loader: object


def build_training_parts(cfg: C.RunConfig, rt, dataset, model, amp_dtype) -> TrainingParts:
    d, o = cfg.data, cfg.optim
    optimizer = torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    scheduler = WarmupMultiStepLR(optimizer, warmup_epochs=o.warmup_epochs, warmup_start_lr=o.warmup_lr,
                                  milestones=o.milestones, gamma=o.gamma)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    criterion = ReidLoss(epsilon=o.label_smooth, margin=o.margin, id_weight=o.id_weight,
                         triplet_weight=o.triplet_weight)
    sampler = build_sampler(cfg, [int(pid) for _, pid, _ in dataset.train], rank=rt.rank, world_size=rt.world_size)
    transform = build_train_transform(cfg.model.height, cfg.model.width, flip=d.flip_prob, crop=d.crop,
                                      crop_prob=d.crop_prob, pad=d.pad, erasing=d.erasing_prob)
    loader = build_train_loader(dataset, sampler, transform, workers=d.workers, device=rt.device)
    return TrainingParts(model, optimizer, scheduler, scaler, criterion, sampler, loader)


def restore_training_state(parts: TrainingParts, ckpt: dict, rt, log) -> tuple:
    """Optimizer, schedule, sampler, scaler and random states; returns (start epoch, last metrics)."""
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    try:
        parts.sampler.load_state_dict(ckpt["sampler"])
    except ValueError as e:
        raise CheckpointError(f"cannot resume: {e} (pass --sampler as the run was started)") from e
    if parts.scaler is not None and ckpt.get("scaler"):
        parts.scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt.get("rng") or []
    if len(rng) == rt.world_size:
        restore_rng_state(rng[rt.rank])
    else:
        log(f"warning: checkpoint was written by {len(rng)} process(es), this run has {rt.world_size}; "
            "random streams restart from the seed, so the run will not replay exactly")
    return int(ckpt["epoch"]), ckpt.get("metrics") or {}


def warn_changed_options(cfg: C.RunConfig, ckpt: dict, log) -> None:
    try:
        old = C.RunConfig.from_dict(ckpt["config"]) if ckpt.get("format_version") else C.from_legacy(ckpt["config"])
    except (C.ConfigError, KeyError, TypeError):
        return
    ignore = {"resume", "epochs", "workers", "progress", "tensorboard", "output_dir", "pretrained", "threads"}
    new_flat, old_flat = cfg.flat(), old.flat()
    changed = {k: (old_flat[k], v) for k, v in new_flat.items() if k not in ignore and old_flat[k] != v}
    if changed:
        log(f"warning: options differ from the checkpoint's run: {changed}")


def speed_settings(cfg: C.RunConfig, rt) -> tuple:
    """cuDNN / determinism switches; returns (autocast dtype or None, channels_last)."""
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = cfg.run.channels_last == "on" or (cfg.run.channels_last == "auto" and rt.device.type == "cuda")
    return resolve_amp(cfg.run.amp, rt.device), channels_last


def place_model(cfg: C.RunConfig, model, rt, channels_last: bool, log):
    if cfg.run.sync_bn:
        if rt.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log("note: --sync-bn has no effect in a single process (BatchNorm already sees the whole batch)")
    model.to(rt.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def wrap_for_training(cfg: C.RunConfig, model, rt):
    """DistributedDataParallel under torchrun, torch.compile when asked; `model` stays the bare one."""
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if cfg.run.compile or cfg.run.cuda_graphs:
        model = compile_for_training(model, cuda_graphs=cfg.run.cuda_graphs, fullgraph=not rt.distributed)
    return model


def compile_for_training(model, *, cuda_graphs: bool = False, fullgraph: bool = True):
    """--compile / --cuda-graphs: torch.compile, with CUDA graphs ("reduce-overhead") for the latter.

    The fused model compiles as one graph (tests/test_compile.py); under DistributedDataParallel
    Dynamo splits the graph at the gradient buckets, so fullgraph is off there. bench/train_step.py
    times this same path.
    """
    return torch.compile(model, mode="reduce-overhead" if cuda_graphs else None, fullgraph=fullgraph)


def open_tensorboard(cfg: C.RunConfig, out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def mean_across_ranks(rt, stats: dict) -> dict:
    if not rt.distributed:
        return stats
    keys = sorted(k for k in stats if k not in ("batches", "seconds"))
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64,
                     device=rt.device if rt.device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(t)
    out = dict(stats)
    out.update({k: float(v) / rt.world_size for k, v in zip(keys, t.tolist())})
    return out


def gather_objects(rt, obj):
    if not rt.distributed:
        return [obj]
    out = [None] * rt.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def run_epoch(cfg, parts: TrainingParts, train_model, epoch: int, rt, amp_dtype, channels_last, log, writer):
    parts.scheduler.step(epoch)
    parts.sampler.set_epoch(epoch)
    try:
        stats = train_one_epoch(train_model, parts.loader, parts.criterion, parts.optimizer, device=rt.device,
                                amp_dtype=amp_dtype, scaler=parts.scaler, channels_last=channels_last,
                                show_progress=rt.is_main and cfg.run.progress,
                                desc=f"epoch {epoch + 1}/{cfg.optim.epochs}")
    except FloatingPointError as e:  # a diverged loss: one error line saying what is kept
        kept = find_latest(cfg.run.output_dir)
        raise TrainingDivergedError(f"epoch {epoch + 1}: {e}; "
                                    + (f"{kept} is kept" if kept else "no checkpoint was written")) from e
    stats = mean_across_ranks(rt, stats)
    lr = parts.scheduler.get_last_lr()[0]
    nan = float("nan")
    log(f"epoch {epoch + 1}/{cfg.optim.epochs}  lr {lr:.2e}  loss {stats.get('loss', nan):.4f} "
        f"(id {stats.get('loss_id', nan):.4f}, triplet {stats.get('loss_tri', nan):.4f})  "
        f"acc {100 * stats.get('acc', 0):.1f}%  {stats['batches']} batches in {stats['seconds']:.1f}s")
    if writer is not None:
        for k in ("loss", "loss_id", "loss_tri", "acc", "tri_acc"):
            if k in stats:
                writer.add_scalar(f"train/{k}", stats[k], epoch + 1)
        writer.add_scalar("train/lr", lr, epoch + 1)
    return stats


def evaluate_epoch(cfg, model, dataset, done: int, stats: dict, out_dir: Path, rt, amp_dtype, channels_last,
                   log, writer) -> dict:
    e = cfg.eval
    metrics = evaluate_model(model, dataset, device=rt.device, height=cfg.model.height, width=cfg.model.width,
                             batch_size=cfg.data.test_batch_size, workers=cfg.data.workers, amp_dtype=amp_dtype,
                             channels_last=channels_last, flip=e.flip_test, feat=e.eval_feat, metric=e.metric,
                             rerank=e.rerank, show_progress=cfg.run.progress)
    result = {"epoch": done, **metrics}
    log(f"eval @ epoch {done}: {format_metrics(metrics)}")
    write_json({**result, "train": stats}, out_dir / "metrics" / f"epoch_{done:04d}.json")
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**result, "train": stats}, default=str) + "\n")
    if writer is not None:
        for k in ("R1", "R5", "R10", "R20", "mAP", "mINP"):
            writer.add_scalar(f"eval/{k}", metrics[k], done)
    return result


def save_checkpoint(cfg, parts: TrainingParts, done: int, num_classes: int, metrics: dict, rng_states,
                    out_dir: Path, rt) -> Path:
    state = {"format_version": C.FORMAT_VERSION, "config": cfg.to_dict(), "num_classes": num_classes,
             "epoch": done, "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
             "scheduler": parts.scheduler.state_dict(), "sampler": parts.sampler.state_dict(),
             "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
             "rng": rng_states, "metrics": metrics, "world_size": rt.world_size,
             "torch_version": str(torch.__version__)}
    path = atomic_save(state, out_dir / checkpoint_name(done))
    prune_checkpoints(out_dir, cfg.run.keep_checkpoints)
    return path


# ------------------------------------------------------------------------------------ the run

def train(cfg: C.RunConfig) -> dict:
    """Train as `cfg` says. Returns the last evaluation's metrics."""
    cfg.validate()
    if cfg.run.output_dir is None:
        cfg.run.output_dir = str(default_output_dir(cfg))
    check_runtime(cfg)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    rt = setup_runtime(cfg.run.device, cfg.run.dist_backend)
    logger = writer = run_folder = None
    try:
        out_dir = Path(cfg.run.output_dir)
        # held until the end: one run per folder (rga.runfolder); also cleans leftover temp files
        run_folder = acquire_run_folder(out_dir, rt)
        logger = make_logger(out_dir, rt.is_main)
        log = logger.info
        for note in run_folder.notes() if run_folder is not None else []:
            log(note)
        resume_path = open_run_folder(cfg, rt, log)

        amp_dtype, channels_last = speed_settings(cfg, rt)

        # Rank 0 builds the dataset first (the synthetic one is generated on first use), then the others.
        dataset = load_dataset(cfg.data) if rt.is_main else None
        if rt.is_main:  # every split non-empty, every image decodable: found now, not after the last epoch
            log(f"dataset check: {check_dataset(dataset)['images']} images decode")
        barrier(rt)
        if not rt.is_main:
            dataset = load_dataset(cfg.data)
        num_classes = dataset.num_train_pids
        log(f"dataset {cfg.data.dataset}: {len(dataset.train)} train images of {num_classes} ids, "
            f"{len(dataset.query)} query, {len(dataset.gallery)} gallery")

        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        ckpt = load_checkpoint(resume_path) if resume_path is not None else None
        model = (restored_model(cfg, ckpt, resume_path, num_classes) if ckpt is not None
                 else new_model(cfg, num_classes, log))
        model = place_model(cfg, model, rt, channels_last, log)
        m = cfg.model
        log(f"model {m.label()} ({m.variant}, stages {','.join(map(str, m.stages))}) / {m.backbone}: "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, input {m.height}x{m.width}, "
            f"fused={m.fused}, device {rt.device}, amp={amp_dtype}, channels_last={channels_last}, "
            f"world_size={rt.world_size}")
        parts = build_training_parts(cfg, rt, dataset, model, amp_dtype)
        log(f"sampler {cfg.data.sampler}: {len(parts.sampler)} batches of {cfg.data.batch_ids}x"
            f"{cfg.data.batch_instances} per epoch; crop {cfg.data.crop}")

        seed_everything(cfg.run.seed + 1 + rt.rank)  # per-rank augmentation streams
        start_epoch, last_metrics = 0, {}
        if ckpt is not None:
            start_epoch, last_metrics = restore_training_state(parts, ckpt, rt, log)
            warn_changed_options(cfg, ckpt, log)
            log(f"resumed from {resume_path} at epoch {start_epoch}")
            del ckpt
        if start_epoch >= cfg.optim.epochs:
            log(f"nothing to do: the checkpoint is at epoch {start_epoch} and --epochs is {cfg.optim.epochs}")

        train_model = wrap_for_training(cfg, model, rt)
        writer = open_tensorboard(cfg, out_dir) if cfg.run.tensorboard and rt.is_main else None
        if rt.is_main:
            write_json(cfg.to_dict(), out_dir / "config.json")

        t_start = time.perf_counter()
        for epoch in range(start_epoch, cfg.optim.epochs):
            stats = run_epoch(cfg, parts, train_model, epoch, rt, amp_dtype, channels_last, log, writer)
            done = epoch + 1
            do_eval = (cfg.eval.eval_every and done % cfg.eval.eval_every == 0) or done == cfg.optim.epochs
            do_save = done % cfg.run.ckpt_every == 0 or done == cfg.optim.epochs
            if do_save:  # before the evaluation (its failure then loses no training), again after it
                rng_states = gather_objects(rt, capture_rng_state())
                if rt.is_main:
                    path = save_checkpoint(cfg, parts, done, num_classes, last_metrics, rng_states, out_dir, rt)
                    log(f"saved {path}")
                barrier(rt)
            if do_eval:
                if rt.is_main:
                    last_metrics = evaluate_epoch(cfg, model, dataset, done, stats, out_dir, rt, amp_dtype,
                                                  channels_last, log, writer)
                    if do_save:
                        save_checkpoint(cfg, parts, done, num_classes, last_metrics, rng_states, out_dir, rt)
                        log(f"saved {path} (with the evaluation)")
                barrier(rt)
        if cfg.optim.epochs > start_epoch:
            log(f"done: {cfg.optim.epochs - start_epoch} epoch(s) in {time.perf_counter() - t_start:.1f}s")
        if last_metrics:
            log(f"final: {format_metrics(last_metrics)}")
        return last_metrics
    finally:
        if writer is not None:
            writer.close()
        if logger is not None:
            close_logger(logger)
        if run_folder is not None:
            run_folder.release()
        cleanup_runtime(rt)


def main(argv=None) -> int:
    return run_cli("rga.train", lambda: train(parse_config(argv)),
                   interrupted_hint="continue later with --resume auto")


if __name__ == "__main__":
    sys.exit(main())
