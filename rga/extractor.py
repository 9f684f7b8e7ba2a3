"""A one-line feature extractor for deployment: images in, L2-normalized re-id features out.

    from rga import FeatureExtractor
    extract = FeatureExtractor("runs/quick")          # a run folder or checkpoint of rga.train
    feats = extract(["a.jpg", "b.jpg"])               # (2, D) float32 on the CPU, unit norm
    scores = feats @ feats.T                          # cosine similarity

Inputs: file paths, PIL images, HxWx3 uint8 arrays (one, or a list), or a float tensor
(N, 3, H, W) already resized and normalized like the test transform.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import load_model
from .data import read_image
from .transforms import build_test_transform


class FeatureExtractor:
    """Re-id features from a trained model.

    Args:
        model: a run folder or checkpoint file written by ``rga.train`` or the public RGA training
            script (the network is rebuilt from it by ``rga.checkpoint.load_model``), or a model
            from ``rga.build_model``; height and width default to the model's.
        device: where to run (default: CUDA when available, else CPU).
        feat: "bn" (the BN-neck feature, the default for retrieval) or "pool".
        fused: override the checkpoint's RGA path (True, False or a backend name).
        hints: architecture fields for checkpoint files that do not record them (public files),
            e.g. ``{"height": 384, "width": 128}``; see ``rga.checkpoint.infer_model_config``.
        batch_size: images per forward pass.
        normalize: L2-normalize the features (default True).
    """

    def __init__(self, model, *, device=None, feat: str = "bn", fused=None, height: int | None = None,
                 width: int | None = None, batch_size: int = 64, normalize: bool = True, hints: dict | None = None):
        if feat not in ("bn", "pool"):
            raise ValueError(f"feat must be 'bn' or 'pool', got {feat!r}")
        if isinstance(model, (str, Path)):
            model = load_model(model, fused=fused, neck_feat=feat, hints=hints)
        elif isinstance(model, nn.Module):
            if fused is not None and hasattr(model, "fused"):
                model.fused = fused
        else:
            raise TypeError(f"model must be a checkpoint path, a run folder or an nn.Module, got {type(model).__name__}")
        h, w = getattr(model, "height", None), getattr(model, "width", None)
        self.height, self.width = height or h, width or w
        if not (self.height and self.width):
            raise ValueError("this model does not say its input size: pass height= and width=")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if hasattr(model, "neck_feat"):
            model.neck_feat = feat
        self.model = model.to(self.device).eval()
        self.transform = build_test_transform(self.height, self.width)
        self.batch_size = batch_size
        self.normalize = normalize

    def _batch(self, inputs) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            if inputs.dim() != 4 or inputs.shape[1] != 3 or tuple(inputs.shape[2:]) != (self.height, self.width):
                raise ValueError(f"a tensor input must be a preprocessed batch (N, 3, {self.height}, {self.width}), "
                                 f"got {tuple(inputs.shape)}")
            return inputs.float()
        items: Sequence = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if not items:
            raise ValueError("no images given")
        tensors = []
        for i, item in enumerate(items):
            if isinstance(item, (str, Path)):
                item = read_image(item)
            elif isinstance(item, np.ndarray) and not (item.ndim == 3 and item.shape[2] == 3 and item.dtype == np.uint8):
                raise ValueError(f"image {i}: an array must be H x W x 3 uint8, got {item.shape} {item.dtype}")
            try:
                tensors.append(self.transform(item))
            except TypeError as e:
                raise TypeError(f"image {i}: expected a path, a PIL image or an H x W x 3 uint8 array, "
                                f"got {type(item).__name__}") from e
        return torch.stack(tensors)

    @torch.no_grad()
    def __call__(self, inputs) -> torch.Tensor:
        """Features (N, D), float32 on the CPU (unit L2 norm unless normalize=False)."""
        batch = self._batch(inputs)
        out = []
        for start in range(0, batch.shape[0], self.batch_size):
            x = batch[start:start + self.batch_size].to(self.device)
            out.append(self.model(x).float().cpu())
        feats = torch.cat(out)
        return torch.nn.functional.normalize(feats, dim=1) if self.normalize else feats
