"""Train and evaluate every row of the paper's Table 1, 2 or 4 in one go; draw the README's figures.

    python -m rga.experiments table1|table2|table4|showcase [--dataset synthetic] [--preset quick] [--out DIR]
                              [--rows SLUG ...] [--list] [-- extra rga.train flags]
    python -m rga.experiments figures [--runs runs/showcase] [--out docs/figures] [--seed 0] [--no-train]
                              [-- extra rga.train flags]

Each row is one ``rga.train`` run in ``DIR/runs/<slug>`` with ``--resume auto``, and its result is
written to ``DIR/rows/<slug>.json`` once the run has finished and been evaluated. A killed runner,
started again with the same command, skips the finished rows and resumes the interrupted one from
its last checkpoint (which, on the CPU, ends with exactly the weights of an uninterrupted run).
After every row, ``DIR/<table>.md`` and ``DIR/<table>.json`` are rewritten: the rows in the paper's
order with R1, mAP, mINP, parameters and training time, and the paper's published R1 / mAP on
CUHK03 (labeled) and Market-1501 beside ours. Rows not run yet show as "pending".

``figures`` draws the figures of the README's "Analysis and figures" (attention overlays and the
foreground ratio, relations, Grad-CAM, ranked lists and CMC) from the showcase runs of one seed
(``RUNS/<model>-seed<N>``: RGA-SC, RGA-S, baseline and NL), training the missing ones with the showcase
preset exactly as the showcase would (so its runs are reused), and writes ``OUT/figures.json``: each
figure's ``python -m rga.visualize`` command, the runs it read (folder, epoch) and the date.

Everything after ``--`` goes to ``rga.train`` unchanged (e.g. ``-- --epochs 6 --milestones 4``); the
row itself is rga.train's ``--model NAME`` (a row of ``rga.registry.model_rows()``: the Table 1
and Table 4 rows and every variant of ``rga.registry.VARIANTS``); its folder is the slug.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .fileio import write_text
from .registry import PAPER_LABELS, RGA_OPTIONS, ROW_OPTIONS, model_rows


@dataclass(frozen=True)
class Row:
    slug: str                 # folder name
    model: str                # the row as rga.train's --model: a key of rga.registry.model_rows()
    group: str = ""           # the paper's row group (Spatial, Channel, Both)
    paper: tuple | None = None  # (CUHK03-L R1, mAP, Market-1501 R1, mAP), the paper's numbers in %
    title: str = ""           # the label, where the table names the row otherwise than PAPER_LABELS

    @property
    def label(self) -> str:
        """The paper's row name."""
        return self.title or PAPER_LABELS[self.model]

    @property
    def variant(self) -> str:
        """The row's variant (build_model name)."""
        return model_rows()[self.model]["variant"]

    @property
    def options(self) -> dict:
        """The row's RGA options that differ from the defaults."""
        row = model_rows()[self.model]
        return {k: row[k] for k in ROW_OPTIONS if row[k] != RGA_OPTIONS[k]}


BASE = Row("baseline", "baseline", "Baseline", (73.8, 69.0, 94.2, 83.7))
RGA_S = Row("rga_s", "rga_s", "Spatial", (79.3, 74.7, 96.0, 87.5))
RGA_C = Row("rga_c", "rga_c", "Channel", (79.3, 75.6, 95.9, 87.9))
RGA_SC = Row("rga_sc", "rga_sc", "Both", (81.1, 77.4, 96.1, 88.4))
NL = Row("nl", "nl", "Spatial", (76.6, 72.6, 95.6, 87.4))

