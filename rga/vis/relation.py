"""Fig. 4: the relation values from every position to a few target positions, for RGA's own
R(i, j) = θ_iᵀφ_j and for non-local's softmax weights, and their position invariance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..fileio import write_text
from .drawing import colorbar, finish, heading, overlay, pyplot
from .inputs import dataset_images, run_label, load_images, open_models, stage_modules


@torch.no_grad()
def relation_maps(model, image: torch.Tensor, stage: int, targets) -> tuple[np.ndarray, str]:
    """The relation values from every position w.r.t. each target position at one stage.

    image: (1, 3, H, W) model input; targets: [(row, col)] on that stage's feature grid.
    Returns (maps (T, h, w), what): for an RGA module with a spatial branch, R(i, :) = θ_iᵀ φ_j
    from the module's own embeddings of the input its spatial branch sees; for NL, the softmax
    weights f(i, :) (NonLocal.relation).
    """
    from ..attention import NonLocal
    from ..modules import RGAModule

    mods = stage_modules(model)
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
    plt = pyplot()
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
    heading(fig, f"Relation values from every position to a target cell (red square) at stage {stage}: "
                  f"target (row, col) is a cell of stage {stage}'s {h}×{w} feature grid (input {ih}×{iw}); "
                  "invariance: mean correlation between the targets' maps")
    colorbar(fig, axes, 0.0, 1.0, "position in the map's own range (0: min, 1: max)")
    return finish(fig, path, labels, dpi=120)


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
    from ..models import stage_sizes
    models = open_models(args)
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
        rows.append((run_label(model), maps, inv))
        entry = {"run": model.run_name, "variant": model.variant, "what": what, "invariance": inv}
        print(f"{run_label(model)}: {what}; position invariance (mean correlation between the targets' maps, "
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
