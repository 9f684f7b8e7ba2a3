"""Checkpoints: writing (atomically, through rga.fileio), finding the latest, the RNG states a resumed run needs, and
``load_model``: the network of any checkpoint we can read, rebuilt from the file alone.

Checkpoint layouts that load_model reads:

* format 2 (rga.train now): ``format_version``, ``config`` (``RunConfig.to_dict()``),
  ``num_classes``, ``model`` (the state_dict), plus the training state (optimizer, ...);
* format 1 (rga.train before the typed config): the same with ``config`` = the flat argparse
  namespace (``arch``, ``backbone``, ``height``, ...) and no ``format_version``;
* the public RGA code's training script: ``{'state_dict', 'epoch', 'best_top1', 'optimizer'}``
  (weights saved from ``nn.DataParallel`` carry a ``module.`` prefix); and a bare state_dict. Their
  architecture is read from the weights (backbone, stages, RGA-S / RGA-C / both, relation /
  original / embedding, number of classes, input size); what the weights cannot say (the order of
  RGA-SC vs RGA-CS, ratios other than 8, a non-2:1 input) comes from ``hints``.
"""
from __future__ import annotations

import random
from pathlib import Path

from dataclasses import dataclass, replace

import numpy as np
import torch

from .config import ARCH_FIELDS, ConfigError, ModelConfig, RunConfig, from_legacy
from .errors import CheckpointError
from .fileio import (CKPT_PATTERN, checkpoint_name, extract_model_state, find_latest, list_checkpoints,  # noqa: F401
                     load_torch, resolve_checkpoint, save_torch)
from .models import build_from_config, stage_sizes

#: of the checkpoint layout: 2 = RunConfig.to_dict() as "config"; 1 = the flat argparse config of
#: earlier versions (read through rga.config.from_legacy)
FORMAT_VERSION = 2


def atomic_save(obj, path) -> Path:
    """torch.save to `path` atomically (rga.fileio.atomic_write): a crash leaves the old file or the
    new one; a failed write is a CheckpointError naming the file and the operating system's reason."""
    return save_torch(obj, path, what="checkpoint", error=CheckpointError)


@dataclass
class TrainingParts:
    """The objects whose state a training checkpoint holds, so that a resume continues exactly."""
    model: object
    optimizer: object
    scheduler: object
    sampler: object
    scaler: object | None  # a GradScaler under fp16 autocast, else None
    num_classes: int
    world_size: int = 1


def save_training_checkpoint(folder, epoch: int, parts: TrainingParts, *, config: dict, rng, metrics: dict,
                             keep: int = 0, data: dict | None = None) -> Path:
    """Write ``checkpoint_epNNNN.pth`` (format FORMAT_VERSION: the run's config, the weights, and the
    training state a resume needs) atomically into `folder`, then keep the newest `keep` (0: all).
    `data`: the fingerprint of the training data (rga.data.check.data_fingerprint)."""
    state = {"format_version": FORMAT_VERSION, "config": config, "num_classes": parts.num_classes, "epoch": epoch,
             "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
             "scheduler": parts.scheduler.state_dict(), "sampler": parts.sampler.state_dict(),
             "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
             "rng": rng, "metrics": metrics, "world_size": parts.world_size, "torch_version": str(torch.__version__)}
    if data is not None:
        state["data_fingerprint"] = data
    path = atomic_save(state, Path(folder) / checkpoint_name(epoch))
    prune_checkpoints(folder, keep)
    return path


def prune_checkpoints(folder, keep: int) -> None:
    """Delete all but the newest `keep` checkpoint_epNNNN.pth files (keep <= 0: keep all)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(folder)[:-keep]:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint dict, read safely (rga.fileio.load_torch: weights_only=True, clear errors)."""
    return load_torch(path, map_location, what="checkpoint", error=CheckpointError)


