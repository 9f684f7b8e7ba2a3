"""The rows of the paper's tables and what one row's run is: :class:`Row` (a slug, rga.train's
``--model`` row, the paper's R1 / mAP), :data:`TABLES` (Table 1, 2, 4 and the showcase, in the
paper's order), a run's folder name (:func:`run_slug`) and command line (:func:`train_argv`), a
finished row's checked result (:func:`read_row`), and the showcase's pretraining run
(:func:`ensure_pretrain`). rga.experiments runs the tables from these, rga.experiment_figures
the figures."""
from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

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


def hardware() -> str:
    """The machine in one line (architecture, GPU or CPU cores, torch), for the tables and figures.json."""
    import os
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{platform.machine()} {dev}, torch {torch.__version__}"
