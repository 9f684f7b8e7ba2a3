"""Train a re-id model: `python -m rga.train [--preset quick] [--config FILE] [flags]`.

The defaults are the paper's recipe (Section 4.1); see docs/training.md. Under torchrun every
process trains on its own PK batches (disjoint identities per step) with DistributedDataParallel.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .checkpoint import (CheckpointError, atomic_save, capture_rng_state, checkpoint_name, extract_model_state,
                         find_latest, load_checkpoint, prune_checkpoints, restore_rng_state)
from .config import add_config_arguments, parse_args_with_config, parse_kv
from .data.check import check_dataset
from .errors import TrainingDivergedError, run_cli
from .runfolder import acquire_run_folder, resume_checkpoint
from .engine import (UsageError, barrier, build_train_loader, cleanup_runtime, close_logger, evaluate_model,
                     format_metrics, make_logger, resolve_amp, seed_everything, setup_runtime, train_one_epoch,
                     write_json)
from .losses import ReidLoss
from .samplers import RandomIdentityBatchSampler
from .schedulers import DEFAULT_MILESTONES, WarmupMultiStepLR

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
ARCHS = ("baseline", "rga_s", "rga_c", "rga_sc", "rga_cs", "rga_s_par_c")


def fused_arg(text: str):
    low = text.lower()
    if low in ("true", "on", "yes", "1", "auto"):
        return True
    if low in ("false", "off", "no", "0"):
        return False
    return text  # a backend name, passed to build_model(fused=...)


def positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_int(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic",
                   help="synthetic (default; generated under --data-root on first use), market1501, cuhk03, msmt17")
    g.add_argument("--data-root", default="data", help="folder holding the datasets")
    g.add_argument("--dataset-opt", action="append", type=parse_kv, default=[], metavar="KEY=VALUE",
                   help="extra keyword for rga.data.build_dataset, repeatable (e.g. a CUHK03 split option)")
    g.add_argument("--height", type=positive_int, default=256, help="input height")
    g.add_argument("--width", type=positive_int, default=128, help="input width")
    g.add_argument("--workers", type=nonneg_int, default=DEFAULT_WORKERS,
                   help="DataLoader worker processes per process (default here: min(4, CPU count))")
    g.add_argument("--test-batch-size", type=positive_int, default=128, help="batch size for feature extraction")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default="rga_sc", help="model (rga_sc is the paper's RGA-SC)")
    g.add_argument("--backbone", default="resnet50", help="backbone")
    g.add_argument("--pretrained", metavar="PATH",
                   help="local torchvision ResNet checkpoint to start the backbone from (the paper uses ImageNet "
                        "weights; without this flag the backbone starts from random weights)")
    g.add_argument("--fused-rga", type=fused_arg, nargs="?", const=True, default=False, metavar="BACKEND",
                   help="run the RGA modules through the fused relation path (optionally name a backend)")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device and speed")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision: auto = bf16 (or fp16) on a GPU, off on CPU")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="channels-last memory format (auto: on for GPU, off on CPU)")
    g.add_argument("--threads", type=nonneg_int, default=0,
                   help="CPU threads for torch ops per process (0: torch's default). On a busy or small CPU, "
                        "1 is often much faster than oversubscribing")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rga.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(p)
    add_data_arguments(p)
    add_model_arguments(p)
    g = p.add_argument_group("sampling and augmentation")
    g.add_argument("--batch-ids", type=positive_int, default=16, help="P: identities per batch (per process)")
    g.add_argument("--batch-instances", type=positive_int, default=4, help="K: images per identity in a batch")
    g.add_argument("--pad", type=nonneg_int, default=10, help="random translation: pad by this many pixels, crop back")
    g.add_argument("--flip-prob", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--erasing-prob", type=float, default=0.5, help="random erasing probability")
    g = p.add_argument_group("loss and optimisation")
    g.add_argument("--label-smooth", type=float, default=0.1, help="label smoothing epsilon of the ID loss")
    g.add_argument("--margin", type=float, default=0.3, help="batch-hard triplet margin")
    g.add_argument("--id-weight", type=float, default=1.0, help="weight of the ID (cross-entropy) loss")
    g.add_argument("--triplet-weight", type=float, default=1.0, help="weight of the triplet loss")
    g.add_argument("--lr", type=float, default=8e-4, help="Adam learning rate after warm-up")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="Adam weight decay")
    g.add_argument("--warmup-epochs", type=nonneg_int, default=20, help="linear warm-up length in epochs")
    g.add_argument("--warmup-lr", type=float, default=8e-6, help="learning rate at epoch 0 of the warm-up")
    g.add_argument("--milestones", type=nonneg_int, nargs="*", default=list(DEFAULT_MILESTONES),
                   help="epochs at which the learning rate is multiplied by --gamma")
    g.add_argument("--gamma", type=float, default=0.5, help="learning-rate decay factor at each milestone")
    g.add_argument("--epochs", type=positive_int, default=600, help="total training epochs")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=nonneg_int, default=40,
                   help="evaluate every N epochs (0: only after the last epoch, which is always evaluated)")
    g.add_argument("--eval-feat", choices=("bn", "pool"), default="bn", help="feature used for retrieval")
    g.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine", help="retrieval distance")
    g.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking at evaluation (off in the paper)")
    g.add_argument("--flip-test", action="store_true", help="average features of each test image and its mirror")
    g = p.add_argument_group("run, checkpoints and logging")
    g.add_argument("--output-dir", help="run folder: checkpoints, train.log, metrics (default runs/DATASET-ARCH-BACKBONE)")
    g.add_argument("--seed", type=int, default=0, help="random seed (sampler, augmentation, initialisation)")
    g.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a checkpoint file, or 'auto': the latest in --output-dir (starts fresh if none)")
    g.add_argument("--ckpt-every", type=positive_int, default=1, help="write a checkpoint every N epochs (and at the end)")
    g.add_argument("--keep-checkpoints", type=nonneg_int, default=2,
                   help="keep only the newest N checkpoints (0: keep all)")
    g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (needs the tensorboard package)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars even on a terminal")
    add_runtime_arguments(p)
    g = p.add_argument_group("speed (GPU) and distributed")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="GPU only: torch.compile(mode='reduce-overhead'), which captures the training step's "
                        "forward and backward in CUDA graphs (PK batches have a fixed shape)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (with torchrun)")
    g.add_argument("--dist-backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="process-group backend under torchrun (auto: nccl on GPU, gloo on CPU)")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True) (slower on GPU; CPU runs are already repeatable)")
    return p


def default_output_dir(args) -> Path:
    return Path("runs") / f"{args.dataset}-{args.arch}-{args.backbone}"


def check_fused_backend(fused, on_gpu: bool) -> None:
    """A --fused-rga backend name that this machine cannot run is a usage error, caught up front."""
    if not isinstance(fused, str):
        return
    import rga_kernels

    device = "cuda" if on_gpu else "cpu"
    status = rga_kernels.backend_status(device)
    if fused not in status:
        raise UsageError(f"--fused-rga {fused}: unknown backend; expected on/off/auto or one of {list(status)}")
    ok, why = status[fused]
    if not ok:
        raise UsageError(f"--fused-rga {fused} cannot run on {device} here: {why}; available: "
                         f"{rga_kernels.available_backends(device)}")


FLOAT_FLAGS = ("lr", "warmup_lr", "weight_decay", "gamma", "margin", "label_smooth", "id_weight", "triplet_weight",
               "flip_prob", "erasing_prob")


def check_finite(args) -> None:
    """NaN or infinity in a numeric flag would only show up later, as a NaN loss."""
    for name in FLOAT_FLAGS:
        v = getattr(args, name, None)
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {v}")


def check_args(args) -> None:
    """Flag combinations that cannot work, caught before any heavy lifting."""
    on_gpu = torch.cuda.is_available() and not str(args.device).startswith("cpu")
    check_fused_backend(args.fused_rga, on_gpu)
    if args.dist_backend == "nccl" and not on_gpu:
        raise UsageError("--dist-backend nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    if args.deterministic:
        # cuBLAS is deterministic only with a fixed workspace; it must be set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.cuda_graphs and not on_gpu:
        raise UsageError("--cuda-graphs needs a CUDA GPU (it captures CUDA graphs); leave it off on CPU")
    if args.sync_bn and not on_gpu:
        raise UsageError("--sync-bn needs CUDA GPUs (PyTorch's DistributedDataParallel supports SyncBatchNorm "
                         "only on GPU modules); leave it off on CPU")
    if not 0.0 <= args.flip_prob <= 1.0 or not 0.0 <= args.erasing_prob <= 1.0:
        raise UsageError("--flip-prob and --erasing-prob must be in [0, 1]")
    if not 0.0 <= args.label_smooth < 1.0:
        raise UsageError("--label-smooth must be in [0, 1)")
    check_finite(args)
    if args.lr <= 0 or args.warmup_lr <= 0:
        raise UsageError("--lr and --warmup-lr must be > 0")
    if args.milestones != sorted(args.milestones):
        raise UsageError(f"--milestones must be increasing, got {args.milestones}")
    if args.pretrained and not Path(args.pretrained).is_file():
        raise UsageError(f"--pretrained file not found: {args.pretrained}")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise CheckpointError(f"--resume: checkpoint not found: {args.resume}")


def load_dataset(args):
    from .data import build_dataset
    try:
        return build_dataset(args.dataset, args.data_root, **dict(args.dataset_opt))
    except (KeyError, ValueError, FileNotFoundError, TypeError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UsageError(f"could not load dataset '{args.dataset}' from '{args.data_root}': {msg}") from e


def make_model(args, num_classes: int, neck_feat: str):
    from .models import build_model
    try:
        return build_model(args.arch, num_classes, height=args.height, width=args.width, fused=args.fused_rga,
                           pretrained=args.pretrained or False, backbone=args.backbone, neck_feat=neck_feat)
    except (KeyError, ValueError, FileNotFoundError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UsageError(f"could not build model '{args.arch}' (backbone {args.backbone}): {msg}") from e


def _gather_objects(rt, obj):
    if not rt.distributed:
        return [obj]
    out = [None] * rt.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _mean_across_ranks(rt, stats: dict) -> dict:
    if not rt.distributed:
        return stats
    keys = sorted(k for k in stats if k not in ("batches", "seconds"))
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64,
                     device=rt.device if rt.device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(t)
    out = dict(stats)
    out.update({k: float(v) / rt.world_size for k, v in zip(keys, t.tolist())})
    return out


def train(args) -> dict:
    """Run training as configured by `args` (a parsed namespace). Returns the last evaluation's metrics."""
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = setup_runtime(args.device, args.dist_backend)
    logger = None
    writer = None
    run_folder = None
    try:
        out_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args)
        # held until the end: one run per folder (rga.runfolder); also cleans leftover temp files
        run_folder = acquire_run_folder(out_dir, rt)
        logger = make_logger(out_dir, rt.is_main)
        log = logger.info
        for note in run_folder.notes() if run_folder is not None else []:
            log(note)

        # the resume rule: only the folder's newest checkpoint continues in it (rga.runfolder)
        resume_path = resume_checkpoint(out_dir, args.resume)
        if args.resume == "auto" and resume_path is None:
            log(f"--resume auto: no checkpoint in {out_dir}, starting from scratch")

        if args.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        amp_dtype = resolve_amp(args.amp, rt.device)
        channels_last = args.channels_last == "on" or (args.channels_last == "auto" and rt.device.type == "cuda")

        # Rank 0 builds the dataset first (the synthetic one is generated on first use), then the others.
        if rt.is_main:
            dataset = load_dataset(args)
            # every split non-empty, every image decodable: found now, not after the last epoch
            checked = check_dataset(dataset)
            log(f"dataset check: {checked['images']} images decode")
        barrier(rt)
        if not rt.is_main:
            dataset = load_dataset(args)
        train_pids = [int(pid) for _, pid, _ in dataset.train]
        log(f"dataset {args.dataset}: {len(dataset.train)} train images of {dataset.num_train_pids} ids, "
            f"{len(dataset.query)} query, {len(dataset.gallery)} gallery")

        seed_everything(args.seed)  # identical initial weights on every rank
        model = make_model(args, dataset.num_train_pids, args.eval_feat)
        if args.pretrained is None:
            log("note: no --pretrained backbone weights; the paper starts from ImageNet-pretrained ResNet-50")
        if args.sync_bn:
            if rt.distributed:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                log("note: --sync-bn has no effect in a single process (BatchNorm already sees the whole batch)")
        model.to(rt.device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"model {args.arch} / {args.backbone}: {n_params / 1e6:.2f} M parameters, input {args.height}x{args.width}, "
            f"fused={args.fused_rga}, device {rt.device}, amp={amp_dtype}, channels_last={channels_last}, "
            f"world_size={rt.world_size}")

        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        scheduler = WarmupMultiStepLR(optimizer, warmup_epochs=args.warmup_epochs, warmup_start_lr=args.warmup_lr,
                                      milestones=args.milestones, gamma=args.gamma)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        criterion = ReidLoss(epsilon=args.label_smooth, margin=args.margin, id_weight=args.id_weight,
                             triplet_weight=args.triplet_weight)
        try:
            sampler = RandomIdentityBatchSampler(train_pids, args.batch_ids, args.batch_instances, seed=args.seed,
                                                 rank=rt.rank, world_size=rt.world_size)
        except ValueError as e:
            raise UsageError(str(e)) from e
        loader = build_train_loader(dataset, sampler, height=args.height, width=args.width, pad=args.pad,
                                    flip_prob=args.flip_prob, erasing_prob=args.erasing_prob,
                                    workers=args.workers, device=rt.device)

        seed_everything(args.seed + 1 + rt.rank)  # per-rank augmentation streams
        start_epoch = 0
        last_metrics = {}
        if resume_path is not None:
            ckpt = load_checkpoint(resume_path)
            for key in ("model", "optimizer", "scheduler", "sampler", "epoch"):
                if key not in ckpt:
                    raise CheckpointError(f"{resume_path} is not a training checkpoint (no '{key}'); "
                                          "rga.evaluate can still read its weights")
            try:
                model.load_state_dict(extract_model_state(ckpt))
            except RuntimeError as e:
                raise CheckpointError(f"{resume_path} does not fit this model ({args.arch}/{args.backbone}, "
                                      f"{dataset.num_train_pids} ids); was it trained with other flags? {e}") from e
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            sampler.load_state_dict(ckpt["sampler"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            rng = ckpt.get("rng") or []
            if len(rng) == rt.world_size:
                restore_rng_state(rng[rt.rank])
            else:
                log(f"warning: checkpoint was written by {len(rng)} process(es), this run has {rt.world_size}; "
                    "random streams restart from the seed, so the run will not replay exactly")
            start_epoch = int(ckpt["epoch"])
            last_metrics = ckpt.get("metrics") or {}
            old = ckpt.get("config", {})
            changed = {k: (old[k], v) for k, v in vars(args).items()
                       if k in old and old[k] != v and k not in ("resume", "epochs", "config", "preset", "workers",
                                                                 "no_progress", "tensorboard", "output_dir")}
            if changed:
                log(f"warning: flags differ from the checkpoint's run: {changed}")
            log(f"resumed from {resume_path} at epoch {start_epoch}")
            del ckpt
        if start_epoch >= args.epochs:
            log(f"nothing to do: the checkpoint is at epoch {start_epoch} and --epochs is {args.epochs}")

        train_model = model
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            train_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        if args.compile or args.cuda_graphs:
            train_model = torch.compile(train_model, mode="reduce-overhead" if args.cuda_graphs else None)

        if args.tensorboard and rt.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

        if rt.is_main:
            write_json({k: v for k, v in vars(args).items()}, out_dir / "config.json")
        show_progress = rt.is_main and not args.no_progress
        eval_kw = dict(device=rt.device, height=args.height, width=args.width, batch_size=args.test_batch_size,
                       workers=args.workers, amp_dtype=amp_dtype, channels_last=channels_last,
                       flip=args.flip_test, feat=args.eval_feat, metric=args.metric, rerank=args.rerank,
                       show_progress=show_progress)

        def save_checkpoint(done, metrics, rng_states, prune):
            if rt.is_main:
                state = {"epoch": done, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "rng": rng_states, "config": vars(args), "num_classes": dataset.num_train_pids,
                         "metrics": metrics, "world_size": rt.world_size,
                         "torch_version": str(torch.__version__)}
                path = atomic_save(state, out_dir / checkpoint_name(done))
                if prune:
                    prune_checkpoints(out_dir, args.keep_checkpoints)
                log(f"saved {path}" + ("" if prune else " (with the evaluation)"))
            barrier(rt)

        t_start = time.perf_counter()
        for epoch in range(start_epoch, args.epochs):
            scheduler.step(epoch)
            sampler.set_epoch(epoch)
            try:
                stats = train_one_epoch(train_model, loader, criterion, optimizer, device=rt.device,
                                        amp_dtype=amp_dtype, scaler=scaler, channels_last=channels_last,
                                        show_progress=show_progress, desc=f"epoch {epoch + 1}/{args.epochs}")
            except FloatingPointError as e:
                kept = find_latest(out_dir)
                raise TrainingDivergedError(f"epoch {epoch + 1}: {e}; "
                                            + (f"{kept} is kept" if kept else "no checkpoint was written")) from e
            stats = _mean_across_ranks(rt, stats)
            lr = scheduler.get_last_lr()[0]
            log(f"epoch {epoch + 1}/{args.epochs}  lr {lr:.2e}  loss {stats.get('loss', float('nan')):.4f} "
                f"(id {stats.get('loss_id', float('nan')):.4f}, triplet {stats.get('loss_tri', float('nan')):.4f})  "
                f"acc {100 * stats.get('acc', 0):.1f}%  {stats['batches']} batches in {stats['seconds']:.1f}s")
            if writer is not None:
                for k in ("loss", "loss_id", "loss_tri", "acc", "tri_acc"):
                    if k in stats:
                        writer.add_scalar(f"train/{k}", stats[k], epoch + 1)
                writer.add_scalar("train/lr", lr, epoch + 1)

            done = epoch + 1
            do_eval = (args.eval_every and done % args.eval_every == 0) or done == args.epochs
            do_save = done % args.ckpt_every == 0 or done == args.epochs
            if do_save:
                # saved before the evaluation (an evaluation failure then loses no training), and
                # saved again with the evaluation's metrics
                rng_states = _gather_objects(rt, capture_rng_state())
                save_checkpoint(done, last_metrics, rng_states, prune=True)
            if do_eval:
                if rt.is_main:
                    metrics = evaluate_model(model, dataset, **eval_kw)
                    last_metrics = {"epoch": done, **metrics}
                    log(f"eval @ epoch {done}: {format_metrics(metrics)}")
                    write_json({**last_metrics, "train": stats}, out_dir / "metrics" / f"epoch_{done:04d}.json")
                    with open(out_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({**last_metrics, "train": stats}, default=str) + "\n")
                    if writer is not None:
                        for k in ("R1", "R5", "R10", "R20", "mAP", "mINP"):
                            writer.add_scalar(f"eval/{k}", metrics[k], done)
                barrier(rt)
                if do_save:
                    save_checkpoint(done, last_metrics, rng_states, prune=False)
        if args.epochs > start_epoch:
            log(f"done: {args.epochs - start_epoch} epoch(s) in {time.perf_counter() - t_start:.1f}s")
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
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    return run_cli("rga.train", train, args, interrupted_hint="continue later with --resume auto")


if __name__ == "__main__":
    sys.exit(main())
