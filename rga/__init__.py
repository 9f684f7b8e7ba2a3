"""Relation-Aware Global Attention (RGA, CVPR 2020) for person re-id.

The public names load on first use (PEP 562), so ``import rga`` imports none of the submodules.
This matters for the command-line modules: ``python -m rga.models --params`` makes runpy import
the package first and then run ``rga/models.py`` as ``__main__``; had the package already
imported ``rga.models``, the module would run twice and runpy would warn ("'rga.models' found in
sys.modules after import of package 'rga'"). ``tests/test_cli_entry.py`` checks every
``python -m rga.X`` command for that warning. For those commands the package also installs one
hook (``rga.errors.install_closed_pipe_hook``): a reader that stops early ends them quietly.
"""
from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

if sys.argv[:1] == ["-m"]:  # runpy imports this package for `python -m rga.X`: argv[0] is "-m" until it runs X
    from .errors import install_closed_pipe_hook

    install_closed_pipe_hook()  # a closed stdout (`... | head`) ends any of our commands quietly

# public name -> the module that defines it
_EXPORTS = {
    "FeatureExtractor": "rga.extractor",
    "RGAModule": "rga.modules",
    "build_model": "rga.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rga' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; never runs
    from .extractor import FeatureExtractor
    from .models import build_model
    from .modules import RGAModule
