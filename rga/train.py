"""Train a re-id model: `python -m rga.train [--preset paper|quick] [--config FILE] [--model NAME] [flags]`.

The defaults are the paper's recipe as the public code runs it (Section 4.1; see docs/training.md),
on the synthetic dataset unless --dataset names another. Under torchrun every process trains on
its own PK batches (disjoint identities per step) with DistributedDataParallel.

`train(cfg)` runs a :class:`Trainer`, whose methods read as the recipe: open (the run folder and
the checkpoint to resume, the data, the model, the training parts), resume, prepare (DDP,
torch.compile, config.json), then per epoch: one
epoch of training, a checkpoint every `ckpt_every` epochs, an evaluation every `eval_every` epochs.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

from . import config as C
from .checkpoint import (TrainingParts, capture_rng_state, find_latest, load_checkpoint, load_model,
                         restore_rng_state, save_training_checkpoint)
from .cli import load_dataset
from .data.check import check_dataset, data_fingerprint, describe_data_change, unmatched_note
from .divergence import LossWatch, check_finite_state
from .engine import EvalSettings, TrainStep, build_train_loader, evaluate_model, format_metrics, train_one_epoch
from .errors import CheckpointError, DatasetChangedError, TrainingDivergedError, UsageError, run_cli
from .fileio import append_line, write_json
from .losses import ReidLoss
from .models import build_from_config, find_imagenet_weights
from .runfolder import acquire_run_folder, resume_checkpoint
from .runtime import (barrier, cleanup_runtime, close_logger, make_logger, place_model, seed_everything,
                      setup_runtime)
from .samplers import RandomIdentityBatchSampler
from .schedulers import WarmupMultiStepLR
# the command line lives in rga.train_cli; its names stay importable from rga.train
from .train_cli import (SECTION_TITLES, build_parser, check_runtime, default_output_dir,  # noqa: F401
                        expand_output_dir, parse_config)
from .transforms import build_train_transform


# ------------------------------------------------------------------------------------ the parts

def build_sampler(cfg: C.RunConfig, pids, *, rank: int = 0, world_size: int = 1) -> RandomIdentityBatchSampler:
    """PK batches of cfg.data.batch_ids identities x batch_instances images, cfg.data.sampler's epoch."""
    d = cfg.data
    try:
        return RandomIdentityBatchSampler(pids, d.batch_ids, d.batch_instances, seed=cfg.run.seed, rank=rank,
                                          world_size=world_size, mode=d.sampler)
    except ValueError as e:
        raise UsageError(str(e)) from e


def compile_for_training(model, *, cuda_graphs: bool = False, fullgraph: bool = True):
    """--compile / --cuda-graphs: torch.compile, with CUDA graphs ("reduce-overhead") for the latter.

    The fused model compiles as one graph (tests/test_compile.py); under DistributedDataParallel
    Dynamo splits the graph at the gradient buckets, so fullgraph is off there. bench/train_step.py
    times this same path.
    """
    return torch.compile(model, mode="reduce-overhead" if cuda_graphs else None, fullgraph=fullgraph)


# ------------------------------------------------------------------------------------ the trainer