TABLES = {
    # Table 1: RGA variants and the Rel./Ori. ablations
    "table1": (
        "Table 1: RGA variants and ablations",
        [BASE,
         Row("rga_s_norel", "rga_s_wo_rel", "Spatial", (76.8, 72.3, 94.3, 83.8)),
         Row("rga_s_noori", "rga_s_wo_ori", "Spatial", (78.2, 74.0, 95.4, 86.7)),
         RGA_S,
         Row("rga_c_norel", "rga_c_wo_rel", "Channel", (77.8, 73.7, 94.7, 84.8)),
         Row("rga_c_noori", "rga_c_wo_ori", "Channel", (78.1, 74.9, 95.4, 87.1)),
         RGA_C,
         Row("rga_s_par_c", "rga_s_par_c", "Both", (77.3, 73.4, 95.3, 86.6)),
         Row("rga_cs", "rga_cs", "Both", (78.6, 75.5, 95.3, 87.8)),
         RGA_SC],
    ),
    # Table 2: other attention designs on the same baseline (rga/attention.py)
    "table2": (
        "Table 2: RGA against other attention designs",
        [BASE,
         Row("cbam_s", "cbam_s", "Spatial", (77.3, 72.8, 94.8, 85.6)),
         Row("fc_s", "fc_s", "Spatial", (77.0, 73.0, 95.2, 86.2)),
         NL,
         Row("snl", "snl", "Spatial", (77.4, 72.4, 95.7, 87.3)),
         RGA_S,
         Row("se", "se", "Channel", (76.3, 71.9, 95.2, 86.0)),
         Row("cbam_c", "cbam_c", "Channel", (76.9, 72.7, 95.3, 86.3)),
         Row("fc_c", "fc_c", "Channel", (77.4, 72.9, 95.3, 86.7)),
         RGA_C,
         Row("cbam_cs", "cbam_cs", "Both", (78.0, 73.0, 95.0, 85.6)),
         Row("fc_s_par_c", "fc_s_par_c", "Both", (78.4, 73.2, 94.8, 85.0)),
         RGA_SC],
    ),
    # The showcase (issue 14): the paper's four headline rows on the cluttered synthetic set, seeds
    "showcase": (
        "Showcase: baseline, RGA-S, RGA-C, RGA-SC on synthetic_scenes",
        [BASE, RGA_S, RGA_C, RGA_SC],
    ),
    # Table 4: the embedding functions of RGA-SC ("asymmetric" is RGA-SC itself, run once)
    "table4": (
        "Table 4: embedding functions (RGA-SC)",
        [BASE,
         Row("rga_sc_noemb", "wo_embedding", "", (78.6, 75.2, 95.2, 87.3)),
         Row("rga_sc_sym", "symmetric", "", (79.4, 75.2, 95.6, 87.4)),
         Row("rga_sc", "rga_sc", "", (81.1, 77.4, 96.1, 88.4), title=PAPER_LABELS["asymmetric"])],
    ),
}

EPOCH_LINE = re.compile(r"epoch \d+/\d+ .* (\d+) batches in ([0-9.]+)s")


def run_slug(row: Row | str, seed: int | None) -> str:
    """A run's folder and result name: the row's slug, with -seedN when the runner repeats seeds."""
    slug = row if isinstance(row, str) else row.slug
    return slug if seed is None else f"{slug}-seed{seed}"


ROW_METRICS = ("R1", "R5", "mAP", "mINP")  # fractions in [0, 1]
ROW_TEXT = ("slug", "run_dir", "dataset", "backbone", "input")


