"""Train and evaluate every row of the paper's Table 1, 2 or 4 in one go.

    python -m rga.experiments table1|table2|table4 [--dataset synthetic] [--preset quick] [--out DIR]
                              [--rows SLUG ...] [--list] [-- extra rga.train flags]

Each row is one ``rga.train`` run in ``DIR/runs/<slug>`` with ``--resume auto``, and its result is
written to ``DIR/rows/<slug>.json`` once the run has finished and been evaluated. A killed runner,
started again with the same command, skips the finished rows and resumes the interrupted one from
its last checkpoint (which, on the CPU, ends with exactly the weights of an uninterrupted run).
After every row, ``DIR/<table>.md`` and ``DIR/<table>.json`` are rewritten: the rows in the paper's
order with R1, mAP, mINP, parameters and training time, and the paper's published R1 / mAP on
CUHK03 (labeled) and Market-1501 beside ours. Rows not run yet show as "pending".

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
from .registry import PAPER_LABELS, RGA_OPTIONS, model_rows


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
        return {k: row[k] for k, v in RGA_OPTIONS.items() if row[k] != v}


BASE = Row("baseline", "baseline", "Baseline", (73.8, 69.0, 94.2, 83.7))
RGA_S = Row("rga_s", "rga_s", "Spatial", (79.3, 74.7, 96.0, 87.5))
RGA_C = Row("rga_c", "rga_c", "Channel", (79.3, 75.6, 95.9, 87.9))
RGA_SC = Row("rga_sc", "rga_sc", "Both", (81.1, 77.4, 96.1, 88.4))

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
         Row("nl", "nl", "Spatial", (76.6, 72.6, 95.6, 87.4)),
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


def train_argv(row: Row, run_dir: Path, preset: str | None, dataset: str | None, data_root: str | None,
               extra: list[str]) -> list[str]:
    """rga.train's command line for one row: preset, dataset, the extra flags, then the row's --model."""
    argv = []
    if preset:
        argv += ["--preset", preset]
    if dataset:
        argv += ["--dataset", dataset]
    if data_root:
        argv += ["--data-root", data_root]
    return argv + list(extra) + ["--model", row.model, "--output-dir", str(run_dir), "--resume", "auto",
                                 "--no-progress"]


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


def run_row(row: Row, out: Path, *, preset, dataset, data_root, extra, log=print) -> dict:
    from . import train as T
    from .checkpoint import find_latest, load_checkpoint
    from .models import count_parameters

    run_dir = out / "runs" / row.slug
    argv = train_argv(row, run_dir, preset, dataset, data_root, extra)
    cfg = T.parse_config(argv)
    log(f"== {row.label} ({row.slug}): python -m rga.train {' '.join(argv)}")
    t0 = time.perf_counter()
    metrics = T.train(cfg)
    wall = time.perf_counter() - t0
    if not metrics:
        raise RuntimeError(f"{row.slug}: training returned no metrics (see {run_dir / 'train.log'})")
    ckpt = load_checkpoint(find_latest(run_dir))
    m = cfg.model
    params = count_parameters(row.variant, int(ckpt["num_classes"]), height=m.height, width=m.width,
                              backbone=m.backbone, **row.options)
    secs, epochs = train_seconds(run_dir)
    result = {"slug": row.slug, "label": row.label, "arch": row.variant, "options": row.options,
              "R1": metrics["R1"], "R5": metrics["R5"], "mAP": metrics["mAP"], "mINP": metrics["mINP"],
              "num_query": metrics.get("num_query"), "num_test_ids": metrics.get("num_test_ids"),
              "epoch": metrics.get("epoch"), "params": params, "train_seconds": secs, "epochs_logged": epochs,
              "last_call_wall_seconds": wall, "run_dir": str(run_dir),
              "dataset": cfg.data.dataset, "backbone": m.backbone, "input": f"{m.height}x{m.width}",
              "preset": preset, "extra_args": list(extra), "fused_rga": m.fused, "train_argv": argv}
    write_text(json.dumps(result, indent=2, default=str) + "\n", out / "rows" / f"{row.slug}.json")
    return result


def collect(table: str, out: Path) -> list[tuple[Row, dict | None]]:
    _title, rows = TABLES[table]
    found = []
    for row in rows:
        p = out / "rows" / f"{row.slug}.json"
        found.append((row, json.loads(p.read_text()) if p.is_file() else None))
    return found


def _pct(v):
    return f"{100 * v:.1f}"


def write_table(table: str, out: Path, meta: dict) -> tuple[Path, Path]:
    """DIR/<table>.md and .json from the finished rows (pending rows marked), in the paper's order."""
    title, _rows = TABLES[table]
    found = collect(table, out)
    done = [r for _, r in found if r is not None]
    setup = sorted({f"{r['dataset']} {r['backbone']} {r['input']}" for r in done}) or ["-"]
    lines = [f"# {title}", "",
             f"Ours: {', '.join(setup)}, preset {meta.get('preset')}, extra flags "
             f"{' '.join(meta.get('extra_args') or []) or '(none)'}; {meta.get('hardware', '')}. "
             "Paper: ResNet-50 at 256x128 with ImageNet weights, 600 epochs (CUHK03 labeled / Market-1501).", "",
             "| group | model | R1 | mAP | mINP | params (M) | train time | paper CUHK03(L) R1 / mAP | "
             "paper Market R1 / mAP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, res in found:
        paper = row.paper
        pc = f"{paper[0]:.1f} / {paper[1]:.1f}" if paper else "-"
        pm = f"{paper[2]:.1f} / {paper[3]:.1f}" if paper else "-"
        if res is None:
            lines.append(f"| {row.group} | {row.label} | pending | | | | | {pc} | {pm} |")
            continue
        t = res["train_seconds"]
        lines.append(f"| {row.group} | {row.label} | {_pct(res['R1'])} | {_pct(res['mAP'])} | {_pct(res['mINP'])} | "
                     f"{res['params'] / 1e6:.2f} | {t / 60:.1f} min | {pc} | {pm} |")
    if done:
        ids = {r.get("num_test_ids") for r in done}
        lines += ["", f"R1 / mAP / mINP in %, ours on {done[0].get('num_query')} queries of "
                      f"{', '.join(str(i) for i in sorted(x for x in ids if x))} identities (chance R1 about "
                      f"{100 / max(min(x for x in ids if x), 1):.1f}%). Train time: the sum of the epochs' "
                      "training times in train.log (evaluation not included)."]
    md = out / f"{table}.md"
    write_text("\n".join(lines) + "\n", md)
    js = out / f"{table}.json"
    write_text(json.dumps({"table": table, "title": title, **meta,
                           "rows": [{"slug": row.slug, "label": row.label, "group": row.group,
                                     "paper": dict(zip(("cuhk03_R1", "cuhk03_mAP", "market_R1", "market_mAP"),
                                                       row.paper)) if row.paper else None,
                                     "ours": res} for row, res in found]},
                          indent=2, default=str) + "\n", js)
    return md, js


def _hardware() -> str:
    import os
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{platform.machine()} {dev}, torch {torch.__version__}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rga.experiments", description=__doc__.split("\n")[0],
                                epilog="flags after -- are passed to rga.train")
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--dataset", default=None, help="dataset (default: the preset's, else rga.train's)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--preset", default="quick", help="rga.train preset for every row (default quick; '' for none)")
    p.add_argument("--out", default=None, help="output folder (default runs/experiments/<table>)")
    p.add_argument("--rows", nargs="+", metavar="SLUG", help="run only these rows (default: all, in order)")
    p.add_argument("--list", action="store_true", help="list the rows and their state, run nothing")
    return p


