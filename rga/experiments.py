"""Train and evaluate every row of the paper's Table 1, 2 or 4 in one go; draw the README's figures.

    python -m rga.experiments table1|table2|table4|showcase [--dataset synthetic] [--preset quick] [--out DIR]
                              [--rows SLUG ...] [--reuse DIR] [--list] [-- extra rga.train flags]
    python -m rga.experiments figures [--runs runs/showcase] [--out docs/figures] [--seed 0] [--no-train]
                              [-- extra rga.train flags]

Each row is one ``rga.train`` run in ``DIR/runs/<slug>`` with ``--resume auto``, and its result is
written to ``DIR/rows/<slug>.json`` once the run has finished and been evaluated. A killed runner,
started again with the same command, skips the finished rows and resumes the interrupted one from
its last checkpoint (which, on the CPU, ends with exactly the weights of an uninterrupted run).
After every row, ``DIR/<table>.md`` and ``DIR/<table>.json`` are rewritten: the rows in the paper's
order with R1, mAP, mINP, parameters and training time, and the paper's published R1 / mAP on
CUHK03 (labeled) and Market-1501 beside ours. Rows not run yet show as "pending". ``--reuse DIR``
counts the finished rows of another runner's output (e.g. the showcase's baseline and RGA rows in
Table 1 on the showcase preset) when rga.train's configuration is the same, and marks them.

``figures`` draws the figures of the README's "Analysis and figures" (attention overlays and the
foreground ratio, relations, Grad-CAM, ranked lists and CMC) from the showcase runs of one seed
(``RUNS/<model>-seed<N>``: RGA-SC, RGA-S, baseline and NL), training the missing ones with the showcase
preset exactly as the showcase would (so its runs are reused), and writes ``OUT/figures.json``: each
figure's ``python -m rga.visualize`` command, the runs it read (folder, epoch) and the date.

Everything after ``--`` goes to ``rga.train`` unchanged (e.g. ``-- --epochs 6 --milestones 4``); the
row itself is rga.train's ``--model NAME`` (a row of ``rga.registry.model_rows()``: the Table 1
and Table 4 rows and every variant of ``rga.registry.VARIANTS``); its folder is the slug.

This module is the tables' runner (its command line, one row's run, the tables written from the
rows' results); the rows themselves are rga.experiment_rows, the figures and the showcase's
attention step rga.experiment_figures.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from .experiment_figures import figure_commands, figures_main, run_info, showcase_attention  # noqa: F401
from .experiment_rows import (BASE, NL, RGA_C, RGA_S, RGA_SC, TABLES, Row, ensure_pretrain,  # noqa: F401
                              hardware, read_row, row_result, run_slug, train_argv)
from .fileio import write_text

#: an epoch's line in train.log, for runs written before metrics.jsonl held a line per epoch
EPOCH_LINE = re.compile(r"epoch (\d+)/\d+ .* (\d+) batches in ([0-9.]+)s")


def epoch_seconds(run_dir: Path) -> dict[int, float]:
    """{epoch: its training time in seconds} of a run, from the epochs' lines of metrics.jsonl (an
    epoch trained again after a resume: its last line). A run written before metrics.jsonl held every
    epoch (its lines are evaluations only, so epochs are missing) is read from train.log instead."""
    found = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            train = record.get("train") if isinstance(record, dict) else None
            if isinstance(train, dict) and isinstance(train.get("seconds"), (int, float)) \
                    and isinstance(record.get("epoch"), int):
                found[record["epoch"]] = float(train["seconds"])
    if found and set(found) == set(range(1, max(found) + 1)):
        return found
    log = run_dir / "train.log"
    from_log = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            m = EPOCH_LINE.search(line)
            if m:
                from_log[int(m.group(1))] = float(m.group(3))
    return from_log or found


def train_seconds(run_dir: Path) -> tuple[float, int]:
    """(sum of the epochs' training times, number of epochs) of a run (:func:`epoch_seconds`)."""
    seconds = epoch_seconds(run_dir)
    return sum(seconds.values()), len(seconds)


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


#: config fields a reused row may differ in (where it ran and how it reported, not what it trained)
REUSE_IGNORED = ("output_dir", "resume", "progress", "tensorboard", "ckpt_every", "keep_checkpoints")


def reusable_rows(jobs, out: Path, dirs, *, preset, dataset, data_root, extra, log=print) -> dict[str, Path]:
    """{slug: DIR/rows/<slug>.json} for the jobs (row, seed) without a result in OUT/rows whose result
    in one of the folders DIR (another runner's --out, e.g. the showcase's for Table 1's baseline and
    RGA rows) was trained with the configuration this runner would train it with: rga.train's
    config from the row's recorded command equal to the one from this runner's, but for REUSE_IGNORED.
    A result that differs is not reused, and the differing fields are logged."""
    from .errors import UsageError
    from .train_cli import parse_config

    for d in dirs:
        if not (Path(d) / "rows").is_dir():
            raise UsageError(f"{d} has no rows/ folder: --reuse expects another runner's --out")
    found = {}
    for row, seed in jobs:
        slug = run_slug(row, seed)
        if not dirs or (out / "rows" / f"{slug}.json").is_file():
            continue
        want = parse_config(train_argv(row, Path("-"), preset, dataset, data_root, extra, seed)).flat()
        for d in dirs:
            path = Path(d) / "rows" / f"{slug}.json"
            if not path.is_file():
                continue
            have = parse_config([str(a) for a in read_row(path).get("train_argv") or []]).flat()
            differ = sorted(k for k in want if k not in REUSE_IGNORED and want[k] != have.get(k))
            if differ:
                log(f"== {slug}: {path} not reused, trained with other {', '.join(differ)}")
                continue
            found[slug] = path
            break
    return found


def collect(table: str, out: Path, seeds=None, reused=None) -> list[tuple[Row, dict | None]]:
    """(row, result) in the table's order; with seeds, the result is the mean over the finished
    seeds (R1, mAP, mINP, train time) with their standard deviations and the per-seed results.
    A result missing from OUT/rows is read from ``reused`` ({slug: path}, reusable_rows) if there."""
    _title, rows = TABLES[table]
    reused = reused or {}

    def path_of(slug):
        own = out / "rows" / f"{slug}.json"
        return reused.get(slug, own) if not own.is_file() else own

    found = []
    for row in rows:
        if seeds is None:
            found.append((row, row_result(path_of(row.slug))))
            continue
        per_seed = [read_row(p) for p in (path_of(run_slug(row, s)) for s in seeds) if p.is_file()]
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
    if len(res.get("seeds") or ()) < 2:  # one run: no spread to state (a "± 0.0" would claim one)
        return _pct(res[key])
    return f"{_pct(res[key])} ± {_pct(res[key + '_std'])}"


def _pct(v):
    return f"{100 * v:.1f}"


def write_table(table: str, out: Path, meta: dict, seeds=None, reused=None) -> tuple[Path, Path]:
    """DIR/<table>.md and .json from the finished rows (pending rows marked), in the paper's order;
    rows read from another folder (``reused``, :func:`reusable_rows`) are marked and named."""
    title, _rows = TABLES[table]
    found = collect(table, out, seeds, reused)
    reused = reused or {}
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
        mark = " †" if any(run_slug(row, s) in reused for s in (seeds or [None])) else ""
        lines.append(f"| {row.group} | {row.label}{mark} | {n}{_pm(res, 'R1')} | {_pm(res, 'mAP')} | "
                     f"{_pm(res, 'mINP')} | "
                     f"{res['params'] / 1e6:.2f} | {t / 60:.1f} min | {pc} | {pm} |")
    if done:
        ids = sorted({r.get("num_test_ids") for r in done} - {None, 0})  # rows older than the count: none
        on = (f", ours on {done[0].get('num_query')} queries of {', '.join(str(i) for i in ids)} identities "
              f"(chance R1 about {100 / min(ids):.1f}%)") if ids else ""
        lines += ["", f"R1 / mAP / mINP in %{on}. Train time: the sum of the epochs' "
                      "training times in each run's metrics.jsonl (train.log for older runs; evaluation not "
                      "included)."
                      + (" With seeds: mean ± sample standard deviation over the finished seeds; the "
                         "per-seed values are in the JSON." if seeds is not None else "")]
    if reused:
        folders = sorted({str(p.parent.parent) for p in reused.values()})
        lines += ["", f"† read from {', '.join(folders)} (`--reuse`): the same rows trained there with the same "
                      "rga.train configuration, not rerun."]
    md = out / f"{table}.md"
    write_text("\n".join(lines) + "\n", md)
    js = out / f"{table}.json"
    write_text(json.dumps({"table": table, "title": title, **meta, "seeds": seeds,
                           "reused": {k: str(v) for k, v in sorted(reused.items())},
                           "rows": [{"slug": row.slug, "label": row.label, "group": row.group,
                                     "paper": dict(zip(("cuhk03_R1", "cuhk03_mAP", "market_R1", "market_mAP"),
                                                       row.paper)) if row.paper else None,
                                     "ours": res} for row, res in found]},
                          indent=2, default=str) + "\n", js)
    return md, js


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
    p.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="another runner's --out whose finished rows count here when rga.train's configuration "
                        "is the same (e.g. docs/figures/showcase for table1 --preset showcase); repeatable")
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


