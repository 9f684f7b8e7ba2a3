"""Follow the run configuration through a tiny training run and count the files it visits.

`rga.train.train(cfg)` runs one epoch of a ResNet-18 RGA-SC at 64x32 on a tiny synthetic set under
sys.setprofile, and two paths are recorded:

* A, the configuration's path: the files of the Python calls into `rga/` one of whose arguments
  (self included) is the RunConfig, one of its five section objects, or an object that holds the
  RunConfig as its ``cfg`` attribute (the Trainer);
* B, the pipeline's path: the files of the calls into `rga/` made by `rga/` code at most DEPTH (2)
  rga frames below train() (train's callees and theirs; calls coming through torch, such as a
  module's forward or a DataLoader's dataset, are not followed).

A *stay* is a maximal run of one file in a path; a *return* is a stay in a file the path had
already left. Printed per path: files, stays, returns, the stays per file and the path itself.
tests/test_config_trace.py holds path A to at most 6 files and 8 returns.

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


def run_traced(data_root, out_dir, depth: int = 2):
    """Train 1 epoch (tiny synthetic set in `data_root`, run folder `out_dir`) under sys.setprofile;
    returns (path A, path B): the rga/ files of the config calls, and of the rga calls made by
    rga code at most `depth` rga frames below train()."""
    import rga.train as T

    argv = ["--data-root", str(data_root), "--output-dir", str(out_dir), "--backbone", "resnet18",
            "--height", "64", "--width", "32", "--batch-ids", "4", "--batch-instances", "2", "--workers", "0",
            "--threads", "1", "--eval-every", "0", "--warmup-epochs", "1", "--test-batch-size", "32",
            "--no-progress", "--pretrained", "none", "--epochs", "1"]
    for k, v in TINY.items():
        argv += ["--dataset-opt", f"{k}={v}"]
    cfg = T.parse_config(argv)
    # by type, not identity: the Trainer works on its own copy of the configuration
    carriers = (type(cfg),) + tuple(type(getattr(cfg, s)) for s in ("model", "data", "optim", "eval", "run"))
    pkg = str(ROOT / "rga") + os.sep
    path, calls = [], []

    def holds_cfg(v):
        return isinstance(v, carriers) or isinstance(getattr(v, "__dict__", {}).get("cfg", None), carriers)

    def profile(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(pkg):
            return
        code = frame.f_code
        n = code.co_argcount + code.co_kwonlyargcount
        if any(holds_cfg(frame.f_locals.get(name)) for name in code.co_varnames[:n]):
            path.append(os.path.relpath(code.co_filename, ROOT))
        level, f = 0, frame.f_back
        if f is None or not f.f_code.co_filename.startswith(pkg):
            return  # called from torch / the standard library (a forward, a DataLoader), not the pipeline
        while f is not None and f.f_code.co_filename.startswith(pkg):
            if f.f_code.co_name == "train" and f.f_code.co_filename.endswith("train.py"):
                if level < depth:
                    calls.append(os.path.relpath(code.co_filename, ROOT))
                return
            level += 1
            f = f.f_back

    sys.setprofile(profile)
    try:
        T.train(cfg)
    finally:
        sys.setprofile(None)
    return path, ["rga/train.py"] + calls


def summarize(path):
    """(files, stays, returns) of a path of files."""
    stays = [f for i, f in enumerate(path) if i == 0 or path[i - 1] != f]
    seen, returns = set(), 0
    for f in stays:
        returns += f in seen
        seen.add(f)
    return seen, stays, returns


def main() -> int:
    from rga.data import build_dataset

    tmp = Path(tempfile.mkdtemp(prefix="cfgtrace-"))
    build_dataset("synthetic", str(tmp / "data"), verbose=False, **TINY)
    path_a, path_b = run_traced(tmp / "data", tmp / "run", DEPTH)
    report("A (calls receiving the config or its holder)", path_a)
    report(f"B (rga calls by rga code, depth <= {DEPTH} below train())", path_b)
    return 0


DEPTH = 2


def report(title, path):
    seen, stays, returns = summarize(path)
    print(f"{title}: calls {len(path)}; files: {len(seen)}; stays: {len(stays)}; returns: {returns}")
    for f, n in collections.Counter(stays).most_common():
        print(f"  {n:3d} stays  {f}")
    print("  path:", " > ".join(Path(f).stem for f in stays))


if __name__ == "__main__":
    sys.exit(main())
