"""The figures of rga.experiments: the showcase's foreground-attention ratio and overlays
(:func:`showcase_attention`, a step of ``python -m rga.experiments showcase``) and
``python -m rga.experiments figures`` (:func:`figures_main`): every figure of the README's
"Analysis and figures" from the showcase runs of one seed, each drawn by ``python -m rga.visualize``
and recorded in ``OUT/figures.json``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .experiment_rows import BASE, NL, RGA_S, RGA_SC, Row, ensure_pretrain, hardware, read_row, run_slug, train_argv
from .fileio import write_text

# ------------------------------------------------------------------------------------------------
# the showcase's attention step: foreground-attention ratio over seeds, the overlays
# ------------------------------------------------------------------------------------------------

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
                _draw(V, out / "rows" / f"{res['slug']}.json", ["attention", res["run_dir"], "--dataset", dataset or res["dataset"], "--data-root",
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
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "seed": seed, "hardware": hardware(),
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