def _numpy_state_to_plain(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_from_plain(state):
    if isinstance(state, dict):
        keys = state["keys"].numpy() if hasattr(state["keys"], "numpy") else np.asarray(state["keys"])
        return (state["name"], keys.astype(np.uint32), state["pos"], state["has_gauss"], state["cached_gaussian"])
    return state  # a legacy tuple


def capture_rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain values (weights_only-safe)."""
    state = {"python": random.getstate(), "numpy": _numpy_state_to_plain(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------------------------
# load_model: the network of a checkpoint, from the file alone
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelCheckpoint:
    """What a checkpoint says about its network (read by read_model_checkpoint)."""
    path: Path | None
    kind: str                 # "rga.train format 2", "rga.train format 1", "public training script", "state_dict"
    model: ModelConfig        # the architecture (and the run's pretrained / fused settings)
    num_classes: int
    state: dict               # the model's state_dict, wrapper prefixes stripped
    epoch: int | None
    config: RunConfig | None  # the whole run's config, for checkpoints of rga.train
    raw: dict                 # everything the file holds


def _public_input_size(hw: int, stage: int, hints: dict):
    """(height, width) whose stage-`stage` feature map has `hw` positions: the hinted size, else
    256x128 (the public code's), else the 2:1 size (a multiple of 16) that fits."""
    def fits(h, w):
        sh, sw = stage_sizes(h, w)[stage - 1]
        return sh * sw == hw

    if "height" in hints or "width" in hints:
        h, w = hints.get("height", 256), hints.get("width", 128)
        if not fits(h, w):
            raise CheckpointError(f"the checkpoint's stage-{stage} attention is for {hw} positions, which a "
                                  f"{h}x{w} input does not give; pass the --height and --width it was trained at")
        return h, w
    for h, w in [(256, 128)] + [(2 * w, w) for w in range(16, 1025, 16)]:
        if fits(h, w):
            return h, w
    raise CheckpointError(f"cannot tell the input size of this checkpoint (stage-{stage} attention for {hw} "
                          "positions); pass the --height and --width it was trained at")


def infer_model_config(state: dict, hints: dict | None = None):
    """(ModelConfig, num_classes) of a ResNet(+RGA) state_dict without a saved config (the public
    training script's files, bare state_dicts). ``hints``: architecture fields the weights do not
    determine (``variant`` for the order of a two-branch model, ratios, height/width)."""
    hints = dict(hints or {})
    if "cls.weight" not in state or "backbone.conv1.weight" not in state:
        raise CheckpointError("not a ResNet + RGA re-id state_dict (no backbone.conv1.weight / cls.weight); "
                              "expected the weights of rga.models.ResNetRGA or of the public RGA code's model")
    num_classes = int(state["cls.weight"].shape[0])
    values = {k: v for k, v in hints.items() if k in ARCH_FIELDS}
    values.setdefault("backbone", "resnet50" if "backbone.layer1.0.conv3.weight" in state else "resnet18")
    stages = tuple(i for i in range(1, 5) if any(k.startswith(f"backbone.rga_att{i}.") for k in state))
    if not stages:
        values.update(variant="baseline")
        values.setdefault("height", 256)
        values.setdefault("width", 128)
        return replace(ModelConfig(), **values), num_classes
    att = f"backbone.rga_att{stages[0]}."
    spatial = any(k.startswith(att) and "_spatial." in k for k in state)
    channel = any(k.startswith(att) and "_channel." in k for k in state)
    if spatial and channel:
        variant = values.get("variant", "rga_sc")  # the order is not in the weights; the public code's is sc
        if variant not in ("rga_sc", "rga_cs", "rga_s_par_c"):
            raise CheckpointError(f"the checkpoint has spatial and channel attention; --model {variant} has not")
    else:
        variant = "rga_s" if spatial else "rga_c"
        if values.get("variant", variant) != variant:
            raise CheckpointError(f"the checkpoint's attention is {variant}, not {values['variant']}")
    branch = "spatial" if spatial else "channel"
    values["variant"] = variant
    values["stages"] = stages
    values["use_relation"] = f"{att}gg_{branch}.0.weight" in state
    values["use_original"] = f"{att}gx_{branch}.0.weight" in state
    if values["use_relation"]:  # without relations there are no theta / phi: the embedding is moot
        values["embedding"] = ("asymmetric" if f"{att}phi_{branch}.0.weight" in state else
                               "symmetric" if f"{att}theta_{branch}.0.weight" in state else "none")
    if spatial and values["use_relation"]:
        hw = int(state[f"{att}gg_spatial.0.weight"].shape[1]) // 2
    elif channel:
        key = next(f"{att}{n}_channel.0.weight" for n in ("gx", "theta", "phi", "gg")
                   if f"{att}{n}_channel.0.weight" in state)
        hw = int(state[key].shape[1]) // (2 if "gg_" in key else 1)
    else:  # spatial attention from the original feature alone: the weights do not depend on H, W
        hw = None
    if hw is None:
        values.setdefault("height", 256)
        values.setdefault("width", 128)
    else:
        values["height"], values["width"] = _public_input_size(hw, stages[0], values)
    hinted = {k: v for k, v in hints.items() if k in ("stages", "use_relation", "use_original", "embedding")}
    differ = [f"{k}={v!r} (the weights have {values[k]!r})" for k, v in hinted.items()
              if (tuple(v) if k == "stages" else v) != values[k]]
    if differ:
        raise CheckpointError("the checkpoint's weights contradict " + ", ".join(differ))
    try:
        return replace(ModelConfig(), **values), num_classes
    except TypeError as e:
        raise CheckpointError(f"bad architecture hint: {e}") from None


def read_model_checkpoint(source, *, hints: dict | None = None) -> ModelCheckpoint:
    """Read a checkpoint file, a run folder (its newest checkpoint) or an already-loaded checkpoint
    dict, and say which network it holds. For checkpoints that record their architecture,
    ``hints`` must agree with it (a CheckpointError names the fields that differ)."""
    hints = dict(hints or {})
    if isinstance(source, dict):
        path, raw = None, source
    else:
        path = resolve_checkpoint(source)
        raw = load_checkpoint(path)
    where = str(path) if path is not None else "the checkpoint"
    state = extract_model_state(raw)
    version = raw.get("format_version")
    saved = raw.get("config")
    try:
        if version is not None:
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise CheckpointError(f"{where} has checkpoint format {version!r}; this version of rga reads "
                                      f"formats 1 to {FORMAT_VERSION} (update rga)")
            config, kind = RunConfig.from_dict(saved, f"{where}: config"), f"rga.train format {version}"
        elif isinstance(saved, dict) and saved:
            config, kind = from_legacy(saved), "rga.train format 1"
        else:
            config, kind = None, ("public training script" if "state_dict" in raw else "state_dict")
    except ConfigError as e:
        raise CheckpointError(f"{where}: its saved config cannot be read: {e}") from e
    if config is not None:
        model_cfg = config.model
        num_classes = raw.get("num_classes")
        if num_classes is None:
            raise CheckpointError(f"{where} has a config but no num_classes")
        differ = {k: (getattr(model_cfg, k), v) for k, v in hints.items()
                  if k in ARCH_FIELDS and getattr(model_cfg, k) != v}
        if differ:
            raise CheckpointError(f"{where} holds a {model_cfg.label()} network; "
                                  + ", ".join(f"{k}={v!r} differs from its {k}={old!r}" for k, (old, v) in differ.items())
                                  + ". The architecture comes from the checkpoint: drop these options")
    else:
        model_cfg, num_classes = infer_model_config(state, hints)
    epoch = raw.get("epoch")
    return ModelCheckpoint(path=path, kind=kind, model=model_cfg, num_classes=int(num_classes), state=state,
                           epoch=int(epoch) if isinstance(epoch, (int, float)) else None, config=config, raw=raw)


def load_model(source, *, fused=None, neck_feat: str = "bn", hints: dict | None = None, with_info: bool = False):
    """The network of a checkpoint, rebuilt from the file alone, weights loaded (strict), in eval mode.

    source: a checkpoint file (any layout in this module's docstring), a run folder of rga.train
    (its newest checkpoint), a loaded checkpoint dict, or a ModelCheckpoint.
    fused: the RGA path (True, False or a backend name); default: fused if the run trained fused.
    hints: architecture fields for files that do not record them (see infer_model_config).
    with_info: also return the ModelCheckpoint (path, kind, configs, epoch, raw contents).
    """
    info = source if isinstance(source, ModelCheckpoint) else read_model_checkpoint(source, hints=hints)
    if fused is None:
        fused = bool(info.model.fused)  # a backend named at training time may not exist here: auto
    where = str(info.path) if info.path is not None else "the checkpoint"
    try:
        model = build_from_config(info.model, info.num_classes, pretrained=False, neck_feat=neck_feat, fused=fused)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where}: cannot build its network ({info.model.label()}): {e}") from e
    try:
        model.load_state_dict(info.state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{where} ({info.kind}) does not fit the {info.model.label()} / "
                              f"{info.model.backbone} {info.model.height}x{info.model.width} network it "
                              f"describes: {' '.join(first[:3])}") from e
    model.eval()
    return (model, info) if with_info else model
