"""Fig. 1: the spatial attention maps of each stage, drawn over the image, and the foreground ratio.

Foreground attention ratio (Fig. 1 as a number, on images with a person mask such as the
synthetic sets'): the share of a spatial attention map's mass that falls inside the person mask,
divided by the share of the image the mask covers, ``(Σ a·m / Σ a) / mean(m)``, computed on the
feature grid with the mask area-averaged onto it. 1.0 means no preference for the person, 2.0
means the person gets twice its share.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..fileio import write_text
from .drawing import FLAT, STRETCHES, colorbar, finish, heading, map_range, overlay, pyplot
from .inputs import dataset_images, run_label, load_images, open_models, stage_modules


@torch.no_grad()
def attention_maps(model, images: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """{stage: {"spatial": (B,1,h,w), "channel": (B,C,1,1), ...}} from one eval-mode forward of ``model``."""
    mods = stage_modules(model)
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
    plt = pyplot()
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
        heading(fig, "Spatial attention (gate values) after each stage, all maps on one colour scale; "
                      f"'flat': a map that spans less than {FLAT}")
        colorbar(fig, axes, lo, hi, "attention (one scale for all maps)")
    else:
        heading(fig, "Spatial attention (gate values) after each stage, each map stretched to its own "
                      "min–max (printed above it): small differences look large")
        colorbar(fig, axes, 0.0, 1.0, "position in the map's own range (0: its min, 1: its max)")
    return finish(fig, path, labels, dpi=110)


def spatial_maps(model, batch) -> dict[int, torch.Tensor]:
    maps = attention_maps(model, batch)
    return {s: d["spatial"] for s, d in maps.items() if "spatial" in d}


def cmd_attention(args) -> dict:
    models = open_models(args)
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
            raise ValueError(f"{run_label(model)} has no spatial attention map "
                             "(channel-only or non-local designs); use an S, SC, CS or S//C model")
        label = run_label(model)
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
