"""``python -m rga.visualize``: the paper's figures for your own runs (the code is in ``rga.vis``).

    python -m rga.visualize attention RUN [IMAGES...] [--dataset synthetic --limit 200] --out DIR
    python -m rga.visualize relation RUN IMAGE [--compare RUN2] --out DIR
    python -m rga.visualize gradcam RUN IMAGES... [--compare RUN2] --out DIR
    python -m rga.visualize ranks RUN [--top 10] --out DIR

Everything ``rga.vis`` exports is importable from here too (``from rga import visualize as V``).
"""
import sys

from .vis import *  # noqa: F401,F403 - the public names, under their old home
from .vis import __all__ as _VIS_ALL
from .vis.cli import build_parser, main  # noqa: F401

__all__ = ["main", "build_parser", *_VIS_ALL]

if __name__ == "__main__":
    sys.exit(main())
