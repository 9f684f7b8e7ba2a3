"""The training and evaluation loops: the loaders, one training epoch, and the one evaluation
(query/gallery features, then rga.metrics) that rga.train, rga.evaluate and rga.visualize ranks run.
Where they compute (device, precision, layout, process group) is rga.runtime's. Reads top to bottom."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from .errors import UsageError
from .extractor import FeatureExtractor
from .runtime import Runtime, autocast, progress, to_device
from .transforms import build_test_transform


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

@dataclass
class TrainStep:
    """What one optimisation step uses: the model as trained (DDP or compiled, maybe), the loss, the
    optimizer, the GradScaler of fp16 autocast (None otherwise) and an rga.divergence.LossWatch
    whose rule every batch's loss must pass (None: a fresh one)."""
    model: object
    criterion: object
    optimizer: object
    scaler: object | None = None
    loss_watch: object | None = None


def train_one_epoch(step: TrainStep, loader, rt: Runtime, *, show_progress=True, desc="train") -> dict:
    """One pass over `loader`. Returns the epoch's mean loss terms and accuracies (this rank's);
    FloatingPointError when a batch's loss breaks the loss watch's rule."""
    model, criterion, optimizer, scaler, loss_watch = (step.model, step.criterion, step.optimizer, step.scaler,
                                                       step.loss_watch)
    if loss_watch is None:
        from .divergence import LossWatch
        loss_watch = LossWatch()
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
        loss_watch.check(loss.detach())
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


@dataclass
class EvalFeatures:
    """The features an evaluation scored, in dataset order: what a ranked sheet draws from."""
    query: np.ndarray
    q_pids: np.ndarray
    q_camids: np.ndarray
    gallery: np.ndarray
    g_pids: np.ndarray
    g_camids: np.ndarray


def evaluate_model(model, dataset, spec: EvalSettings, rt: Runtime, *, return_features: bool = False):
    """Query/gallery features -> rga.metrics.evaluate_features: CMC ranks, mAP, mINP and the counts.
    The one evaluation of rga.train (Trainer.evaluate), rga.evaluate and rga.visualize ranks.
    `spec.feat` picks model.neck_feat for the duration. With ``return_features``: (metrics,
    EvalFeatures)."""
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
        feats = EvalFeatures(*parts[0], *parts[1])
        t1 = time.perf_counter()
        res = metrics.evaluate_features(feats.query, feats.gallery, feats.q_pids, feats.g_pids, feats.q_camids,
                                        feats.g_camids, metric=spec.metric, rerank=spec.rerank,
                                        device=rt.device if rt.device.type == "cuda" else None)
    finally:
        if old_feat is not None:
            model.neck_feat = old_feat
        model.train(was_training)
    cmc = np.asarray(res["cmc"], dtype=np.float64)

    def rank(k):
        return float(cmc[k - 1]) if len(cmc) >= k else float(cmc[-1]) if len(cmc) else 0.0

    out = {"R1": rank(1), "R5": rank(5), "R10": rank(10), "R20": rank(20), "mAP": float(res["mAP"]),
           "mINP": float(res["mINP"]), "cmc": [float(v) for v in cmc],
           "num_valid_queries": int(res["num_valid_queries"]),
           "num_query": len(dataset.query), "num_gallery": len(dataset.gallery),
           "num_test_ids": len(set(int(p) for p in feats.q_pids)),
           "feat": spec.feat, "metric": spec.metric, "rerank": bool(spec.rerank), "flip": bool(spec.flip),
           "extract_seconds": t1 - t0, "match_seconds": time.perf_counter() - t1}
    return (out, feats) if return_features else out


def format_metrics(m: dict) -> str:
    return (f"R1 {100 * m['R1']:.2f}%  R5 {100 * m['R5']:.2f}%  R10 {100 * m['R10']:.2f}%  "
            f"R20 {100 * m['R20']:.2f}%  mAP {100 * m['mAP']:.2f}%  mINP {100 * m['mINP']:.2f}%  "
            f"({m['num_valid_queries']} queries, {m['num_gallery']} gallery, {m['num_test_ids']} query ids; "
            f"chance R1 ~ {100 / max(m['num_test_ids'], 1):.2f}%)")
