"""The drawing helpers every figure shares: matplotlib on the Agg backend, heat-map overlays, the
colour bar, the wrapped heading, and the texts a figure records."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import save_figure


def pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - the vis extra is missing
        raise ImportError('rga.visualize needs matplotlib: pip install -e ".[vis]" (or pip install matplotlib)') from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet",
            vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """The RGB uint8 ``image`` blended with ``heat`` (any 2-D size, upsampled bilinearly) in a colour map.

    The heat map is scaled to [0, 1] by vmin/vmax (default: its own min and max; a constant map
    shows as the colour map's middle).
    """
    plt = pyplot()
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


def finish(fig, path, labels, **kw) -> Path:
    """Record the figure's texts in ``labels`` (a list, when given), then write it."""
    if labels is not None:
        labels.extend(figure_texts(fig))
    return save_figure(fig, path, **kw)


def heading(fig, text: str, fontsize: float = 7) -> None:
    """A figure title wrapped to the figure's width."""
    import textwrap
    chars = max(20, int(fig.get_figwidth() * 72 / (0.55 * fontsize)))
    fig.suptitle("\n".join(textwrap.wrap(text, chars)), fontsize=fontsize)


def colorbar(fig, axes, lo: float, hi: float, label: str, cmap: str = "jet"):
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