def _user_error(e: Exception, where: str) -> int:
    """A user-fixable failure: one error line, exit code 2; anything else is a bug and re-raised."""
    from .errors import user_message

    message = user_message(e)
    if message is None:
        raise e
    print(f"rga.experiments: error {where}: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    from .errors import run_cli

    return run_cli("rga.experiments", _main, argv)


def _main(argv=None) -> int:
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
    meta = {"preset": preset or None, "extra_args": extra, "hardware": hardware(),
            "command": "python -m rga.experiments " + " ".join(argv + (["--"] + extra if extra else []))}
    # seed-major order: every row of seed 0 first, so a partial run already has one of each row
    jobs = [(row, seed) for seed in (seeds or [None]) for row in rows]
    all_jobs = [(row, seed) for seed in (seeds or [None]) for row in TABLES[args.table][1]]
    try:
        reused = reusable_rows(all_jobs, out, args.reuse, preset=preset or None, dataset=args.dataset,
                               data_root=args.data_root, extra=extra)
    except Exception as e:  # noqa: BLE001
        return _user_error(e, "in --reuse")
    if args.list:
        for row, seed in jobs:
            slug = run_slug(row, seed)
            state = f"done in {reused[slug]}" if slug in reused else \
                _list_state(out / "rows" / f"{slug}.json", runs / slug)
            print(f"{slug:<20} {row.label:<22} {state}")
        return 0
    if args.no_train:
        jobs = []
    if showcase and preset == "showcase" and jobs:
        try:
            extra = ensure_pretrain(runs, extra, data_root=args.data_root)
        except Exception as e:  # noqa: BLE001
            return _user_error(e, "in the pretraining run")
    for row, seed in jobs:
        slug = run_slug(row, seed)
        if row_result(out / "rows" / f"{slug}.json") is not None:
            print(f"== {row.label} ({slug}): done, skipped")
            continue
        if slug in reused:
            print(f"== {row.label} ({slug}): done in {reused[slug]}, reused")
            continue
        try:
            res = run_row(row, out, preset=preset or None, dataset=args.dataset, data_root=args.data_root,
                          extra=extra, seed=seed, runs=runs)
        except Exception as e:  # noqa: BLE001 - a user-fixable failure is one line, anything else a bug
            return _user_error(e, f"in row {slug}")
        print(f"== {row.label} ({slug}): R1 {_pct(res['R1'])}%  mAP {_pct(res['mAP'])}%  mINP {_pct(res['mINP'])}%  "
              f"{res['params'] / 1e6:.2f} M params  {res['train_seconds'] / 60:.1f} min training")
        write_table(args.table, out, meta, seeds, reused)
    if showcase:
        showcase_attention(out, runs, seeds, dataset=args.dataset, data_root=args.data_root)
    md, js = write_table(args.table, out, meta, seeds, reused)
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
