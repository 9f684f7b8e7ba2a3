"""``python -m rga.visualize attention|relation|gradcam|ranks ...``: the paper's figures for your own
runs (``--help`` shows each command). The code is in ``rga.vis``, one module per figure; everything
it exports is importable from here too (``from rga import visualize as V``)."""
import sys

from .vis import *  # noqa: F401,F403 - the public names, under their old home
from .vis import __all__ as _VIS_ALL
from .vis.cli import build_parser, main  # noqa: F401

__all__ = ["main", "build_parser", *_VIS_ALL]

if __name__ == "__main__":
    sys.exit(main())
