"""The command line of ``python -m rga.visualize``: one parser, four subcommands, each run by its
figure's module (attention, relation, gradcam, ranks)."""
from __future__ import annotations

import argparse

import torch

from ..errors import run_cli
from ..value_parsers import positive_int
from .attention import cmd_attention
from .drawing import STRETCHES
from .gradcam import cmd_gradcam
from .ranks import cmd_ranks
from .relation import cmd_relation

DESCRIPTION = ("The paper's figures for your own runs: attention (Fig. 1), relations (Fig. 4), Grad-CAM (Fig. 5), "
               "ranked lists, CMC.")
USAGE = """
  python -m rga.visualize attention RUN [IMAGES...] [--dataset synthetic --limit 200] [--compare RUN2]
                                    [--stretch per-map] --out DIR
  python -m rga.visualize relation RUN IMAGE [--compare RUN2] [--targets R,C R,C R,C] [--stage 1] --out DIR
  python -m rga.visualize gradcam RUN IMAGES... [--compare RUN2] --out DIR
  python -m rga.visualize ranks RUN [--dataset synthetic] [--top 10] [--num-queries 8] --out DIR

RUN is a run folder or checkpoint of rga.train, or init:ARCH for a randomly initialised model
(with --backbone/--height/--width, default the quick preset's resnet18 at 64x32), the untrained
control. Needs matplotlib (pip install -e ".[vis]"); gradcam also needs the grad-cam package.
"""


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
    from ..value_parsers import parse_kv
    p.add_argument("--dataset-opt", action="append", default=[], type=parse_kv, metavar="KEY=VALUE",
                   help="build_dataset keyword, repeatable, as rga.train's" + default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rga.visualize", description=DESCRIPTION, epilog=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attention", help="spatial attention overlays per stage (Fig. 1) and the foreground ratio")
    a.add_argument("run")
    a.add_argument("images", nargs="*", help="image files (the synthetic set's have masks); or use --dataset")
    a.add_argument("--dataset", help="take the images from this dataset's --split instead (e.g. synthetic)")
    a.add_argument("--data-root", default="data")
    _dataset_opt_arg(a)
    a.add_argument("--split", default="query", choices=("query", "gallery", "train"))
    a.add_argument("--limit", type=positive_int, default=200, help="images taken from --dataset (default 200)")
    a.add_argument("--show", type=positive_int, default=6, help="images drawn in attention.png (default 6)")
    a.add_argument("--stages", type=int, nargs="*", help="stages to draw (default: all with a spatial attention)")
    a.add_argument("--stretch", choices=STRETCHES, default="shared",
                   help="colours: one scale for all maps, with a colour bar (shared, default), or each map "
                        "stretched to its own min..max (per-map)")
    _model_args(a)
    r = sub.add_parser("relation", help="relation values R(i, :) for three target positions (Fig. 4)")
    r.add_argument("run")
    r.add_argument("image")
    r.add_argument("--targets", nargs="+", metavar="ROW,COL", help="target cells on the stage's feature grid")
    r.add_argument("--stage", type=int, default=1, choices=(1, 2, 3, 4), help="stage (default 1, the finest grid)")
    r.add_argument("--dataset", help="also average the position invariance over this dataset's query images")
    r.add_argument("--data-root", default="data")
    _dataset_opt_arg(r)
    r.add_argument("--limit", type=positive_int, default=50, help="images for the --dataset average (default 50)")
    _model_args(r)
    g = sub.add_parser("gradcam", help="Grad-CAM of the final stage for two models side by side (Fig. 5)")
    g.add_argument("run")
    g.add_argument("images", nargs="+")
    g.add_argument("--show", type=positive_int, default=6, help="images drawn in gradcam.png (default 6; the ratio uses all)")
    _model_args(g)
    k = sub.add_parser("ranks", help="query + top-k gallery sheet (green: same identity, red: not) and cmc.png")
    k.add_argument("run")
    k.add_argument("--dataset", default=None, help="dataset (default: the run's)")
    k.add_argument("--data-root", default=None, help="dataset folder (default: the run's)")
    _dataset_opt_arg(k, " (default: the run's, when the dataset is the run's)")
    k.add_argument("--top", type=positive_int, default=10)
    k.add_argument("--num-queries", type=positive_int, default=8, help="queries drawn (default 8, evenly spaced)")
    k.add_argument("--batch-size", type=int, default=64)
    _model_args(k)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cmd = {"attention": cmd_attention, "relation": cmd_relation, "gradcam": cmd_gradcam, "ranks": cmd_ranks}
    return run_cli(f"rga.visualize {args.command}", cmd[args.command], args,
                   user_errors=(ValueError, FileNotFoundError, ImportError))