class Trainer:
    """One training run, as torchreid's Engine: it holds the configuration (``cfg``), the runtime
    (``rt``: device, precision, channels-last, process group), the run folder and its logger, the
    data and the training parts (model, optimizer, schedule, scaler, loss, sampler, loader), and its
    methods are the steps of a run: :meth:`open` (folder, data, model, parts), :meth:`resume`,
    :meth:`prepare`, :meth:`epoch`, :meth:`evaluate`, :meth:`save`, :meth:`close`; :meth:`fit` runs
    the epochs. It works on its own copy of the configuration: the caller's is never changed.
    """

    def __init__(self, cfg: C.RunConfig):
        cfg = copy.deepcopy(cfg).validate()  # the run's own copy: the caller's config is never changed
        self.cfg = cfg
        self.label = cfg.model.label()  # the row name, for the folder name and the log
        if cfg.run.output_dir is None:
            cfg.run.output_dir = str(default_output_dir(cfg, self.label))
        cfg.run.output_dir = expand_output_dir(cfg, self.label)
        self.config_dict = cfg.to_dict()  # as saved in config.json and every checkpoint
        self.eval_settings = EvalSettings.of(cfg)
        self.out_dir = Path(cfg.run.output_dir)
        self.rt = None
        self.run_folder = self.logger = self.writer = None
        self.dataset = self.num_classes = None
        self.model = self.train_model = None  # the bare model, and what the steps run (DDP, compiled)
        self.optimizer = self.scheduler = self.scaler = self.criterion = self.sampler = self.loader = None
        self.loss_watch = LossWatch()  # the per-batch loss rule of rga.divergence
        self.checkpoint = self.resume_path = None  # the checkpoint to resume from, until resume()
        self.start_epoch, self.last_metrics = 0, {}

    def log(self, text: str) -> None:
        self.logger.info(text)

    # --------------------------------------------------------------------------- opening a run

    def open(self) -> "Trainer":
        """Check the flags, set up the runtime, take the run folder, load and check the data, build
        or restore the model and the training parts."""
        cfg, r = self.cfg, self.cfg.run
        check_runtime(cfg)
        if r.threads:
            torch.set_num_threads(r.threads)
        self.rt = rt = setup_runtime(r.device, r.dist_backend, amp=r.amp, channels_last=r.channels_last)
        # held until close(): one run per folder (rga.runfolder); also cleans leftover temp files
        self.run_folder = acquire_run_folder(self.out_dir, rt)
        self.logger = make_logger(self.out_dir, rt.is_main)
        for note in self.run_folder.notes() if self.run_folder is not None else []:
            self.log(note)
        # the resume rule of rga.runfolder: a fresh run refuses a folder that already holds
        # checkpoints, and only the folder's newest checkpoint continues in it
        self.resume_path = resume_checkpoint(self.out_dir, r.resume)
        if r.resume == "auto" and self.resume_path is None:
            self.log(f"--resume auto: no checkpoint in {self.out_dir}, starting from scratch")
        if r.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.load_data()
        seed_everything(r.seed)  # identical initial weights on every rank
        self.checkpoint = load_checkpoint(self.resume_path) if self.resume_path is not None else None
        self.model = place_model(self.sync_bn(self.restored_model() if self.checkpoint is not None
                                              else self.new_model()), rt)
        m = cfg.model
        self.log(f"model {self.label} ({m.variant}, stages {','.join(map(str, m.stages))}) / {m.backbone}: "
                 f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters, input {m.height}x"
                 f"{m.width}, fused={m.fused}, device {rt.device}, amp={rt.amp_dtype}, "
                 f"channels_last={rt.channels_last}, world_size={rt.world_size}")
        self.build_parts()
        return self

    def load_data(self) -> None:
        """Rank 0 builds the dataset first (the synthetic one is generated on first use) and checks
        it (every split non-empty, every image decodable: found now, not after the last epoch)."""
        rt, d = self.rt, self.cfg.data
        self.dataset = self.split(load_dataset(d)) if rt.is_main else None
        if rt.is_main:
            report = check_dataset(self.dataset)
            self.log(f"dataset check: {report['images']} images decode")
            if unmatched_note(report, self.dataset):
                self.log(unmatched_note(report, self.dataset))
        barrier(rt)
        if not rt.is_main:
            self.dataset = self.split(load_dataset(d))
        ds = self.dataset
        self.data_fingerprint = data_fingerprint(ds)  # in every checkpoint; checked every epoch and on resume
        self.num_classes = ds.num_train_pids
        self.log(f"dataset {d.dataset}: {len(ds.train)} train images of {self.num_classes} ids, "
                 f"{len(ds.query)} query, {len(ds.gallery)} gallery")

    def split(self, ds):
        """With --val-ids N: the validation split of rga.data.split (training identities only)."""
        n = self.cfg.data.val_ids
        if not n:
            return ds
        from .data.split import validation_split
        try:
            out = validation_split(ds, n)
        except ValueError as e:
            raise UsageError(f"--val-ids {n}: {e}") from e
        self.log(out.notes[-1])
        return out

    def param_groups(self) -> list:
        """One group, or with --new-lr-mult != 1 two: the trunk a --pretrained run provides (the
        backbone's ResNet layers) at --lr, everything else (attention modules, neck, classifier) at
        --lr x --new-lr-mult."""
        o = self.cfg.optim
        if o.new_lr_mult == 1.0:
            return [{"params": list(self.model.parameters())}]
        trunk, new = [], []
        for name, p in self.model.named_parameters():
            name = name[len("module."):] if name.startswith("module.") else name
            (trunk if name.startswith("backbone.") and not name.startswith("backbone.rga_att") else new).append(p)
        return [{"params": trunk}, {"params": new, "lr": o.lr * o.new_lr_mult}]

    def pretrained_source(self):
        """What build_model gets as `pretrained`: a file, or False (random init, said in the log)."""
        p, backbone = self.cfg.model.pretrained, self.cfg.model.backbone
        if p == "auto":
            found = find_imagenet_weights(backbone)
            if found is None:
                self.log(f"warning: no ImageNet weights: no torchvision {backbone}-*.pth in ./pretrained or the "
                         f"torch hub cache; the {backbone} starts from random weights (the paper starts from "
                         "ImageNet weights: pass --pretrained FILE)")
                return False
            self.log(f"ImageNet weights: {found}")
            return str(found)
        if p is None:
            self.log(f"note: --pretrained none: the {backbone} starts from random weights (the paper starts "
                     "from ImageNet)")
            return False
        self.log(f"backbone weights: {p}" + (" (a run folder: its newest checkpoint's trunk)" if Path(p).is_dir()
                                             else ""))
        return p

    def new_model(self):
        cfg = self.cfg
        try:
            return build_from_config(cfg.model, self.num_classes, pretrained=self.pretrained_source(),
                                     neck_feat=cfg.eval.eval_feat)
        except (KeyError, ValueError, FileNotFoundError, TypeError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise UsageError(f"could not build model {self.label} (backbone {cfg.model.backbone}): "
                             f"{msg}") from e

    def restored_model(self):
        """The checkpoint's network (load_model), which must be the one this run describes."""
        ckpt, path = self.checkpoint, self.resume_path
        for key in ("model", "optimizer", "scheduler", "sampler", "epoch"):
            if key not in ckpt:
                raise CheckpointError(f"{path} is not a training checkpoint (no '{key}'); "
                                      "rga.evaluate can still read its weights")
        model, info = load_model(ckpt, fused=self.cfg.model.fused, neck_feat=self.cfg.eval.eval_feat,
                                 with_info=True)
        mine, theirs = self.cfg.model.arch_dict(), info.model.arch_dict()
        differ = {k: (theirs[k], v) for k, v in mine.items() if theirs[k] != v}
        if differ or info.num_classes != self.num_classes:
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in differ.items())
            if info.num_classes != self.num_classes:
                what += f"{', ' if what else ''}classes {info.num_classes} -> {self.num_classes}"
            raise CheckpointError(f"{path} holds another network than this run describes ({what}); resume with "
                                  "the options it was trained with, or choose another --output-dir")
        return model

    def sync_bn(self, model):
        if self.cfg.run.sync_bn:
            if self.rt.distributed:
                return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.log("note: --sync-bn has no effect in a single process (BatchNorm already sees the whole batch)")
        return model

    def build_parts(self) -> None:
        d, o, rt = self.cfg.data, self.cfg.optim, self.rt
        self.optimizer = torch.optim.Adam(self.param_groups(), lr=o.lr, weight_decay=o.weight_decay)
        self.scheduler = WarmupMultiStepLR(self.optimizer, warmup_epochs=o.warmup_epochs,
                                           warmup_start_lr=o.warmup_lr, milestones=o.milestones, gamma=o.gamma,
                                           schedule=o.schedule, total_epochs=o.epochs)
        self.scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype == torch.float16 else None
        self.criterion = ReidLoss(epsilon=o.label_smooth, margin=o.margin, id_weight=o.id_weight,
                                  triplet_weight=o.triplet_weight)
        self.sampler = build_sampler(self.cfg, [int(pid) for _, pid, _ in self.dataset.train], rank=rt.rank,
                                     world_size=rt.world_size)
        transform = build_train_transform(self.cfg.model.height, self.cfg.model.width, flip=d.flip_prob,
                                          crop=d.crop, crop_prob=d.crop_prob, pad=d.pad, erasing=d.erasing_prob)
        self.loader = build_train_loader(self.dataset, self.sampler, transform, workers=d.workers, device=rt.device)
        self.log(f"sampler {d.sampler}: {len(self.sampler)} batches of {d.batch_ids}x{d.batch_instances} per "
                 f"epoch; crop {d.crop}")

    def resume(self) -> None:
        """Optimizer, schedule, sampler, scaler and random states from the checkpoint, if any."""
        cfg, rt, ckpt = self.cfg, self.rt, self.checkpoint
        seed_everything(cfg.run.seed + 1 + rt.rank)  # per-rank augmentation streams
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            try:
                self.sampler.load_state_dict(ckpt["sampler"])
            except ValueError as e:
                raise CheckpointError(f"cannot resume: {e} (pass --sampler as the run was started)") from e
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            rng = ckpt.get("rng") or []
            if len(rng) == rt.world_size:
                restore_rng_state(rng[rt.rank])
            else:
                self.log(f"warning: checkpoint was written by {len(rng)} process(es), this run has "
                         f"{rt.world_size}; random streams restart from the seed, so the run will not replay exactly")
            self.start_epoch, self.last_metrics = int(ckpt["epoch"]), ckpt.get("metrics") or {}
            self.check_data(f"cannot resume from {self.resume_path}", ckpt.get("data_fingerprint"),
                            "since it was written", "resume on the data it was trained on, or start a new run")
            self.warn_changed_options()
            self.log(f"resumed from {self.resume_path} at epoch {self.start_epoch}")
            self.checkpoint = None
        if self.start_epoch >= cfg.optim.epochs:
            self.log(f"nothing to do: the checkpoint is at epoch {self.start_epoch} and --epochs is "
                     f"{cfg.optim.epochs}")

    def prepare(self) -> None:
        """The model wrapped for training (DDP, torch.compile), TensorBoard, and config.json written."""
        cfg, rt = self.cfg, self.rt
        model = self.model
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        if cfg.run.compile or cfg.run.cuda_graphs:
            model = compile_for_training(model, cuda_graphs=cfg.run.cuda_graphs, fullgraph=not rt.distributed)
        self.train_model = model
        if cfg.run.tensorboard and rt.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        if rt.is_main:
            write_json(self.config_dict, self.out_dir / "config.json")

    def warn_changed_options(self) -> None:
        ckpt = self.checkpoint
        try:
            old = C.RunConfig.from_dict(ckpt["config"]) if ckpt.get("format_version") else C.from_legacy(ckpt["config"])
        except (C.ConfigError, KeyError, TypeError):
            return
        ignore = {"resume", "epochs", "workers", "progress", "tensorboard", "output_dir", "pretrained", "threads"}
        new_flat, old_flat = self.cfg.flat(), old.flat()
        changed = {k: (old_flat[k], v) for k, v in new_flat.items() if k not in ignore and old_flat[k] != v}
        for k in [k for k in C.INIT_ONLY if k in changed]:  # they made the checkpoint's weights: keep them
            setattr(getattr(self.cfg, C.FIELDS[k][0]), k, old_flat[k])
            self.log(f"note: {k} stays {old_flat[k]!r} as recorded (it set the initial weights, which the "
                     f"checkpoint's replace); --{k.replace('_', '-')} {changed.pop(k)[1]!r} is ignored")
            self.config_dict = self.cfg.to_dict()
        if changed:
            self.log(f"warning: options differ from the checkpoint's run: {changed}")

    # --------------------------------------------------------------------------- the steps of a run

    def epoch(self, epoch: int) -> dict:
        """One epoch of training (0-based `epoch`); the epoch's mean losses, averaged over ranks."""
        cfg, rt = self.cfg, self.rt
        self.scheduler.step(epoch)
        self.sampler.set_epoch(epoch)
        try:
            step = TrainStep(self.train_model, self.criterion, self.optimizer, self.scaler, self.loss_watch)
            stats = train_one_epoch(step, self.loader, rt, show_progress=rt.is_main and cfg.run.progress,
                                    desc=f"epoch {epoch + 1}/{cfg.optim.epochs}")
        except FloatingPointError as e:  # a diverged loss: one error line saying what is kept
            kept = find_latest(self.out_dir)
            raise TrainingDivergedError(f"epoch {epoch + 1}: {e}; "
                                        + (f"{kept} is kept" if kept else "no checkpoint was written")) from e
        if rt.distributed:
            keys = sorted(k for k in stats if k not in ("batches", "seconds"))
            t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64,
                             device=rt.device if rt.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(t)
            stats.update({k: float(v) / rt.world_size for k, v in zip(keys, t.tolist())})
        lr = self.scheduler.get_last_lr()[0]
        nan = float("nan")
        self.log(f"epoch {epoch + 1}/{cfg.optim.epochs}  lr {lr:.2e}  loss {stats.get('loss', nan):.4f} "
                 f"(id {stats.get('loss_id', nan):.4f}, triplet {stats.get('loss_tri', nan):.4f})  "
                 f"acc {100 * stats.get('acc', 0):.1f}%  {stats['batches']} batches in {stats['seconds']:.1f}s")
        self.scalars("train", {k: stats[k] for k in ("loss", "loss_id", "loss_tri", "acc", "tri_acc") if k in stats},
                     epoch + 1, lr=lr)
        return stats

    def record_epoch(self, done: int, stats: dict) -> None:
        """One line per trained epoch in metrics.jsonl, ``{"epoch": done, "train": stats}`` (losses,
        accuracy, batches, seconds): what rga.experiments sums as the run's training time. An epoch
        trained again after a resume gets a second line; the last one counts."""
        append_line(json.dumps({"epoch": done, "train": stats}, default=str), self.out_dir / "metrics.jsonl",
                    what="JSON lines file")

    def evaluate(self, done: int, stats: dict) -> dict:
        """The evaluation after `done` epochs (rga.engine.evaluate_model, as rga.evaluate runs it),
        logged and written to metrics/epoch_NNNN.json and metrics.jsonl (a line with the metrics and
        the epoch's training statistics, after the epoch's own line)."""
        metrics = evaluate_model(self.model, self.dataset, self.eval_settings, self.rt)
        result = {"epoch": done, **metrics}
        self.log(f"eval @ epoch {done}: {format_metrics(metrics)}")
        write_json({**result, "train": stats}, self.out_dir / "metrics" / f"epoch_{done:04d}.json")
        append_line(json.dumps({**result, "train": stats}, default=str), self.out_dir / "metrics.jsonl",
                    what="JSON lines file")
        self.scalars("eval", {k: metrics[k] for k in ("R1", "R5", "R10", "R20", "mAP", "mINP")}, done)
        return result

    def check_data(self, what: str, recorded, when: str, advice: str) -> None:
        """DatasetChangedError ("WHAT: the training data in ROOT changed WHEN: how; ADVICE") if the
        data's fingerprint differs from `recorded` (None: nothing recorded, nothing to check)."""
        change = None if recorded is None else describe_data_change(recorded, data_fingerprint(self.dataset))
        if change:
            raise DatasetChangedError(f"{what}: the training data in {self.cfg.data.data_root} changed {when}: "
                                      f"{change}; {advice}")

    def save(self, done: int, rng_states) -> Path:
        """checkpoint_epNNNN.pth after `done` epochs (rga.checkpoint.save_training_checkpoint); never
        one with NaN / Inf weights (rank 0 alone saves: its own model is checked)."""
        check_finite_state(self.model, done, kept=find_latest(self.out_dir), all_ranks=False)
        parts = TrainingParts(self.model, self.optimizer, self.scheduler, self.sampler, self.scaler,
                              num_classes=self.num_classes, world_size=self.rt.world_size)
        return save_training_checkpoint(self.out_dir, done, parts, config=self.config_dict, rng=rng_states,
                                        metrics=self.last_metrics, keep=self.cfg.run.keep_checkpoints,
                                        data=self.data_fingerprint)

    def scalars(self, group: str, values: dict, step: int, **extra) -> None:
        if self.writer is not None:
            for k, v in {**values, **extra}.items():
                self.writer.add_scalar(f"{group}/{k}", v, step)

    def rng_states(self) -> list:
        """Every rank's random states (gathered for the checkpoint)."""
        state = capture_rng_state()
        if not self.rt.distributed:
            return [state]
        out = [None] * self.rt.world_size
        torch.distributed.all_gather_object(out, state)
        return out

    def fit(self) -> dict:
        """The epochs from the resumed one to cfg.optim.epochs: train; a checkpoint every ckpt_every
        epochs (written before the evaluation, so a failing evaluation loses no training, and again
        with its metrics); an evaluation every eval_every epochs and after the last. Returns the last
        evaluation's metrics."""
        cfg, rt = self.cfg, self.rt
        t_start = time.perf_counter()
        for epoch in range(self.start_epoch, cfg.optim.epochs):
            stats = self.epoch(epoch)
            done = epoch + 1
            # weights and batch-norm statistics finite (on every rank), before any evaluation or save
            check_finite_state(self.model, done, kept=find_latest(self.out_dir))
            kept = find_latest(self.out_dir)
            self.check_data(f"epoch {done}", self.data_fingerprint, "during the run",
                            f"{kept} is kept" if kept else "no checkpoint was written")
            if rt.is_main:
                self.record_epoch(done, stats)
            do_eval = (cfg.eval.eval_every and done % cfg.eval.eval_every == 0) or done == cfg.optim.epochs
            do_save = done % cfg.run.ckpt_every == 0 or done == cfg.optim.epochs
            if do_save:
                rng_states = self.rng_states()
                if rt.is_main:
                    path = self.save(done, rng_states)
                    self.log(f"saved {path}")
                barrier(rt)
            if do_eval:
                if rt.is_main:
                    self.last_metrics = self.evaluate(done, stats)
                    if do_save:
                        self.save(done, rng_states)
                        self.log(f"saved {path} (with the evaluation)")
                barrier(rt)
        if cfg.optim.epochs > self.start_epoch:
            self.log(f"done: {cfg.optim.epochs - self.start_epoch} epoch(s) in {time.perf_counter() - t_start:.1f}s")
        if self.last_metrics:
            self.log(f"final: {format_metrics(self.last_metrics)}")
        return self.last_metrics

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.logger is not None:
            close_logger(self.logger)
        if self.run_folder is not None:
            self.run_folder.release()
        if self.rt is not None:
            cleanup_runtime(self.rt)


# ------------------------------------------------------------------------------------ the run

def train(cfg: C.RunConfig) -> dict:
    """Train as `cfg` says. Returns the last evaluation's metrics."""
    trainer = Trainer(cfg)
    try:
        trainer.open()
        trainer.resume()
        trainer.prepare()
        return trainer.fit()
    finally:
        trainer.close()


def main(argv=None) -> int:
    return run_cli("rga.train", lambda: train(parse_config(argv)),
                   interrupted_hint="continue later with --resume auto")


if __name__ == "__main__":
    sys.exit(main())