def read_row(path: Path) -> dict:
    """A row's result ``DIR/rows/<slug>.json`` as run_row wrote it, checked: a JSON object, its
    slug the file's own name (so nothing derived from it leaves --out), R1/R5/mAP/mINP finite in
    [0, 1], params and train_seconds finite and >= 0, the texts texts. Anything else is one UsageError
    naming the file and what is wrong."""
    import math

    from .errors import UsageError

    def bad(why):
        return UsageError(f"{path} is not a row result of rga.experiments: {why}; delete it to run the row again")

    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"not JSON ({e})") from e
    if not isinstance(res, dict):
        raise bad(f"a JSON {type(res).__name__}, not an object")
    missing = [k for k in ROW_METRICS + ROW_TEXT + ("params", "train_seconds") if k not in res]
    if missing:
        raise bad(f"no {', '.join(missing)}")
    for key in ROW_TEXT:
        if not isinstance(res[key], str) or not res[key]:
            raise bad(f"{key} is {res[key]!r}, not a text")
    if res["slug"] != path.stem or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", res["slug"]):
        raise bad(f"slug {res['slug'][:60]!r} is not the file's name {path.stem!r}")
    for key in ROW_METRICS + ("params", "train_seconds"):
        v = res[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                or (key in ROW_METRICS and v > 1):
            raise bad(f"{key} is {v!r}, not a finite number in " + ("[0, 1]" if key in ROW_METRICS else "[0, inf)"))
    return res


def row_result(path: Path) -> dict | None:
    """The checked result (:func:`read_row`) of a row, or None if it has not finished."""
    return read_row(path) if path.is_file() else None


def train_argv(row: Row, run_dir: Path, preset: str | None, dataset: str | None, data_root: str | None,
               extra: list[str], seed: int | None = None) -> list[str]:
    """rga.train's command line for one row: preset, dataset, the extra flags, then the row's --model
    (and --seed when the runner repeats seeds)."""
    argv = []
    if preset:
        argv += ["--preset", preset]
    if dataset:
        argv += ["--dataset", dataset]
    if data_root:
        argv += ["--data-root", data_root]
    argv += list(extra) + (["--seed", str(seed)] if seed is not None else [])
    return argv + ["--model", row.model, "--output-dir", str(run_dir), "--resume", "auto", "--no-progress"]


def train_seconds(run_dir: Path) -> tuple[float, int]:
    """(sum of the epochs' training times, number of epochs) from the run's train.log."""
    total, n = 0.0, 0
    log = run_dir / "train.log"
    if log.is_file():
        for line in log.read_text().splitlines():
            m = EPOCH_LINE.search(line)
            if m:
                total += float(m.group(2))
                n += 1
    return total, n


def run_row(row: Row, out: Path, *, preset, dataset, data_root, extra, seed: int | None = None,
            runs: Path | None = None, log=print) -> dict:
    from . import train as T
    from .checkpoint import find_latest, load_checkpoint
    from .models import count_parameters

    slug = run_slug(row, seed)
    run_dir = (out / "runs" if runs is None else runs) / slug
    argv = train_argv(row, run_dir, preset, dataset, data_root, extra, seed)
    cfg = T.parse_config(argv)
    log(f"== {row.label} ({slug}): python -m rga.train {' '.join(argv)}")
    t0 = time.perf_counter()
    metrics = T.train(cfg)
    wall = time.perf_counter() - t0
    if not metrics:
        raise RuntimeError(f"{slug}: training returned no metrics (see {run_dir / 'train.log'})")
    ckpt = load_checkpoint(find_latest(run_dir))
    m = cfg.model
    params = count_parameters(row.variant, int(ckpt["num_classes"]), height=m.height, width=m.width,
                              backbone=m.backbone, **row.options)
    secs, epochs = train_seconds(run_dir)
    result = {"slug": slug, "row": row.slug, "seed": cfg.run.seed, "label": row.label, "arch": row.variant,
              "options": row.options,
              "R1": metrics["R1"], "R5": metrics["R5"], "mAP": metrics["mAP"], "mINP": metrics["mINP"],
              "num_query": metrics.get("num_query"), "num_test_ids": metrics.get("num_test_ids"),
              "epoch": metrics.get("epoch"), "params": params, "train_seconds": secs, "epochs_logged": epochs,
              "last_call_wall_seconds": wall, "run_dir": str(run_dir),
              "dataset": cfg.data.dataset, "data_root": cfg.data.data_root, "backbone": m.backbone, "input": f"{m.height}x{m.width}",
              "preset": preset, "extra_args": list(extra), "fused_rga": m.fused, "train_argv": argv}
    write_text(json.dumps(result, indent=2, default=str) + "\n", out / "rows" / f"{slug}.json")
    return result


def collect(table: str, out: Path, seeds=None) -> list[tuple[Row, dict | None]]:
    """(row, result) in the table's order; with seeds, the result is the mean over the finished
    seeds (R1, mAP, mINP, train time) with their standard deviations and the per-seed results."""
    _title, rows = TABLES[table]
    found = []
    for row in rows:
        if seeds is None:
            found.append((row, row_result(out / "rows" / f"{row.slug}.json")))
            continue
        per_seed = [read_row(p) for p in (out / "rows" / f"{run_slug(row, s)}.json" for s in seeds) if p.is_file()]
        found.append((row, aggregate(per_seed) if per_seed else None))
    return found


def aggregate(results: list[dict]) -> dict:
    """Mean and sample standard deviation (0 for one seed) of the metrics over seeds."""
    out = dict(results[0])
    for key in ("R1", "R5", "mAP", "mINP", "train_seconds"):
        v = torch.tensor([float(r[key]) for r in results], dtype=torch.float64)
        out[key] = float(v.mean())
        out[key + "_std"] = float(v.std()) if len(v) > 1 else 0.0
    out["seeds"] = [r.get("seed") for r in results]
    out["per_seed"] = [{k: r.get(k) for k in ("seed", "R1", "mAP", "mINP", "train_seconds")} for r in results]
    return out


def _pm(res, key) -> str:
    if "seeds" not in res:
        return _pct(res[key])
    return f"{_pct(res[key])} ± {_pct(res[key + '_std'])}"


def _pct(v):
    return f"{100 * v:.1f}"


def write_table(table: str, out: Path, meta: dict, seeds=None) -> tuple[Path, Path]:
    """DIR/<table>.md and .json from the finished rows (pending rows marked), in the paper's order."""
    title, _rows = TABLES[table]
    found = collect(table, out, seeds)
    done = [r for _, r in found if r is not None]
    setup = sorted({f"{r['dataset']} {r['backbone']} {r['input']}" for r in done}) or ["-"]
    lines = [f"# {title}", "",
             f"Ours: {', '.join(setup)}, preset {meta.get('preset')}, extra flags "
             f"{' '.join(meta.get('extra_args') or []) or '(none)'}; {meta.get('hardware', '')}. "
             "Paper: ResNet-50 at 256x128 with ImageNet weights, 600 epochs (CUHK03 labeled / Market-1501).", "",
             "| group | model | " + ("seeds | " if seeds is not None else "") + "R1 | mAP | mINP | params (M) | "
             "train time | paper CUHK03(L) R1 / mAP | paper Market R1 / mAP |",
             "|---|---|" + ("---|" if seeds is not None else "") + "---|---|---|---|---|---|---|"]
    for row, res in found:
        paper = row.paper
        pc = f"{paper[0]:.1f} / {paper[1]:.1f}" if paper else "-"
        pm = f"{paper[2]:.1f} / {paper[3]:.1f}" if paper else "-"
        n = "" if seeds is None else (f"{len(res['seeds'])} of {len(seeds)} | " if res else f"0 of {len(seeds)} | ")
        if res is None:
            lines.append(f"| {row.group} | {row.label} | {n}pending | | | | | {pc} | {pm} |")
            continue
        t = res["train_seconds"]
        lines.append(f"| {row.group} | {row.label} | {n}{_pm(res, 'R1')} | {_pm(res, 'mAP')} | {_pm(res, 'mINP')} | "
                     f"{res['params'] / 1e6:.2f} | {t / 60:.1f} min | {pc} | {pm} |")
    if done:
        ids = {r.get("num_test_ids") for r in done}
        lines += ["", f"R1 / mAP / mINP in %, ours on {done[0].get('num_query')} queries of "
                      f"{', '.join(str(i) for i in sorted(x for x in ids if x))} identities (chance R1 about "
                      f"{100 / max(min(x for x in ids if x), 1):.1f}%). Train time: the sum of the epochs' "
                      "training times in train.log (evaluation not included)."
                      + (" With seeds: mean ± sample standard deviation over the finished seeds; the "
                         "per-seed values are in the JSON." if seeds is not None else "")]
    md = out / f"{table}.md"
    write_text("\n".join(lines) + "\n", md)
    js = out / f"{table}.json"
    write_text(json.dumps({"table": table, "title": title, **meta, "seeds": seeds,
                           "rows": [{"slug": row.slug, "label": row.label, "group": row.group,
                                     "paper": dict(zip(("cuhk03_R1", "cuhk03_mAP", "market_R1", "market_mAP"),
                                                       row.paper)) if row.paper else None,
                                     "ours": res} for row, res in found]},
                          indent=2, default=str) + "\n", js)
    return md, js


def ensure_pretrain(runs: Path, extra: list[str], *, data_root=None, log=print) -> list[str]:
    """The showcase's stand-in for ImageNet: the showcase_pretrain preset's baseline (500 identities
    that no showcase image shows, at the showcase's input size) in RUNS/trunk, trained here if it has
    not finished yet (resumable like the rows). With a --data-root D for the showcase, the pool is
    generated in D-pool (never in D: the two sets would overwrite each other). Returns `extra` with
    --pretrained pointing at it (unless the user gave --pretrained)."""
    from . import train as T
    from .checkpoint import find_latest, load_checkpoint

    if "--pretrained" in extra:
        return extra
    run_dir = runs / "trunk"
    argv = ["--preset", "showcase_pretrain", "--output-dir", str(run_dir), "--resume", "auto",
            "--no-progress"] + (["--data-root", str(data_root).rstrip("/") + "-pool"] if data_root else [])
    if "--threads" in extra:
        argv += ["--threads", extra[extra.index("--threads") + 1]]
    cfg = T.parse_config(argv)
    latest = find_latest(run_dir) if run_dir.is_dir() else None
    if latest is None or load_checkpoint(latest).get("epoch") != cfg.optim.epochs:
        log(f"== pretraining (stand-in for ImageNet): python -m rga.train {' '.join(argv)}")
        if not T.train(cfg):
            raise RuntimeError(f"the pretraining run returned no metrics (see {run_dir / 'train.log'})")
    return list(extra) + ["--pretrained", str(run_dir)]


SPATIAL_ROWS = ("rga_s", "rga_sc")  # showcase rows with a spatial attention map (the foreground ratio)


def _draw(V, source, argv) -> None:
    """rga.visualize ``argv`` for the rows in `source`; its failure (said on stderr) is a UsageError."""
    from .errors import UsageError

    if not Path(argv[1]).is_dir():
        raise UsageError(f"{source}: its run_dir {argv[1]} is not a folder (moved or deleted?)")
    if V.main(list(argv)) != 0:
        raise UsageError(f"rga.visualize {argv[0]} failed for {source} (the error above): check its run_dir "
                         f"{argv[1]}")


def showcase_attention(out: Path, runs: Path, seeds, *, dataset=None, data_root=None, limit: int = 200) -> dict:
    """The foreground-attention ratio per stage of each finished spatial row and seed (rga.visualize
    attention over the first `limit` query images, which have person masks), its mean ± std over
    seeds in OUT/foreground_ratio.md/.json, and OUT/attention.png: seed 0's maps beside an untrained
    RGA-SC (the control: 1.00 means no preference for the person)."""
    from . import visualize as V

    found = {}
    for slug in SPATIAL_ROWS:
        for seed in seeds or [None]:
            res_path = out / "rows" / f"{run_slug(slug, seed)}.json"
            if res_path.is_file():
                found.setdefault(slug, []).append((seed, read_row(res_path)))
    if not found:
        return {}
    summary = {"limit": limit, "rows": {}}
    for slug, results in found.items():
        per_seed = []
        for seed, res in results:
            dest = out / "attention" / res["slug"]
            json_path = dest / "foreground_ratio.json"
            if not json_path.is_file():
                _draw(V, res_path.parent / f"{res['slug']}.json", ["attention", res["run_dir"], "--dataset", dataset or res["dataset"], "--data-root",
                        data_root or res.get("data_root") or "data", *_run_dataset_opts(res, dataset),
                        "--limit", str(limit), "--out", str(dest)])
            stages = json.loads(json_path.read_text())["runs"][0]["stages"]
            per_seed.append({"seed": seed, **{s: v["mean"] for s, v in stages.items()}})
        stage_keys = sorted({k for r in per_seed for k in r if k != "seed"})
        stats = {}
        for k in stage_keys:
            v = torch.tensor([r[k] for r in per_seed if k in r], dtype=torch.float64)
            stats[k] = {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0, "n": len(v)}
        summary["rows"][slug] = {"per_seed": per_seed, "stages": stats}
    # the figure: seed 0 of each spatial row beside the untrained control
    first = {slug: res for slug, results in found.items() for seed, res in results[:1]}
    if first:
        some = next(iter(first.values()))
        h, w = (int(x) for x in some["input"].split("x"))
        argv = ["attention", first[SPATIAL_ROWS[-1]]["run_dir"] if SPATIAL_ROWS[-1] in first
                else some["run_dir"]]
        for slug, res in first.items():
            if res["run_dir"] != argv[1]:
                argv += ["--compare", res["run_dir"]]
        argv += ["--compare", "init:rga_sc", "--backbone", some["backbone"], "--height", str(h), "--width", str(w),
                 "--dataset", dataset or some["dataset"], "--data-root", data_root or some.get("data_root") or "data",
                 *_run_dataset_opts(some, dataset),
                 "--limit", str(limit), "--out", str(out / "attention" / "figure")]
        _draw(V, out / "rows", argv)
        fig = out / "attention" / "figure" / "attention.png"
        if fig.is_file():
            (out / "attention.png").write_bytes(fig.read_bytes())
        control = json.loads((out / "attention" / "figure" / "foreground_ratio.json").read_text())["runs"][-1]
        summary["untrained_rga_sc"] = {s: v["mean"] for s, v in control["stages"].items()}
    lines = ["# Foreground-attention ratio, showcase", "",
             f"Share of each spatial attention map's mass inside the person mask divided by the mask's share of "
             f"the image (1.00: no preference), mean over the first {limit} query images of each run, then mean ± "
             "std over seeds. Written by `python -m rga.experiments showcase`.", "",
             "| model | seeds | stage 1 | stage 2 | stage 3 | stage 4 |", "|---|---|---|---|---|---|"]
    labels = {"rga_s": "RGA-S", "rga_sc": "RGA-SC"}
    for slug, row in summary["rows"].items():
        cells = [f"{row['stages'][k]['mean']:.3f} ± {row['stages'][k]['std']:.3f}" if k in row["stages"] else ""
                 for k in ("1", "2", "3", "4")]
        lines.append(f"| {labels[slug]} | {len(row['per_seed'])} | " + " | ".join(cells) + " |")
    if "untrained_rga_sc" in summary:
        u = summary["untrained_rga_sc"]
        lines.append("| RGA-SC, untrained (control) | - | " + " | ".join(
            f"{u[k]:.3f}" if k in u else "" for k in ("1", "2", "3", "4")) + " |")
    write_text("\n".join(lines) + "\n", out / "foreground_ratio.md")
    write_text(json.dumps(summary, indent=2) + "\n", out / "foreground_ratio.json")
    print("\n".join(lines))
    return summary


# ------------------------------------------------------------------------------------------------
# figures: every figure of the README's "Analysis and figures" from the showcase runs of one seed
# ------------------------------------------------------------------------------------------------

FIGURE_ROWS = (RGA_SC, BASE, RGA_S, NL)   # the runs the figures read, in training order
FIGURE_LIMITS = {"attention": 200, "relation": 50, "gradcam": 50}  # images each figure measures over


def run_info(run_dir: Path) -> dict | None:
    """What the figures record about a run: its folder, newest checkpoint and epoch (of how many),
    the data it was trained on and its final metrics; None when the folder holds no checkpoint."""
    from .checkpoint import read_model_checkpoint
    from .fileio import find_latest

    if not run_dir.is_dir() or find_latest(run_dir) is None:
        return None
    info = read_model_checkpoint(run_dir)
    cfg = info.config
    metrics = info.raw.get("metrics") or {}
    out = {"folder": str(run_dir), "config": str(run_dir / "config.json"), "checkpoint": str(info.path),
           "epoch": info.epoch,
           "epochs": cfg.optim.epochs if cfg is not None else None, "variant": info.model.variant,
           "backbone": info.model.backbone, "input": f"{info.model.height}x{info.model.width}"}
    if cfg is not None:
        out.update(dataset=cfg.data.dataset, data_root=cfg.data.data_root, dataset_opt=dict(cfg.data.dataset_opt))
    out.update({k: metrics[k] for k in ("R1", "mAP", "mINP") if k in metrics})
    return out


def _dataset_opt_args(options: dict) -> list[str]:
    """rga.visualize's (and rga.train's) --dataset-opt flags for build_dataset keywords."""
    return [a for k, v in options.items() for a in ("--dataset-opt", f"{k}={v if isinstance(v, str) else json.dumps(v)}")]


def _dataset_args(info: dict) -> list[str]:
    """rga.visualize's --dataset/--data-root/--dataset-opt for the data a run was trained on."""
    return ["--dataset", info["dataset"], "--data-root", info["data_root"], *_dataset_opt_args(info["dataset_opt"])]


def _run_dataset_opts(res: dict, dataset: str | None) -> list[str]:
    """The --dataset-opt flags of a row's run (none when `dataset` names another dataset than the run's)."""
    info = run_info(Path(res["run_dir"]))
    if info is None or dataset not in (None, info.get("dataset")):
        return []
    return _dataset_opt_args(info.get("dataset_opt") or {})


def _shell(argv: list[str]) -> str:
    import shlex
    return " ".join(shlex.quote(a) for a in argv)


def figure_commands(infos: dict, out: Path, queries: list[str], *, limit: int | None = None,
                    threads: int = 0) -> list[dict]:
    """The rga.visualize command line of each figure, from the runs' infos ({slug: run_info or None};
    rga_sc, rga_s and baseline must be there, nl may be None: the relation figure then compares with
    an untrained NL) and the query images of their dataset (the relation figure shows the first,
    Grad-CAM every k-th). One entry per figure: name, argv, files written, runs read, note."""
    sc, s, base, nl = (infos[k] for k in ("rga_sc", "rga_s", "baseline", "nl"))
    h, w = sc["input"].split("x")
    init = ["--backbone", sc["backbone"], "--height", h, "--width", w]  # the untrained controls' shape
    data = _dataset_args(sc)
    tail = ["--out", str(out)] + (["--threads", str(threads)] if threads else [])
    lim = {k: str(v if limit is None else min(v, limit)) for k, v in FIGURE_LIMITS.items()}
    step = max(1, len(queries) // int(lim["gradcam"]))
    cams = queries[::step][:int(lim["gradcam"])]
    nl_run = nl["folder"] if nl is not None else "init:nl"
    figs = [
        {"figure": "attention", "what": "Fig. 1: spatial attention of RGA-SC and RGA-S beside an untrained RGA-SC, "
                                        "and the foreground-attention ratio per stage",
         "argv": ["attention", sc["folder"], "--compare", s["folder"], "--compare", "init:rga_sc", *init, *data,
                  "--limit", lim["attention"], *tail],
         "files": ["attention.png", "foreground_ratio.json"], "runs": [sc, s]},
        {"figure": "relation", "what": "Fig. 4: relation values to three target positions at stage 1, RGA-SC "
                                       "against NL, with both untrained as controls, and the position invariance",
         "argv": ["relation", sc["folder"], queries[0], "--compare", nl_run, "--compare", "init:rga_sc"]
                 + (["--compare", "init:nl"] if nl is not None else []) + [*init, *data, "--limit", lim["relation"],
                                                                          *tail],
         "files": ["relation.png", "relation.json"], "runs": [sc] + ([nl] if nl is not None else []),
         "note": None if nl is not None else
                 f"no NL run in {Path(sc['folder']).parent} (--no-train): compared with an untrained NL (init:nl)"},
        {"figure": "gradcam", "what": "Fig. 5: Grad-CAM of the last stage, baseline against RGA-SC, with an "
                                      "untrained RGA-SC as the control, and their foreground ratios",
         "argv": ["gradcam", base["folder"], *cams, "--compare", sc["folder"], "--compare", "init:rga_sc", *init,
                  "--show", "6", *tail],
         "files": ["gradcam.png", "gradcam.json"], "runs": [base, sc]},
        {"figure": "ranks", "what": "ranked lists (top 10 of 6 queries) and the CMC curve of RGA-SC",
         "argv": ["ranks", sc["folder"], *data, "--top", "10", "--num-queries", "6", *tail],
         "files": ["ranks.png", "ranks.json", "cmc.png"], "runs": [sc]},
    ]
    for f in figs:
        f["command"] = "python -m rga.visualize " + _shell(f["argv"])
        f["runs"] = [{"folder": r["folder"], "epoch": r["epoch"], "epochs": r["epochs"]} for r in f["runs"]]
    return figs


def _train_command(row: Row, run_dir: Path, data_root, extra, seed) -> list[str]:
    """rga.train's command line for a figure's run: the showcase's, so the showcase's runs are reused."""
    return train_argv(row, run_dir, "showcase", None, data_root, extra, seed)


def figures(args, extra: list[str]) -> int:
    """python -m rga.experiments figures: train what is missing (showcase preset), draw, record."""
    from datetime import datetime, timezone

    from . import train as T
    from . import visualize as V
    from .errors import UsageError

    runs, out, seed = Path(args.runs), Path(args.out), args.seed
    dirs = {row.slug: runs / run_slug(row, seed) for row in FIGURE_ROWS}
    trained = []
    if args.no_train:
        for row in FIGURE_ROWS[:3]:
            if run_info(dirs[row.slug]) is None:
                raise UsageError(
                    f"--no-train: {dirs[row.slug]} holds no checkpoint; train it with python -m rga.train "
                    f"{_shell(_train_command(row, dirs[row.slug], args.data_root, extra, seed))}, or run "
                    "figures without --no-train")
    else:
        extra = ensure_pretrain(runs, extra, data_root=args.data_root)
        for row in FIGURE_ROWS:
            argv = _train_command(row, dirs[row.slug], args.data_root, extra, seed)
            cfg = T.parse_config(argv)
            info = run_info(dirs[row.slug])
            if info is not None and info["epoch"] is not None and info["epoch"] >= cfg.optim.epochs:
                print(f"== {row.label} ({dirs[row.slug]}): finished at epoch {info['epoch']}, reused")
                continue
            print(f"== {row.label}: python -m rga.train {_shell(argv)}", flush=True)
            if not T.train(cfg):
                raise RuntimeError(f"{dirs[row.slug]}: training returned no metrics (see its train.log)")
            trained.append(row.slug)
    infos = {slug: run_info(d) for slug, d in dirs.items()}
    for slug, info in infos.items():
        if info is not None and info["epochs"] is not None and info["epoch"] != info["epochs"]:
            print(f"note: {info['folder']} is at epoch {info['epoch']} of {info['epochs']} (an unfinished run)")
    sc = infos["rga_sc"]
    queries = V.dataset_images(sc["dataset"], sc["data_root"], "query", None, sc["dataset_opt"])
    if not queries:
        raise UsageError(f"the {sc['dataset']} set in {sc['data_root']} has no query images")
    figs = figure_commands(infos, out, queries, limit=args.limit, threads=args.threads)
    for f in figs:
        print(f"== {f['figure']}: {f['command'] if len(f['command']) < 400 else f['command'][:400] + ' ...'}",
              flush=True)
        if f.get("note"):
            print(f"note: {f['note']}")
        if V.main(list(f["argv"])) != 0:
            raise UsageError(f"the {f['figure']} figure failed (the error above): python -m rga.visualize "
                             f"{_shell(f['argv'][:2])} ...")
        f["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = {
        "command": "python -m rga.experiments " + _shell(args.argv + (["--"] + args.extra if args.extra else [])),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "seed": seed, "hardware": _hardware(),
        "runs": {slug: info for slug, info in infos.items() if info is not None},
        "trained_by_this_command": trained,
        # how this command trains (or would have trained) each run; with --no-train each run's own
        # configuration is its config.json (a valid rga.train --config file)
        "train_commands": None if args.no_train else {row.slug: "python -m rga.train " + _shell(
            _train_command(row, dirs[row.slug], args.data_root, extra, seed)) for row in FIGURE_ROWS},
        "figures": {f["figure"]: {k: f.get(k) for k in ("what", "command", "files", "runs", "date", "note")}
                    for f in figs},
    }
    write_text(json.dumps(record, indent=2, default=str) + "\n", out / "figures.json")
    print(f"wrote {', '.join(str(out / n) for f in figs for n in f['files'])} and {out / 'figures.json'}")
    return 0


def figures_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rga.experiments figures",
        description="Draw every figure of the README's 'Analysis and figures' from the showcase runs of one "
                    "seed (RGA-SC, RGA-S, baseline, NL in RUNS/<model>-seed<N>), training what is missing with "
                    "the showcase preset (resumable), and record each figure's rga.visualize command in "
                    "OUT/figures.json.",
        epilog="flags after -- are passed to rga.train (and name the runs' training, e.g. --pretrained)")
    p.add_argument("--runs", default="runs/showcase", help="folder of the runs (default runs/showcase, the "
                   "showcase's: runs it made are reused)")
    p.add_argument("--out", default="docs/figures", help="output folder (default docs/figures)")
    p.add_argument("--seed", type=int, default=0, help="which seed's runs (default 0)")
    p.add_argument("--no-train", action="store_true", help="train nothing: use the runs there are (an error if "
                   "RGA-SC, RGA-S or the baseline is missing; without an NL run, compare with an untrained NL)")
    p.add_argument("--data-root", default=None, help="dataset folder for the training runs (default: the preset's)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per figure's measurement "
                   f"(default {', '.join(f'{k} {v}' for k, v in FIGURE_LIMITS.items())})")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for drawing (0: torch's default)")
    return p


def figures_main(argv: list[str], extra: list[str]) -> int:
    from .errors import run_cli

    args = figures_parser().parse_args(argv)
    args.argv, args.extra = ["figures"] + list(argv), list(extra)
    return run_cli("rga.experiments figures", figures, args, list(extra), interrupted_hint="run the same command "
                   "again: finished runs are reused and an interrupted one resumes")


def _hardware() -> str:
    import os
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{platform.machine()} {dev}, torch {torch.__version__}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rga.experiments", description=__doc__.split("\n")[0],
                                epilog="flags after -- are passed to rga.train; python -m rga.experiments figures "
                                       "--help: the README's figures")
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--dataset", default=None, help="dataset (default: the preset's, else rga.train's)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--preset", default=None,
                   help="rga.train preset for every row (default: showcase for the showcase, else quick; '' for none)")
    p.add_argument("--out", default=None, help="output folder (default runs/experiments/<table>; for the showcase "
                   "docs/figures/showcase, its runs under runs/showcase)")
    p.add_argument("--runs", default=None, help="folder of the runs (default OUT/runs; showcase: runs/showcase)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="train each row with seeds 0..N-1 and report mean ± std (default: showcase 3, tables 1 "
                        "run without --seed)")
    p.add_argument("--rows", nargs="+", metavar="SLUG", help="run only these rows (default: all, in order)")
    p.add_argument("--list", action="store_true", help="list the rows and their state, run nothing")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: write the table (and the showcase's attention figures) from the finished "
                        "runs, the others marked pending")
    return p


def _list_state(result: Path, run_dir: Path) -> str:
    from .errors import UsageError

    try:
        if row_result(result) is not None:
            return "done"
    except UsageError:
        return f"invalid ({result} is not a row result)"
    return "started" if run_dir.is_dir() else "pending"


def main(argv=None) -> int:
    from .errors import run_cli

    return run_cli("rga.experiments", _main, argv)


def _main(argv=None) -> int:
    from .errors import user_message

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    if argv[:1] == ["figures"]:
        return figures_main(argv[1:], extra)
    args = build_parser().parse_args(argv)
    showcase = args.table == "showcase"
    out = Path(args.out or ("docs/figures/showcase" if showcase else f"runs/experiments/{args.table}"))
    runs = Path(args.runs) if args.runs else (Path("runs/showcase") if showcase and not args.out else out / "runs")
    preset = args.preset if args.preset is not None else ("showcase" if showcase else "quick")
    n_seeds = args.seeds if args.seeds is not None else (3 if showcase else None)
    if n_seeds is not None and n_seeds < 1:
        print(f"rga.experiments: error: --seeds must be >= 1, got {n_seeds}", file=sys.stderr)
        return 2
    seeds = list(range(n_seeds)) if n_seeds is not None else None
    out.mkdir(parents=True, exist_ok=True)
    _title, rows = TABLES[args.table]
    if args.rows:
        unknown = set(args.rows) - {r.slug for r in rows}
        if unknown:
            print(f"rga.experiments: error: unknown rows {sorted(unknown)}; {args.table} has "
                  f"{[r.slug for r in rows]}", file=sys.stderr)
            return 2
        rows = [r for r in rows if r.slug in args.rows]
    meta = {"preset": preset or None, "extra_args": extra, "hardware": _hardware(),
            "command": "python -m rga.experiments " + " ".join(argv + (["--"] + extra if extra else []))}
    # seed-major order: every row of seed 0 first, so a partial run already has one of each row
    jobs = [(row, seed) for seed in (seeds or [None]) for row in rows]
    if args.list:
        for row, seed in jobs:
            slug = run_slug(row, seed)
            state = _list_state(out / "rows" / f"{slug}.json", runs / slug)
            print(f"{slug:<20} {row.label:<22} {state}")
        return 0
    if args.no_train:
        jobs = []
    if showcase and preset == "showcase" and jobs:
        try:
            extra = ensure_pretrain(runs, extra, data_root=args.data_root)
        except Exception as e:  # noqa: BLE001
            message = user_message(e)
            if message is None:
                raise
            print(f"rga.experiments: error in the pretraining run: {message}", file=sys.stderr)
            return 2
    for row, seed in jobs:
        slug = run_slug(row, seed)
        if row_result(out / "rows" / f"{slug}.json") is not None:
            print(f"== {row.label} ({slug}): done, skipped")
            continue
        try:
            res = run_row(row, out, preset=preset or None, dataset=args.dataset, data_root=args.data_root,
                          extra=extra, seed=seed, runs=runs)
        except Exception as e:  # noqa: BLE001 - a user-fixable failure is one line, anything else a bug
            message = user_message(e)
            if message is None:
                raise
            print(f"rga.experiments: error in row {slug}: {message}", file=sys.stderr)
            return 2
        print(f"== {row.label} ({slug}): R1 {_pct(res['R1'])}%  mAP {_pct(res['mAP'])}%  mINP {_pct(res['mINP'])}%  "
              f"{res['params'] / 1e6:.2f} M params  {res['train_seconds'] / 60:.1f} min training")
        write_table(args.table, out, meta, seeds)
    if showcase:
        showcase_attention(out, runs, seeds, dataset=args.dataset, data_root=args.data_root)
    md, js = write_table(args.table, out, meta, seeds)
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
