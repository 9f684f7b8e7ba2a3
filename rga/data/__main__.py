"""Check a dataset folder: ``python -m rga.data NAME ROOT [KEY=VALUE ...]``.

Prints the summary table (ids / images / cameras per split) and every file name that did not
parse; generates the synthetic dataset if NAME is "synthetic" or "synthetic_scenes"; then decodes every image (as
rga.train does before its first epoch) and lists each one that cannot be read. Exit status 2 on
a layout error, an empty split or an unreadable image (one `error:` line on stderr).
"""
from __future__ import annotations

import argparse
import sys
import warnings

from ..value_parsers import parse_kv
from ..errors import DatasetCheckError, ReidError, run_cli
from . import DATASETS, build_dataset
from .check import SPLITS, check_dataset, unmatched_note


def check(a) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # listed in full below
        try:
            ds = build_dataset(a.name, a.root, **dict(a.options))
        except (ValueError, TypeError, KeyError) as e:  # an unknown name or option, a bad value
            raise ReidError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
    for split, names in ds.unparsed.items():
        print(f"{split}: {len(names)} file names did not parse:")
        for n in names:
            print(f"  {n}")
    if a.no_images:
        return
    try:
        report = check_dataset(ds, SPLITS)
    except DatasetCheckError as e:
        for split, items in getattr(e, "bad", {}).items():
            print(f"{split}: {len(items)} image(s) cannot be read:")
            for path, why in items:
                print(f"  {path}: {why}")
        raise
    print(f"all {report['images']} images decode")
    if unmatched_note(report, ds):
        print(unmatched_note(report, ds))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rga.data", description=__doc__.splitlines()[0])
    p.add_argument("name", help=", ".join(sorted(DATASETS)))
    p.add_argument("root", help="folder holding the dataset")
    p.add_argument("options", nargs="*", type=parse_kv, metavar="KEY=VALUE",
                   help="keyword arguments of build_dataset (values read as JSON when possible)")
    p.add_argument("--no-images", action="store_true", help="skip decoding the images")
    a = p.parse_args(argv)
    return run_cli("rga.data", check, a)


if __name__ == "__main__":
    sys.exit(main())
