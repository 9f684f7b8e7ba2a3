"""Ranked lists and the CMC curve: the one ranked-sheet drawer (``rga.visualize ranks`` and
``rga.search query --plot`` both draw with it; torchreid's visrank, in our own layout), and
``python -m rga.visualize ranks``, which evaluates a run through ``rga.engine.evaluate_model``."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import save_figure, write_text
from .drawing import pyplot
from .inputs import open_models, run_label

GREEN, RED, GREY, BLUE = (0, 170, 0), (220, 0, 0), (128, 128, 128), (70, 110, 220)


def _font(size: int):
    """PIL's default font at ``size`` pixels (a scalable one since Pillow 10.1; the fixed bitmap font before)."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType
        return ImageFont.load_default()


@dataclass(frozen=True)
class SheetStyle:
    """The geometry of a ranked sheet: image cell (height, width), border and gap in pixels, font size."""
    cell: tuple = (128, 64)
    border: int = 4
    gap: int = 12
    font_size: int = 10


def rank_sheet(queries, ranked, path, *, title: str | None = None, metric: str = "cosine distance",
               lower_is_closer: bool = True, style: SheetStyle = SheetStyle()) -> dict:
    """One sheet: a header (title, colour legend), then a row per query: the query, then its ranked gallery images.

    queries: [(image path, pid)] or [(image path, pid, camid)]; ranked: per query [(image path, pid)]
    or [(image path, pid, score)] in rank order, ``score`` being ``metric`` to the query (a
    distance by default; ``lower_is_closer=False`` for a similarity). A pid or camid may be None
    (unknown). Each gallery image gets a green border if its pid equals the query's, red if not,
    blue when either identity is unknown; the query a grey one; an unreadable image is a grey
    box marked so. Above each image: the query's identity (and camera), or the rank, the identity
    and the score. ``style``: the sheet's geometry. Returns the layout: {"path", "size",
    "cells": [[(x0, y0, x1, y1, colour), ...] per row]} (outer border boxes) and "texts" (every
    text drawn), for checking.
    """
    from PIL import Image, ImageDraw

    from ..data import read_image

    (ch, cw), border, gap = style.cell, style.border, style.gap
    font = _font(style.font_size)
    lh = style.font_size + 3  # line height
    top = max((len(r) for r in ranked), default=0)
    with_score = any(len(item) > 2 for row in ranked for item in row)
    unknown = any(q[1] is None for q in queries) or any(item[1] is None for row in ranked for item in row)
    header = ([title] if title else []) + ["", ""]  # the legend takes the last two lines
    legend = [(GREY, "query"), (GREEN, "same identity as the query"), (RED, "another identity")]
    legend += [(BLUE, "identity unknown")] if unknown else []
    closer, short = ("lower", "d") if lower_is_closer else ("higher", "s")
    note = "above each image: rank, identity" + (f" and {metric} to the query ({short}; {closer}: closer)"
                                                 if with_score else "")
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

    def identity(pid, camid=None) -> str:
        out = "id ?" if pid is None else f"id {pid}"
        return out + (f" cam {camid}" if camid is not None else "")

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
        qpid = q[1]
        y0 = header_h + r * row_h
        boxes = []
        x0 = 0
        for k, item in enumerate([q] + list(row)):
            p, pid = item[0], item[1]
            if k == 0:
                colour = GREY
                lines = ["query", identity(pid, q[2] if len(q) > 2 else None)]
            else:
                colour = BLUE if pid is None or qpid is None else (GREEN if pid == qpid else RED)
                lines = [f"#{k} {identity(pid)}", f"{short} {item[2]:.3f}" if len(item) > 2 else ""]
            for n, t in enumerate(lines):
                if t:
                    text((x0 + 1, y0 + n * lh), t)
            box = (x0, y0 + 2 * lh, x0 + cw + 2 * border - 1, y0 + 2 * lh + ch + 2 * border - 1)
            draw.rectangle(box, fill=colour)
            try:
                picture = read_image(p).resize((cw, ch))
            except OSError:
                picture = Image.new("RGB", (cw, ch), (220, 220, 220))
                ImageDraw.Draw(picture).text((2, ch // 2), "unreadable", fill=(0, 0, 0), font=font)
                texts.append("unreadable")
            sheet.paste(picture, (x0 + border, box[1] + border))
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
    plt = pyplot()
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


def cmd_ranks(args) -> dict:
    """rga.visualize ranks: the run's evaluation (rga.engine.evaluate_model, the one evaluation of
    rga.train and rga.evaluate), then the ranked sheet of a few queries and the CMC curve."""
    from ..data import build_dataset
    from ..engine import EvalSettings, evaluate_model
    from ..metrics import ranked_gallery
    from ..runtime import Runtime

    model = open_models(args)[0]
    dataset, root, options = "synthetic", "data", {}
    if model.run_config is not None:
        data = model.run_config.data
        dataset, root, options = data.dataset, data.data_root, dict(data.dataset_opt)
    if args.dataset not in (None, dataset):
        options = {}
    ds = build_dataset(args.dataset or dataset, args.data_root or root, verbose=False,
                       **(dict(args.dataset_opt) or options))
    spec = EvalSettings(model.height, model.width, batch_size=args.batch_size, workers=0,
                        feat=getattr(model, "neck_feat", "bn"), progress=False)
    res, feats = evaluate_model(model, ds, spec, Runtime(device=torch.device("cpu")), return_features=True)
    qf, gf = feats.query, feats.gallery
    nq = len(ds.query)
    picks = np.unique(np.linspace(0, nq - 1, min(args.num_queries, nq)).round().astype(int))
    ranked = ranked_gallery(qf[picks], gf, feats.q_pids[picks], feats.g_pids, feats.q_camids[picks],
                            feats.g_camids, args.top)
    # the distance ranked_gallery sorts by (cosine), for the numbers on the sheet
    qn = F.normalize(torch.as_tensor(qf[picks]).float(), dim=1)
    gn = F.normalize(torch.as_tensor(gf).float(), dim=1)
    queries = [(ds.query[i][0], int(feats.q_pids[i]), int(feats.q_camids[i])) for i in picks]
    rows = [[(ds.gallery[j][0], int(feats.g_pids[j]), float(1 - qn[n] @ gn[j])) for j in r]
            for n, r in enumerate(ranked)]
    out = Path(args.out)
    title = (f"{run_label(model)} on {args.dataset or dataset}: R1 {100 * res['R1']:.1f}%, mAP "
             f"{100 * res['mAP']:.1f}% ({nq} queries); top {args.top} per query, same-camera images of the "
             f"query's identity left out")
    layout = rank_sheet(queries, rows, out / "ranks.png", title=title)
    cmc_path = plot_cmc(res["cmc"], out / "cmc.png", label=run_label(model))
    hits = [sum(item[1] == q[1] for item in row) for q, row in zip(queries, rows)]
    summary = {"figure": layout["path"], "cmc": str(cmc_path), "R1": float(res["R1"]), "mAP": float(res["mAP"]),
               "queries": [{"image": q[0], "pid": q[1], "camid": q[2],
                            "top": [{"image": p, "pid": pid, "distance": d} for p, pid, d in row]}
                           for q, row in zip(queries, rows)],
               "cells": layout["cells"], "texts": layout["texts"]}
    write_text(json.dumps(summary, indent=2) + "\n", out / "ranks.json")
    print(f"{run_label(model)}: R1 {100 * res['R1']:.2f}%  mAP {100 * res['mAP']:.2f}% on {nq} queries; "
          f"drawn: {len(queries)} queries, correct in top {args.top}: {hits}")
    print(f"wrote {layout['path']} and {cmc_path}")
    return summary