def main(argv=None) -> int:
    from .errors import user_message

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    out = Path(args.out or f"runs/experiments/{args.table}")
    out.mkdir(parents=True, exist_ok=True)
    _title, rows = TABLES[args.table]
    if args.rows:
        unknown = set(args.rows) - {r.slug for r in rows}
        if unknown:
            print(f"rga.experiments: error: unknown rows {sorted(unknown)}; {args.table} has "
                  f"{[r.slug for r in rows]}", file=sys.stderr)
            return 2
        rows = [r for r in rows if r.slug in args.rows]
    meta = {"preset": args.preset or None, "extra_args": extra, "hardware": _hardware(),
            "command": "python -m rga.experiments " + " ".join(argv + (["--"] + extra if extra else []))}
    if args.list:
        for row, res in collect(args.table, out):
            state = "done" if res else ("started" if (out / "runs" / row.slug).is_dir() else "pending")
            print(f"{row.slug:<14} {row.label:<22} {state}")
        return 0
    for row in rows:
        if (out / "rows" / f"{row.slug}.json").is_file():
            print(f"== {row.label} ({row.slug}): done, skipped")
            continue
        try:
            res = run_row(row, out, preset=args.preset or None, dataset=args.dataset, data_root=args.data_root,
                          extra=extra)
        except Exception as e:  # noqa: BLE001 - a user-fixable failure is one line, anything else a bug
            message = user_message(e)
            if message is None:
                raise
            print(f"rga.experiments: error in row {row.slug}: {message}", file=sys.stderr)
            return 2
        print(f"== {row.label}: R1 {_pct(res['R1'])}%  mAP {_pct(res['mAP'])}%  mINP {_pct(res['mINP'])}%  "
              f"{res['params'] / 1e6:.2f} M params  {res['train_seconds'] / 60:.1f} min training")
        write_table(args.table, out, meta)
    md, js = write_table(args.table, out, meta)
    print(md.read_text())
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
