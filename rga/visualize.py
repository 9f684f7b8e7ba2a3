"""The paper's figures for your own runs: attention (Fig. 1), relations (Fig. 4), Grad-CAM (Fig. 5), ranked lists, CMC.

    python -m rga.visualize attention RUN [IMAGES...] [--dataset synthetic --limit 200] [--compare RUN2]
                                      [--stretch per-map] --out DIR
    python -m rga.visualize relation RUN IMAGE [--compare RUN2] [--targets R,C R,C R,C] [--stage 1] --out DIR
    python -m rga.visualize gradcam RUN IMAGES... [--compare RUN2] --out DIR
    python -m rga.visualize ranks RUN [--dataset synthetic] [--top 10] [--num-queries 8] --out DIR

RUN is a run folder or checkpoint of ``rga.train``, or ``init:ARCH`` for a randomly initialised model
(with ``--backbone/--height/--width``, default the quick preset's resnet18 at 64x32), the
"untrained" control. Needs matplotlib (``pip install -e ".[vis]"``); ``gradcam`` also needs the
``grad-cam`` package (import ``pytorch_grad_cam``).

The attention maps come from the model's own forward: every attention module after a stage
(``RGAModule`` or a Table 2 design of ``rga.attention``) has a ``keep_attention`` switch, and
after a forward ``module.last_attention`` holds its (detached) maps.

Foreground attention ratio (Fig. 1 as a number, on images with a person mask such as the
synthetic set's): the share of a spatial attention map's mass that falls inside the person mask,
divided by the share of the image the mask covers, ``(Σ a·m / Σ a) / mean(m)``, computed on the
feature grid with the mask area-averaged onto it. 1.0 means no preference for the person, 2.0
means the person gets twice its share.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import run_cli
from .fileio import save_figure, write_text

__all__ = ["open_model", "attention_maps", "foreground_ratio", "overlay", "map_range", "figure_texts",
           "attention_figure", "relation_maps", "position_invariance", "relation_figure", "top_classes",
           "gradcam_maps", "gradcam_figure", "rank_sheet", "plot_cmc", "main"]

GREEN, RED, GREY = (0, 170, 0), (220, 0, 0), (128, 128, 128)


def _plt():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - the vis extra is missing
        raise ImportError('rga.visualize needs matplotlib: pip install -e ".[vis]" (or pip install matplotlib)') from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------------------------
# models and images
# ----------------------------------------------------------------------------------------------

def open_model(spec, *, device="cpu", fused=None, backbone: str = "resnet18", height: int = 64, width: int = 32,
               num_classes: int = 751, seed: int = 0) -> nn.Module:
    """A model in eval mode from a run folder or checkpoint of rga.train, a model, or ``"init:ARCH"``.

    ``init:ARCH`` builds ARCH with random weights (``torch.manual_seed(seed)``) at the given
    backbone and input size: the untrained control of the foreground-ratio measurement.
    ``fused`` overrides the RGA path (the maps are the same either way).
    """
    from .checkpoint import load_model as load_checkpoint_model
    from .models import build_model

    if isinstance(spec, nn.Module):
        model = spec
    elif isinstance(spec, str) and spec.startswith("init:"):
        torch.manual_seed(seed)
        model = build_model(spec[5:], num_classes, height=height, width=width, backbone=backbone, pretrained=False)
    else:
        model, info = load_checkpoint_model(spec, with_info=True)
        name = Path(spec).name if Path(spec).is_dir() else Path(info.path).parent.name
        model.run_name = f"{name} ep{info.epoch}" if info.epoch is not None else name
    if fused is not None:
        model.fused = fused
    if not hasattr(model, "run_name"):
        model.run_name = str(spec) if isinstance(spec, str) else type(model).__name__
    return model.to(device).eval()


def _label(model) -> str:
    from .registry import PAPER_LABELS
    return f"{PAPER_LABELS.get(model.variant, model.variant)} ({model.run_name})"


def load_images(paths, height: int, width: int):
    """(original RGB uint8 arrays, model input batch (N, 3, height, width), masks or None per image)."""
    from .data import mask_path, read_image
    from .transforms import build_test_transform

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
    from .data import build_dataset
    ds = build_dataset(dataset, data_root, verbose=False, **(options or {}))
    items = getattr(ds, split)
    paths = [p for p, pid, _cam in items]
    return paths if limit is None else paths[:limit]


# ----------------------------------------------------------------------------------------------
# attention maps and the foreground ratio (Fig. 1)
# ----------------------------------------------------------------------------------------------

def _stage_modules(model) -> dict[int, nn.Module]:
    mods = {}
    for i in range(1, 5):
        m = getattr(model.backbone, f"rga_att{i}", None)
        if m is not None and not isinstance(m, nn.Identity):
            mods[i] = m
    return mods


@torch.no_grad()
def attention_maps(model, images: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """{stage: {"spatial": (B,1,h,w), "channel": (B,C,1,1), ...}} from one eval-mode forward of ``model``."""
    mods = _stage_modules(model)
    old = {i: getattr(m, "keep_attention", False) for i, m in mods.items()}
    was_training = model.training
    try:
        for m in mods.values():
            m.keep_attention = True
            m.last_attention = {}
        model.eval()
        model(images)
        out = {}
        for i, m in mods.items():
            kept = getattr(m, "last_attention", None)
            if kept:
                out[i] = {k: v.float().cpu() for k, v in kept.items()}
        return out
    finally:
        for i, m in mods.items():
            m.keep_attention = old[i]
            m.last_attention = {}
        model.train(was_training)


def foreground_ratio(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(Σ a·m / Σ a) / mean(m) per image. attention (B, 1, h, w) >= 0; mask (B, 1, H, W) in [0, 1].

    The mask is area-averaged onto the attention's grid (each cell: the fraction of its pixels
    inside the mask). 1.0: no preference; NaN where the mask is empty.
    """
    if attention.dim() != 4 or attention.shape[1] != 1:
        raise ValueError(f"attention must be (B, 1, h, w), got {tuple(attention.shape)}")
    mask = mask.to(attention.dtype)
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.shape[2:] != attention.shape[2:]:
        mask = F.interpolate(mask, size=attention.shape[2:], mode="area")
    a = attention.flatten(1).double()
    m = mask.flatten(1).double()
    share = (a * m).sum(1) / a.sum(1)
    cover = m.mean(1)
    return torch.where(cover > 0, share / cover, torch.full_like(share, float("nan"))).to(attention.dtype)


def overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet",
            vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """The RGB uint8 ``image`` blended with ``heat`` (any 2-D size, upsampled bilinearly) in a colour map.

    The heat map is scaled to [0, 1] by vmin/vmax (default: its own min and max; a constant map
    shows as the colour map's middle).
    """
    plt = _plt()
    heat = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None, None]
    h, w = image.shape[:2]
    heat = F.interpolate(heat, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    lo = float(heat.min()) if vmin is None else vmin
    hi = float(heat.max()) if vmax is None else vmax
    norm = np.full_like(heat, 0.5) if hi - lo < 1e-12 else np.clip((heat - lo) / (hi - lo), 0, 1)
    colour = plt.get_cmap(cmap)(norm)[..., :3] * 255.0
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * colour, 0, 255).astype(np.uint8)


FLAT = 0.01  # a map whose values span less than this is labelled "flat" (gates live in 0..1)
STRETCHES = ("shared", "per-map")


def figure_texts(fig) -> list[str]:
    """Every non-empty text of a matplotlib figure (titles, axis and colour-bar labels, ticks), in drawing order."""
    from matplotlib.text import Text
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def _finish(fig, path, labels, **kw) -> Path:
    """Record the figure's texts in ``labels`` (a list, when given), then write it."""
    if labels is not None:
        labels.extend(figure_texts(fig))
    return save_figure(fig, path, **kw)


def _heading(fig, text: str, fontsize: float = 7) -> None:
    """A figure title wrapped to the figure's width."""
    import textwrap
    chars = max(20, int(fig.get_figwidth() * 72 / (0.55 * fontsize)))
    fig.suptitle("\n".join(textwrap.wrap(text, chars)), fontsize=fontsize)


def _colorbar(fig, axes, lo: float, hi: float, label: str, cmap: str = "jet"):
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    bar = fig.colorbar(ScalarMappable(Normalize(lo, hi), cmap=cmap), ax=axes, shrink=0.5, aspect=25, pad=0.02)
    bar.set_label(label, fontsize=6)
    bar.ax.tick_params(labelsize=6)
    return bar


def map_range(a) -> str:
    """'range 0.12–0.88', or 'flat: range 0.500–0.500' for a map that spans less than FLAT."""
    lo, hi = float(np.min(a)), float(np.max(a))
    return f"flat: range {lo:.3f}–{hi:.3f}" if hi - lo < FLAT else f"range {lo:.2f}–{hi:.2f}"


