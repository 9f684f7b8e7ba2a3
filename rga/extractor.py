"""A one-line feature extractor for deployment: images in, L2-normalized re-id features out.

    from rga import FeatureExtractor
    extract = FeatureExtractor("runs/quick")          # a run folder or checkpoint of rga.train
    feats = extract(["a.jpg", "b.jpg"])               # (2, D) float32 on the CPU, unit norm
    scores = feats @ feats.T                          # cosine similarity

Inputs: file paths, PIL images, HxWx3 uint8 arrays (one, or a list), a uint8 tensor of pixels
((3, H, W) or (N, 3, H, W), any size: resized and normalized like the arrays), or a float tensor
(N, 3, H, W) already resized and normalized like the test transform.

The model: a run folder or checkpoint (rebuilt by ``rga.checkpoint.load_model``, the one loader),
a model from ``rga.build_model``, or a file written by ``rga.export`` (``.onnx``, run in ONNX
Runtime; ``.pt2``, run by ``torch.export.load``) behind the same interface. This is the package's
feature loop for images: ``rga.search`` indexes and queries through it (``extract_files``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import load_model
from .data import read_image
from .runtime import autocast, prepare_batch, progress
from .transforms import build_test_transform

EXPORTED_SUFFIXES = (".onnx", ".pt2")  # files of rga.export


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
        trust_pickles: load an exported ``.pt2`` outside the accepted layout with
            ``torch.export.load`` (pickled entries can run code; see rga.exported.read_pt2_entries).
            Off: such a file is refused, and an accepted one is loaded without unpickling.
    """

    def __init__(self, model, *, device=None, feat: str = "bn", fused=None, height: int | None = None,
                 width: int | None = None, batch_size: int = 64, normalize: bool = True, hints: dict | None = None,
                 amp_dtype=None, channels_last: bool = False, trust_pickles: bool = False):
        if feat not in ("bn", "pool"):
            raise ValueError(f"feat must be 'bn' or 'pool', got {feat!r}")
        self.source = str(model) if isinstance(model, (str, Path)) else type(model).__name__
        self.kind, self.run, self.meta = "pytorch", None, None
        if isinstance(model, (str, Path)) and Path(model).suffix in EXPORTED_SUFFIXES:
            from .exported import load_exported

            self.run, meta = load_exported(model, trust_pickles=trust_pickles)
            self.meta = meta
            self.kind = meta["format"]
            height, width = height or int(meta["height"]), width or int(meta["width"])
            model = None
        elif isinstance(model, (str, Path)):
            model = load_model(model, fused=fused, neck_feat=feat, hints=hints)
        elif isinstance(model, nn.Module):
            if fused is not None and hasattr(model, "fused"):
                model.fused = fused
        elif model is not None:
            raise TypeError(f"model must be a checkpoint path, a run folder, an exported .onnx / .pt2 file or an "
                            f"nn.Module, got {type(model).__name__}")
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
        self.model = model.to(self.device).eval() if model is not None else None
        self.transform = build_test_transform(self.height, self.width)
        self.batch_size = batch_size
        self.normalize = normalize
        self.amp_dtype, self.channels_last = amp_dtype, channels_last

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """float32 features of one preprocessed batch, where the extractor runs (not normalized)."""
        if self.run is not None:
            return self.run(x).float()
        x = prepare_batch(x, self.device, self.channels_last)
        with autocast(self.device, self.amp_dtype):
            return self.model(x).float()

    def _finish(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(feats, dim=1) if self.normalize else feats

    def _batch(self, inputs) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor) and inputs.dtype == torch.uint8:
            # raw pixels (as torchvision.io.read_image gives them): (3, H, W) or (N, 3, H, W), any
            # size; they go through the test transform like arrays do (resize, scale, normalize)
            if inputs.dim() == 3:
                inputs = inputs.unsqueeze(0)
            if inputs.dim() != 4 or inputs.shape[1] != 3:
                raise ValueError(f"a uint8 tensor input must be (3, H, W) or (N, 3, H, W) pixels, "
                                 f"got {tuple(inputs.shape)}")
            inputs = [np.ascontiguousarray(t.permute(1, 2, 0).cpu().numpy()) for t in inputs]
        elif isinstance(inputs, torch.Tensor):
            if not inputs.is_floating_point():
                raise TypeError(f"a tensor input must be float (a preprocessed batch) or uint8 (pixels), "
                                f"got {inputs.dtype}")
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
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Features (N, D), float32 on the CPU, of a preprocessed batch, in chunks of batch_size."""
        return self._finish(torch.cat([self._features(batch[start:start + self.batch_size]).cpu()
                                       for start in range(0, batch.shape[0], self.batch_size)]))

    @torch.no_grad()
    def extract_loader(self, loader, *, flip: bool = False, show_progress: bool = False, desc: str = "features"):
        """Features of a DataLoader of (images, pids, camids, paths) batches (a test loader of
        rga.engine): (features (N, D) float32 CPU, pids (N,), camids (N,)). flip=True averages each
        image's feature with its mirror image's."""
        feats, pids, camids = [], [], []
        for imgs, pid, camid, _paths in progress(loader, total=len(loader), desc=desc, enabled=show_progress):
            f = self._features(imgs)
            if flip:
                f = (f + self._features(torch.flip(imgs, dims=[3]))) / 2
            feats.append(f.cpu())
            pids.append(torch.as_tensor(pid))
            camids.append(torch.as_tensor(camid))
        return self._finish(torch.cat(feats)), torch.cat(pids).numpy(), torch.cat(camids).numpy()

    def __call__(self, inputs) -> torch.Tensor:
        """Features (N, D), float32 on the CPU (unit L2 norm unless normalize=False)."""
        return self.forward(self._batch(inputs))

    def extract_files(self, paths, *, batch_size: int | None = None, progress: bool = False):
        """Features of the readable images among ``paths``, in batches: (features (K, D), kept
        paths, skipped [(path, reason)]). An unreadable file is named on stderr and skipped, never
        fatal. ``batch_size``: images per forward pass (default: the extractor's)."""
        batch_size = batch_size or self.batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        feats, kept, skipped, pending = [], [], [], []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(paths), desc="features", unit="img", dynamic_ncols=True, file=sys.stderr)

        def flush():
            if pending:
                feats.append(self.forward(torch.stack([t for _, t in pending])))
                kept.extend(p for p, _ in pending)
                if bar is not None:
                    bar.update(len(pending))
                pending.clear()

        for p in paths:
            try:
                pending.append((str(p), self.transform(read_image(p))))
            except Exception as e:  # noqa: BLE001 - any unreadable or undecodable file is skipped
                skipped.append((str(p), f"{type(e).__name__}: {e}"))
                print(f"skipped {p}: {e}", file=sys.stderr)
                if bar is not None:
                    bar.update(1)
            if len(pending) >= batch_size:
                flush()
        flush()
        if bar is not None:
            bar.close()
        return (torch.cat(feats) if feats else torch.empty(0, 0)), kept, skipped
