"""The models and images a figure reads: run folders, checkpoints or ``init:ARCH`` controls, and
image files with their person masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def open_model(spec, *, device="cpu", fused=None, backbone: str = "resnet18", height: int = 64, width: int = 32,
               num_classes: int = 751, seed: int = 0) -> nn.Module:
    """A model in eval mode from a run folder or checkpoint of rga.train, a model, or ``"init:ARCH"``.

    ``init:ARCH`` builds ARCH with random weights (``torch.manual_seed(seed)``) at the given
    backbone and input size: the untrained control of the foreground-ratio measurement.
    ``fused`` overrides the RGA path (the maps are the same either way). A model read from a run
    carries that run's configuration as ``model.run_config``.
    """
    from ..checkpoint import load_model as load_checkpoint_model
    from ..models import build_model

    if isinstance(spec, nn.Module):
        model = spec
    elif isinstance(spec, str) and spec.startswith("init:"):
        torch.manual_seed(seed)
        model = build_model(spec[5:], num_classes, height=height, width=width, backbone=backbone, pretrained=False)
    else:
        model, info = load_checkpoint_model(spec, with_info=True)
        name = Path(spec).name if Path(spec).is_dir() else Path(info.path).parent.name
        model.run_name = f"{name} ep{info.epoch}" if info.epoch is not None else name
        model.run_config = info.config  # the run's RunConfig (None for files of other trainers)
    if fused is not None:
        model.fused = fused
    if not hasattr(model, "run_config"):
        model.run_config = None
    if not hasattr(model, "run_name"):
        model.run_name = str(spec) if isinstance(spec, str) else type(model).__name__
    return model.to(device).eval()


def run_label(model) -> str:
    from ..registry import PAPER_LABELS
    return f"{PAPER_LABELS.get(model.variant, model.variant)} ({model.run_name})"


def load_images(paths, height: int, width: int):
    """(original RGB uint8 arrays, model input batch (N, 3, height, width), masks or None per image)."""
    from ..data import mask_path, read_image
    from ..transforms import build_test_transform

    tf = build_test_transform(height, width)
    originals, batch, masks = [], [], []
    for p in paths:
        img = read_image(p)
        originals.append(np.asarray(img))
        batch.append(tf(img))
        mp = Path(mask_path(str(p)))
        masks.append((np.asarray(read_image(mp).convert("L")) >= 128).astype(np.float32) if mp.is_file() else None)
    return originals, torch.stack(batch), masks


def dataset_images(dataset: str, data_root: str, split: str = "query", limit: int | None = None,
                   options: dict | None = None) -> list[str]:
    """The image paths of a split; ``options``: build_dataset keywords (a generated set made with other
    options would be generated anew with these, as in rga.train's --dataset-opt)."""
    from ..data import build_dataset
    ds = build_dataset(dataset, data_root, verbose=False, **(options or {}))
    items = getattr(ds, split)
    paths = [p for p, pid, _cam in items]
    return paths if limit is None else paths[:limit]


def stage_modules(model) -> dict[int, nn.Module]:
    """{stage: the attention module after that stage}, for the stages that have one."""
    mods = {}
    for i in range(1, 5):
        m = getattr(model.backbone, f"rga_att{i}", None)
        if m is not None and not isinstance(m, nn.Identity):
            mods[i] = m
    return mods


def open_models(args) -> list[nn.Module]:
    """The models a figure command compares: ``args.run`` and every ``--compare``, at the command's
    --backbone/--height/--width/--seed for ``init:ARCH`` controls."""
    kw = dict(backbone=args.backbone, height=args.height, width=args.width, seed=args.seed)
    return [open_model(spec, **kw) for spec in [args.run] + list(args.compare)]