def attention_figure(originals, runs, path, *, stages=None, ratios=None, stretch: str = "shared",
                     labels: list | None = None) -> Path:
    """Rows: images; columns: the image, then each run's spatial attention at each stage.

    ``stretch="shared"`` (default): every overlay uses one colour scale, the min..max over all the
    maps drawn, shown by the colour bar, so a near-flat map looks flat. ``"per-map"``: each
    overlay spans its own min..max, which makes weak contrasts visible and exaggerates them.
    Above each map: its range ("flat: ..." when it spans less than FLAT) and, with ``ratios``,
    its foreground ratio. runs: [(label, {stage: (B,1,h,w)})]; ratios: optional
    [(label, {stage: (B,) tensor})]; labels: a list that receives the figure's texts.
    """
    if stretch not in STRETCHES:
        raise ValueError(f"stretch must be one of {STRETCHES}, got {stretch!r}")
    plt = _plt()
    cols = [("image", None, None)]
    for r, (label, maps) in enumerate(runs):
        for s in sorted(maps):
            if stages is None or s in stages:
                cols.append((label, s, r))
    n = len(originals)
    drawn = [runs[r][1][s][:n].float() for _, s, r in cols[1:]]
    lo = min((float(a.min()) for a in drawn), default=0.0)
    hi = max((float(a.max()) for a in drawn), default=1.0)
    if hi - lo < 1e-6:  # everything flat: centre the scale on it
        lo, hi = lo - 0.05, hi + 0.05
    fig, axes = plt.subplots(n, len(cols), figsize=(1.3 * len(cols) + 0.6, 2.3 * n + 0.9), squeeze=False,
                             layout="constrained")
    for i, img in enumerate(originals):
        for j, (label, s, r) in enumerate(cols):
            ax = axes[i, j]
            ax.axis("off")
            if s is None:
                ax.imshow(img)
                if i == 0:
                    ax.set_title("input image", fontsize=7)
                continue
            a = runs[r][1][s][i, 0].float().numpy()
            ax.imshow(overlay(img, a, vmin=lo, vmax=hi) if stretch == "shared" else overlay(img, a))
            title = f"{label.replace(' (', chr(10) + '(')}\nstage {s}\n" if i == 0 else ""
            title += map_range(a)
            if ratios is not None and s in ratios[r][1]:
                title += f"\nfg ratio {float(ratios[r][1][s][i]):.2f}"
            ax.set_title(title, fontsize=6)
    if stretch == "shared":
        _heading(fig, "Spatial attention (gate values) after each stage, all maps on one colour scale; "
                      f"'flat': a map that spans less than {FLAT}")
        _colorbar(fig, axes, lo, hi, "attention (one scale for all maps)")
    else:
        _heading(fig, "Spatial attention (gate values) after each stage, each map stretched to its own "
                      "min–max (printed above it): small differences look large")
        _colorbar(fig, axes, 0.0, 1.0, "position in the map's own range (0: its min, 1: its max)")
    return _finish(fig, path, labels, dpi=110)


def spatial_maps(model, batch) -> dict[int, torch.Tensor]:
    maps = attention_maps(model, batch)
    return {s: d["spatial"] for s, d in maps.items() if "spatial" in d}


# ----------------------------------------------------------------------------------------------
# relation values R(i, :) (Fig. 4)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def relation_maps(model, image: torch.Tensor, stage: int, targets) -> tuple[np.ndarray, str]:
    """The relation values from every position w.r.t. each target position at one stage.

    image: (1, 3, H, W) model input; targets: [(row, col)] on that stage's feature grid.
    Returns (maps (T, h, w), what): for an RGA module with a spatial branch, R(i, :) = θ_iᵀ φ_j
    from the module's own embeddings of the input its spatial branch sees; for NL, the softmax
    weights f(i, :) (NonLocal.relation).
    """
    from .attention import NonLocal
    from .modules import RGAModule

    mods = _stage_modules(model)
    if stage not in mods:
        raise ValueError(f"{model.variant} has no attention module at stage {stage}")
    module = mods[stage]
    if isinstance(module, RGAModule) and not module.use_spatial:
        raise ValueError(f"{model.variant} has no spatial RGA branch: no spatial relations to show")
    if not isinstance(module, (RGAModule, NonLocal)):
        raise ValueError(f"{model.variant} ({type(module).__name__}) computes no pairwise relations; "
                         "use an RGA model with a spatial branch or nl")
    seen = {}

    def grab(_m, args):
        seen["x"] = args[0]

    handle = module.register_forward_pre_hook(grab)
    was_keep = getattr(module, "keep_attention", False)
    try:
        module.keep_attention = True
        model.eval()
        model(image)
    finally:
        handle.remove()
        module.keep_attention = was_keep
    x = seen["x"]
    b, _, h, w = x.shape
    if isinstance(module, NonLocal):
        rel, what = module.relation(x), "NL: softmax weights f(i, j)"
    else:
        if module.use_channel and module.order == "cs":  # the spatial branch sees the channel-gated input
            x = x * module.last_attention["channel"].to(x.dtype)
        if not module.use_relation:
            raise ValueError("this RGA module was built without relations (use_relation=False)")
        theta, phi = module._embed_reference("spatial", x, b)
        rel, what = theta.transpose(1, 2) @ phi, "RGA spatial branch: R(i, j) = θ_iᵀφ_j"
    module.last_attention = {}
    out = []
    for r, c in targets:
        if not (0 <= r < h and 0 <= c < w):
            raise ValueError(f"target ({r}, {c}) is outside the {h}x{w} grid of stage {stage}")
        out.append(rel[0, r * w + c].reshape(h, w).float().cpu().numpy())
    return np.stack(out), what


def position_invariance(maps: np.ndarray) -> float:
    """Mean Pearson correlation between the relation maps of different targets (1.0: identical maps)."""
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    corr = np.corrcoef(flat)
    iu = np.triu_indices(len(maps), 1)
    return float(np.nanmean(corr[iu]))


