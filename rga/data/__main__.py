"""Check a dataset folder: ``python -m rga.data NAME ROOT [KEY=VALUE ...]``.

Prints the summary table (ids / images / cameras per split) and every file name that did not
parse; generates the synthetic dataset if NAME is "synthetic". Exit status 1 on a layout error.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from ..config import parse_kv
from . import DATASETS, build_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rga.data", description=__doc__.splitlines()[0])
    p.add_argument("name", help=", ".join(sorted(DATASETS)))
    p.add_argument("root", help="folder holding the dataset")
    p.add_argument("options", nargs="*", type=parse_kv, metavar="KEY=VALUE",
                   help="keyword arguments of build_dataset (values read as JSON when possible)")
    a = p.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # listed in full below
            ds = build_dataset(a.name, a.root, **dict(a.options))
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, names in ds.unparsed.items():
        print(f"{split}: {len(names)} file names did not parse:")
        for n in names:
            print(f"  {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
