"""Follow the run configuration through a tiny training run and count the files it visits.

Definition. `rga.train.train(cfg)` runs a 1-epoch ResNet-18 RGA-SC run on a tiny synthetic set
under sys.setprofile. A *config call* is a Python call into a file of the `rga/` package one of
whose arguments (self included) is the RunConfig, one of its five section objects, or an object
that holds the RunConfig as an attribute (a Trainer). The *path* is the sequence of those calls'
files in call order; a *stay* is a maximal run of one file in it; a *return* is a stay in a file
the path had already left. Printed: files, stays, returns, and the stays per file.

    python tools/config_trace.py
"""
from __future__ import annotations

import collections
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = dict(num_train_ids=8, num_test_ids=4, num_cameras=2, min_cams_per_id=2, max_cams_per_id=2,
            min_imgs_per_cam=2, max_imgs_per_cam=2, num_distractors=2, height=64, width=32)


def main() -> int:
    import rga.train as T
    from rga.data import build_dataset

    tmp = Path(tempfile.mkdtemp(prefix="cfgtrace-"))
    build_dataset("synthetic", str(tmp / "data"), verbose=False, **TINY)
    argv = ["--data-root", str(tmp / "data"), "--output-dir", str(tmp / "run"), "--backbone", "resnet18",
            "--height", "64", "--width", "32", "--batch-ids", "4", "--batch-instances", "2", "--workers", "0",
            "--threads", "1", "--eval-every", "0", "--warmup-epochs", "1", "--test-batch-size", "32",
            "--no-progress", "--pretrained", "none", "--epochs", "1"]
    for k, v in TINY.items():
        argv += ["--dataset-opt", f"{k}={v}"]
    cfg = T.parse_config(argv)
    carriers = {id(cfg)} | {id(getattr(cfg, s)) for s in ("model", "data", "optim", "eval", "run")}
    pkg = str(ROOT / "rga") + os.sep
    path = []

    def holds_cfg(v):
        return id(v) in carriers or id(getattr(v, "__dict__", {}).get("cfg", None)) in carriers

    def prof(frame, event, arg):
        if event != "call":
            return
        fn = frame.f_code.co_filename
        if not fn.startswith(pkg):
            return
        code = frame.f_code
        n = code.co_argcount + code.co_kwonlyargcount
        loc = frame.f_locals
        if any(holds_cfg(loc.get(name)) for name in code.co_varnames[:n]):
            path.append(os.path.relpath(fn, ROOT))

    calls = []  # definition B: (depth, file) of rga calls made by rga code below train()

    def prof_b(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(pkg):
            return
        depth, f = 0, frame.f_back
        if f is None or not f.f_code.co_filename.startswith(pkg):
            return  # called from torch / the standard library (a forward, a DataLoader), not the pipeline
        while f is not None and f.f_code.co_filename.startswith(pkg):
            if f.f_code.co_name == "train" and f.f_code.co_filename.endswith("train.py"):
                if depth < DEPTH:
                    calls.append(os.path.relpath(frame.f_code.co_filename, ROOT))
                return
            depth += 1
            f = f.f_back

    def both(frame, event, arg):
        prof(frame, event, arg)
        prof_b(frame, event, arg)

    sys.setprofile(both)
    try:
        T.train(cfg)
    finally:
        sys.setprofile(None)
    report("A (calls receiving the config or its holder)", path)
    report(f"B (rga calls by rga code, depth <= {DEPTH} below train())", ["rga/train.py"] + calls)
    return 0


DEPTH = 2


def report(title, path):
    stays = [f for i, f in enumerate(path) if i == 0 or path[i - 1] != f]
    seen, returns = set(), 0
    for f in stays:
        returns += f in seen
        seen.add(f)
    print(f"{title}: calls {len(path)}; files: {len(seen)}; stays: {len(stays)}; returns: {returns}")
    for f, n in collections.Counter(stays).most_common():
        print(f"  {n:3d} stays  {f}")
    print("  path:", " > ".join(Path(f).stem for f in stays))


if __name__ == "__main__":
    sys.exit(main())