def default_targets(h: int, w: int):
    """Three positions: upper body, middle, lower body (rows at 25%, 50%, 80%; centre-ish columns)."""
    return [(int(h * 0.25), w // 2), (int(h * 0.5), max(0, w // 2 - 1)), (int(h * 0.8), w // 4)]


def relation_figure(original, rows, targets, grid, path, *, stage: int = 1, labels: list | None = None) -> Path:
    """rows: [(label, maps (T, h, w), invariance)]; a red square marks each target (Fig. 4's layout).

    targets are (row, col) cells of ``stage``'s feature grid ``grid`` = (h, w), which the title and
    each map's caption name. Each map's colours span its own min..max (RGA's dot products and NL's
    softmax weights have different units). labels: a list that receives the figure's texts.
    """
    plt = _plt()
    from matplotlib.patches import Rectangle

    h, w = grid
    ih, iw = original.shape[:2]
    fig, axes = plt.subplots(len(rows), len(targets), figsize=(1.6 * len(targets) + 0.6, 2.9 * len(rows) + 0.9),
                             squeeze=False, layout="constrained")
    for r, (label, maps, inv) in enumerate(rows):
        for t, (tr, tc) in enumerate(targets):
            ax = axes[r, t]
            ax.imshow(overlay(original, maps[t], alpha=0.6))
            ax.add_patch(Rectangle((tc * iw / w, tr * ih / h), iw / w, ih / h, fill=False, edgecolor="red", lw=1.5))
            ax.axis("off")
            head = f"{label}\ninvariance {inv:.2f}\n" if t == 0 else "\n\n"
            ax.set_title(head + f"target ({tr},{tc}) of {h}×{w}", fontsize=6)
    _heading(fig, f"Relation values from every position to a target cell (red square) at stage {stage}: "
                  f"target (row, col) is a cell of stage {stage}'s {h}×{w} feature grid (input {ih}×{iw}); "
                  "invariance: mean correlation between the targets' maps")
    _colorbar(fig, axes, 0.0, 1.0, "position in the map's own range (0: min, 1: max)")
    return _finish(fig, path, labels, dpi=120)


# ----------------------------------------------------------------------------------------------
# Grad-CAM (Fig. 5), through the grad-cam package
# ----------------------------------------------------------------------------------------------

class LogitsModel(nn.Module):
    """The re-id model as a plain classifier for pytorch_grad_cam: images -> ID logits, in eval mode.

    ``ResNetRGA`` returns a (pooled, bn, logits) tuple in train mode and a feature in eval mode;
    Grad-CAM wants one logits tensor, computed with the BN running statistics.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        m = self.model
        return m.cls(m.feat_bn(m.backbone(x).mean((2, 3))))


@torch.no_grad()
def top_classes(model, images: torch.Tensor) -> list[int]:
    """Each image's highest-scoring training identity (the class Grad-CAM explains by default)."""
    model.eval()
    return LogitsModel(model)(images).argmax(1).tolist()


def gradcam_maps(model, images: torch.Tensor, target_layer=None, classes=None) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of the final stage (after its attention), (B, H, W) in [0, 1].

    The target is ``classes`` (one training identity per image), by default each image's
    highest-scoring training identity (``top_classes``; the usual choice for re-id models, whose
    test identities are not among the classes). Uses ``pytorch_grad_cam.GradCAM``, which scales
    each image's map to 0..1.
    """
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as e:  # pragma: no cover
        raise ImportError("gradcam needs the grad-cam package: pip install grad-cam (or the [vis] extra)") from e
    model.eval()
    if classes is None:
        classes = top_classes(model, images)
    layer = target_layer if target_layer is not None else model.backbone.rga_att4
    with GradCAM(model=LogitsModel(model), target_layers=[layer]) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes])


def gradcam_figure(originals, runs, path, ratios=None, classes=None, labels: list | None = None) -> Path:
    """Rows: images; columns: the image, then each run's Grad-CAM, on one 0..1 colour scale.

    runs: [(label, (B, H, W))]; ratios: per run, per image foreground ratios; classes: per run, per
    image the training identity explained (printed above each map); labels: a list that
    receives the figure's texts.
    """
    plt = _plt()
    n = len(originals)
    fig, axes = plt.subplots(n, 1 + len(runs), figsize=(1.9 * (1 + len(runs)) + 0.6, 2.4 * n + 0.9),
                             squeeze=False, layout="constrained")
    for i, img in enumerate(originals):
        axes[i, 0].imshow(img)
        axes[i, 0].axis("off")
        if i == 0:
            axes[i, 0].set_title("input image", fontsize=7)
        for j, (label, cams) in enumerate(runs, start=1):
            axes[i, j].imshow(overlay(img, cams[i], vmin=0.0, vmax=1.0))
            axes[i, j].axis("off")
            title = [label.replace(" (", "\n(")] if i == 0 else []
            if classes is not None:
                title.append(f"class {classes[j - 1][i]}")
            if ratios is not None and not np.isnan(ratios[j - 1][i]):
                title.append(f"fg ratio {ratios[j - 1][i]:.2f}")
            axes[i, j].set_title("\n".join(title), fontsize=6)
    _heading(fig, "Grad-CAM of the last stage (after its attention) for the class each model scores highest on "
                  "the image ('class k': training identity k); each map scaled to 0–1")
    _colorbar(fig, axes, 0.0, 1.0, "Grad-CAM (0–1 per map)")
    return _finish(fig, path, labels, dpi=110)


# ----------------------------------------------------------------------------------------------
# ranked lists and CMC (torchreid's visrank, in our own layout)
# ----------------------------------------------------------------------------------------------

def _font(size: int):
    """PIL's default font at ``size`` pixels (a scalable one since Pillow 10.1; the fixed bitmap font before)."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType
        return ImageFont.load_default()


def rank_sheet(queries, ranked, path, *, cell=(128, 64), border: int = 4, gap: int = 12, title: str | None = None,
               metric: str = "cosine distance", font_size: int = 10) -> dict:
    """One sheet: a header (title, colour legend), then a row per query: the query, then its ranked gallery images.

    queries: [(image path, pid)] or [(image path, pid, camid)]; ranked: per query [(image path, pid)]
    or [(image path, pid, distance)] in rank order. Each gallery image gets a green border if its
    pid equals the query's, red otherwise; the query a grey one. Above each image: the query's
    identity (and camera), or the rank, the identity and the distance (``metric``) to the query.
    Returns the layout: {"path", "size", "cells": [[(x0, y0, x1, y1, colour), ...] per row]}
    (outer border boxes) and "texts" (every text drawn), for checking.
    """
    from PIL import Image, ImageDraw

    from .data import read_image

    ch, cw = cell
    font = _font(font_size)
    lh = font_size + 3  # line height
    top = max((len(r) for r in ranked), default=0)
    with_dist = any(len(item) > 2 for row in ranked for item in row)
    header = ([title] if title else []) + ["", ""]  # the legend takes the last two lines
    legend = [(GREY, "query"), (GREEN, "same identity as the query"), (RED, "another identity")]
    note = "above each image: rank, identity" + (f" and {metric} to the query (lower: closer)" if with_dist else "")
    header_h = len(header) * lh + 6
    row_h = 2 * lh + ch + 2 * border + 6
    W = border * 2 + cw + gap + top * (cw + 2 * border + 2)
    text_w = max([int(font.getlength(t)) for t in (title or "", note)] +
                 [sum(int(font.getlength(t)) + lh + 12 for _, t in legend)])
    W = max(W, text_w + 4)
    H = header_h + len(queries) * row_h
    sheet = Image.new("RGB", (max(W, 1), max(H, 1)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    texts = []

    def text(xy, t, fill=(0, 0, 0)):
        draw.text(xy, t, fill=fill, font=font)
        texts.append(t)

    y = 2
    if title:
        text((2, y), title)
        y += lh
    x = 2
    for colour, t in legend:  # a colour swatch, then what it means
        draw.rectangle((x, y + 1, x + lh - 3, y + lh - 2), fill=colour)
        text((x + lh, y), t)
        x += lh + int(font.getlength(t)) + 12
    text((2, y + lh), note, fill=(60, 60, 60))
    cells = []
    for r, (q, row) in enumerate(zip(queries, ranked)):
        qpath, qpid = q[0], q[1]
        y0 = header_h + r * row_h
        boxes = []
        x0 = 0
        for k, item in enumerate([q] + list(row)):
            p, pid = item[0], item[1]
            colour = GREY if k == 0 else (GREEN if pid == qpid else RED)
            if k == 0:
                lines = ["query", f"id {pid}" + (f" cam {q[2]}" if len(q) > 2 else "")]
            else:
                lines = [f"#{k} id {pid}", f"d {item[2]:.3f}" if len(item) > 2 else ""]
            for n, t in enumerate(lines):
                if t:
                    text((x0 + 1, y0 + n * lh), t)
            box = (x0, y0 + 2 * lh, x0 + cw + 2 * border - 1, y0 + 2 * lh + ch + 2 * border - 1)
            draw.rectangle(box, fill=colour)
            sheet.paste(read_image(p).resize((cw, ch)), (x0 + border, box[1] + border))
            boxes.append((*box, colour))
            x0 += cw + 2 * border + (gap if k == 0 else 2)
        cells.append(boxes)
    path = save_figure(sheet, path)
    return {"path": str(path), "size": sheet.size, "cells": cells, "texts": texts}


def plot_cmc(cmc, path, *, label: str | None = None, max_rank: int = 20) -> Path:
    """The CMC curve (rank-k matching rate, k = 1..max_rank) as a PNG. ``cmc``: fractions, rank 1 first.

    ``rga.evaluate`` can call ``plot_cmc(result["cmc"], out_dir / "cmc.png")`` next to its
    metrics JSON; several curves: pass a dict {label: cmc}.
    """
    plt = _plt()
    curves = cmc if isinstance(cmc, dict) else {label or "CMC": cmc}
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for name, c in curves.items():
        c = np.asarray(c, dtype=np.float64)[:max_rank] * 100
        ax.plot(np.arange(1, len(c) + 1), c, marker="o", ms=3, label=f"{name} (R1 {c[0]:.1f}%)")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def _model_args(p):
    p.add_argument("--compare", action="append", default=[], metavar="RUN",
                   help="another run (or init:ARCH) to show beside the first; repeatable")
    p.add_argument("--backbone", default="resnet18", help="backbone for init:ARCH models (default resnet18)")
    p.add_argument("--height", type=int, default=64, help="input height for init:ARCH models (default 64)")
    p.add_argument("--width", type=int, default=32, help="input width for init:ARCH models (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of init:ARCH models")
    p.add_argument("--out", default="figures", help="output folder")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")


def _dataset_opt_arg(p, default=""):
    from .config import parse_kv
    p.add_argument("--dataset-opt", action="append", default=[], type=parse_kv, metavar="KEY=VALUE",
                   help="build_dataset keyword, repeatable, as rga.train's" + default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rga.visualize", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attention", help="spatial attention overlays per stage (Fig. 1) and the foreground ratio")
    a.add_argument("run")
    a.add_argument("images", nargs="*", help="image files (the synthetic set's have masks); or use --dataset")
    a.add_argument("--dataset", help="take the images from this dataset's --split instead (e.g. synthetic)")
    a.add_argument("--data-root", default="data")
    _dataset_opt_arg(a)
    a.add_argument("--split", default="query", choices=("query", "gallery", "train"))
    a.add_argument("--limit", type=int, default=200, help="images taken from --dataset (default 200)")
    a.add_argument("--show", type=int, default=6, help="images drawn in attention.png (default 6)")
    a.add_argument("--stages", type=int, nargs="*", help="stages to draw (default: all with a spatial attention)")
    a.add_argument("--stretch", choices=STRETCHES, default="shared",
                   help="colours: one scale for all maps, with a colour bar (shared, default), or each map "
                        "stretched to its own min..max (per-map)")
    _model_args(a)
    r = sub.add_parser("relation", help="relation values R(i, :) for three target positions (Fig. 4)")
    r.add_argument("run")
    r.add_argument("image")
    r.add_argument("--targets", nargs="+", metavar="ROW,COL", help="target cells on the stage's feature grid")
    r.add_argument("--stage", type=int, default=1, help="stage (default 1, the finest grid)")
    r.add_argument("--dataset", help="also average the position invariance over this dataset's query images")
    r.add_argument("--data-root", default="data")
    _dataset_opt_arg(r)
    r.add_argument("--limit", type=int, default=50, help="images for the --dataset average (default 50)")
    _model_args(r)
    g = sub.add_parser("gradcam", help="Grad-CAM of the final stage for two models side by side (Fig. 5)")
    g.add_argument("run")
    g.add_argument("images", nargs="+")
    g.add_argument("--show", type=int, default=6, help="images drawn in gradcam.png (default 6; the ratio uses all)")
    _model_args(g)
    k = sub.add_parser("ranks", help="query + top-k gallery sheet (green: same identity, red: not) and cmc.png")
    k.add_argument("run")
    k.add_argument("--dataset", default=None, help="dataset (default: the run's)")
    k.add_argument("--data-root", default=None, help="dataset folder (default: the run's)")
    _dataset_opt_arg(k, " (default: the run's, when the dataset is the run's)")
    k.add_argument("--top", type=int, default=10)
    k.add_argument("--num-queries", type=int, default=8, help="queries drawn (default 8, evenly spaced)")
    k.add_argument("--batch-size", type=int, default=64)
    _model_args(k)
    return p


def _load_all(args):
    kw = dict(backbone=args.backbone, height=args.height, width=args.width, seed=args.seed)
    return [open_model(spec, **kw) for spec in [args.run] + list(args.compare)]


def cmd_attention(args) -> dict:
    models = _load_all(args)
    paths = list(args.images)
    if args.dataset:
        paths += dataset_images(args.dataset, args.data_root, args.split, args.limit, dict(args.dataset_opt))
    if not paths:
        raise ValueError("give image files or --dataset")
    summary = {"images": len(paths), "runs": []}
    runs, ratios = [], []
    show_orig = None
    for model in models:
        originals, batch, masks = load_images(paths, model.height, model.width)
        maps = {}
        for s in range(0, len(paths), 64):
            for stage, m in spatial_maps(model, batch[s:s + 64]).items():
                maps.setdefault(stage, []).append(m)
        maps = {stage: torch.cat(v) for stage, v in maps.items()}
        if not maps:
            raise ValueError(f"{_label(model)} has no spatial attention map "
                             "(channel-only or non-local designs); use an S, SC, CS or S//C model")
        label = _label(model)
        entry = {"run": model.run_name, "variant": model.variant, "stages": {}}
        with_mask = [i for i, m in enumerate(masks) if m is not None]
        run_ratios = {}
        for stage, a in maps.items():
            if with_mask:
                mk = torch.stack([torch.from_numpy(masks[i]) for i in with_mask])[:, None]
                rt = foreground_ratio(a[with_mask], mk)
                full = torch.full((len(paths),), float("nan"))
                full[with_mask] = rt
                run_ratios[stage] = full
                v = rt[~torch.isnan(rt)]
                entry["stages"][stage] = {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0,
                                          "median": float(v.median()), "n": int(len(v)),
                                          "share_above_1": float((v > 1).float().mean())}
        summary["runs"].append(entry)
        runs.append((label, {s: a[:args.show] for s, a in maps.items()}))
        ratios.append((label, {s: r[:args.show] for s, r in run_ratios.items()}))
        show_orig = originals[:args.show]
    out = Path(args.out)
    stages = set(args.stages) if args.stages else None
    texts = []
    summary["figure"] = str(attention_figure(show_orig, runs, out / "attention.png", stages=stages, ratios=ratios,
                                             stretch=args.stretch, labels=texts))
    summary["stretch"], summary["texts"] = args.stretch, texts
    write_text(json.dumps(summary, indent=2) + "\n", out / "foreground_ratio.json")
    print(f"foreground attention ratio (mass share inside the person mask / mask's area share; 1.0 = no preference), "
          f"{summary['images']} images:")
    for entry in summary["runs"]:
        for stage, st in sorted(entry["stages"].items()):
            print(f"  {entry['variant']:<12} {entry['run']:<28} stage {stage}: mean {st['mean']:.3f} ± {st['std']:.3f} "
                  f"(median {st['median']:.3f}, {100 * st['share_above_1']:.0f}% of images > 1, n={st['n']})")
        if not entry["stages"]:
            print(f"  {entry['variant']:<12} {entry['run']}: no masks for these images")
    print(f"wrote {summary['figure']} and {out / 'foreground_ratio.json'}")
    return summary


def _parse_targets(texts):
    out = []
    for t in texts:
        try:
            r, c = (int(v) for v in t.split(","))
        except ValueError:
            raise ValueError(f"--targets wants ROW,COL, got {t!r}") from None
        out.append((r, c))
    return out


def cmd_relation(args) -> dict:
    from .models import stage_sizes
    models = _load_all(args)
    rows, summary = [], {"image": args.image, "stage": args.stage, "runs": []}
    original = targets = grid = None
    for model in models:
        originals, batch, _ = load_images([args.image], model.height, model.width)
        original = originals[0]
        grid = stage_sizes(model.height, model.width)[args.stage - 1]
        if targets is None:
            targets = _parse_targets(args.targets) if args.targets else default_targets(*grid)
        maps, what = relation_maps(model, batch, args.stage, targets)
        inv = position_invariance(maps)
        rows.append((_label(model), maps, inv))
        entry = {"run": model.run_name, "variant": model.variant, "what": what, "invariance": inv}
        print(f"{_label(model)}: {what}; position invariance (mean correlation between the targets' maps, "
              f"1.0 = the same map for every target) {inv:.3f}")
        if args.dataset:
            paths = dataset_images(args.dataset, args.data_root, "query", args.limit, dict(args.dataset_opt))
            _, many, _ = load_images(paths, model.height, model.width)
            invs = np.array([position_invariance(relation_maps(model, many[i:i + 1], args.stage, targets)[0])
                             for i in range(len(paths))])
            entry["dataset_invariance"] = {"mean": float(np.nanmean(invs)), "std": float(np.nanstd(invs)),
                                           "n": int(np.isfinite(invs).sum())}
            print(f"  over {len(paths)} {args.dataset} query images: {np.nanmean(invs):.3f} ± {np.nanstd(invs):.3f}")
        summary["runs"].append(entry)
    summary["targets"] = targets
    out = Path(args.out)
    texts = []
    summary["figure"] = str(relation_figure(original, rows, targets, grid, out / "relation.png", stage=args.stage,
                                            labels=texts))
    summary["grid"], summary["texts"] = list(grid), texts
    write_text(json.dumps(summary, indent=2) + "\n", out / "relation.json")
    print(f"wrote {summary['figure']}")
    return summary


def cmd_gradcam(args) -> dict:
    models = _load_all(args)
    runs, ratios, explained, summary = [], [], [], {"images": args.images, "runs": []}
    originals = None
    for model in models:
        originals, batch, masks = load_images(args.images, model.height, model.width)
        classes = [c for s in range(0, len(batch), 32) for c in top_classes(model, batch[s:s + 32])]
        cams = np.concatenate([gradcam_maps(model, batch[s:s + 32], classes=classes[s:s + 32])
                               for s in range(0, len(batch), 32)])
        big = [F.interpolate(torch.from_numpy(c)[None, None], size=o.shape[:2], mode="bilinear",
                             align_corners=False)[0, 0].numpy() for c, o in zip(cams, originals)]
        rt = [float(foreground_ratio(torch.from_numpy(b)[None, None] + 1e-12, torch.from_numpy(m)[None, None]))
              if m is not None else float("nan") for b, m in zip(big, masks)]
        runs.append((_label(model), big))
        ratios.append(rt)
        explained.append(classes)
        summary["runs"].append({"run": model.run_name, "variant": model.variant, "foreground_ratio": rt,
                                "classes": classes})
        v = [x for x in rt if not np.isnan(x)]
        print(f"{_label(model)}: Grad-CAM foreground ratio mean {np.mean(v):.3f} over {len(v)} images" if v
              else f"{_label(model)}: no masks")
    out = Path(args.out)
    k = args.show
    texts = []
    summary["figure"] = str(gradcam_figure(originals[:k], [(label, cams[:k]) for label, cams in runs],
                                           out / "gradcam.png", ratios=[r[:k] for r in ratios],
                                           classes=[c[:k] for c in explained], labels=texts))
    summary["texts"] = texts
    write_text(json.dumps(summary, indent=2) + "\n", out / "gradcam.json")
    print(f"wrote {summary['figure']}")
    return summary


def cmd_ranks(args) -> dict:
    from .checkpoint import read_model_checkpoint
    from .data import build_dataset
    from .engine import build_test_loader
    from .extractor import FeatureExtractor
    from .metrics import evaluate_features, ranked_gallery

    model = _load_all(args)[0]
    dataset, root, options = "synthetic", "data", {}
    if not args.run.startswith("init:"):
        run_cfg = read_model_checkpoint(args.run).config
        if run_cfg is not None:
            dataset, root, options = run_cfg.data.dataset, run_cfg.data.data_root, dict(run_cfg.data.dataset_opt)
    if args.dataset not in (None, dataset):
        options = {}
    ds = build_dataset(args.dataset or dataset, args.data_root or root, verbose=False,
                       **(dict(args.dataset_opt) or options))
    extract = FeatureExtractor(model, device="cpu", feat=getattr(model, "neck_feat", "bn"), normalize=False)
    kw = dict(height=model.height, width=model.width, batch_size=args.batch_size, workers=0, device=extract.device)
    qf, q_pids, q_camids = extract.extract_loader(build_test_loader(ds.query, **kw))
    gf, g_pids, g_camids = extract.extract_loader(build_test_loader(ds.gallery, **kw))
    res = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids)
    nq = len(ds.query)
    picks = np.unique(np.linspace(0, nq - 1, min(args.num_queries, nq)).round().astype(int))
    ranked = ranked_gallery(qf[picks], gf, q_pids[picks], g_pids, q_camids[picks], g_camids, args.top)
    # the distance ranked_gallery sorts by (cosine), for the numbers on the sheet
    qn = F.normalize(torch.as_tensor(qf[picks]).float(), dim=1)
    gn = F.normalize(torch.as_tensor(gf).float(), dim=1)
    queries = [(ds.query[i][0], int(q_pids[i]), int(q_camids[i])) for i in picks]
    rows = [[(ds.gallery[j][0], int(g_pids[j]), float(1 - qn[n] @ gn[j])) for j in r] for n, r in enumerate(ranked)]
    out = Path(args.out)
    title = (f"{_label(model)} on {args.dataset or dataset}: R1 {100 * res['cmc'][0]:.1f}%, mAP "
             f"{100 * res['mAP']:.1f}% ({nq} queries); top {args.top} per query, same-camera images of the "
             f"query's identity left out")
    layout = rank_sheet(queries, rows, out / "ranks.png", title=title)
    cmc_path = plot_cmc(res["cmc"], out / "cmc.png", label=_label(model))
    hits = [sum(item[1] == q[1] for item in row) for q, row in zip(queries, rows)]
    summary = {"figure": layout["path"], "cmc": str(cmc_path), "R1": float(res["cmc"][0]), "mAP": float(res["mAP"]),
               "queries": [{"image": q[0], "pid": q[1], "camid": q[2],
                            "top": [{"image": p, "pid": pid, "distance": d} for p, pid, d in row]}
                           for q, row in zip(queries, rows)],
               "cells": layout["cells"], "texts": layout["texts"]}
    write_text(json.dumps(summary, indent=2) + "\n", out / "ranks.json")
    print(f"{_label(model)}: R1 {100 * res['cmc'][0]:.2f}%  mAP {100 * res['mAP']:.2f}% on {len(ds.query)} queries; "
          f"drawn: {len(queries)} queries, correct in top {args.top}: {hits}")
    print(f"wrote {layout['path']} and {cmc_path}")
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cmd = {"attention": cmd_attention, "relation": cmd_relation, "gradcam": cmd_gradcam, "ranks": cmd_ranks}
    return run_cli(f"rga.visualize {args.command}", cmd[args.command], args,
                   user_errors=(ValueError, FileNotFoundError, ImportError))


if __name__ == "__main__":
    sys.exit(main())
