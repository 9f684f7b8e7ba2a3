import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be switched on before any kernel
# is decorated, i.e. before rga_kernels._triton is imported (rga_kernels imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests check values, not speed: one fixed Triton config instead of benchmarking a dozen per shape
# (read at every launch, so this holds whatever test file imports the kernels first).
os.environ.setdefault("RGA_TRITON_AUTOTUNE", "0")

# The reference must not use TF32 on a GPU: tolerances are measured against true fp32/fp64.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# The shared helpers live in testkit.py (importable from every test file); the fixtures below.


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A tiny synthetic dataset (testkit.TINY_DATA: 8 training identities, 32 images), per module."""
    from testkit import build_tiny_dataset

    root = tmp_path_factory.mktemp("data")
    ds = build_tiny_dataset(root)
    assert ds.num_train_pids == 8 and len(ds.train) == 32
    return root


@pytest.fixture(scope="module")
def market_root(tmp_path_factory):
    """The tiny synthetic set (testkit.TINY_LAYOUT at 128x64) in Market-1501's layout, made by
    `python -m rga.data synthetic`, per module."""
    import subprocess
    import sys

    from testkit import REPO, SUBPROCESS_ENV, TINY_LAYOUT

    root = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, "-m", "rga.data", "synthetic", str(root), *TINY_LAYOUT], env=SUBPROCESS_ENV,
                   cwd=REPO, check=True, capture_output=True)
    return root / "synthetic"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A run folder holding one checkpoint of a ResNet-18 baseline at 64x32 (format 1), per module."""
    from testkit import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("run"), 64, 32)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Six random crops named like Market-1501's (testkit.write_gallery), per module."""
    from testkit import write_gallery

    return write_gallery(tmp_path_factory.mktemp("gallery"))


@pytest.fixture(scope="module")
def two_epoch_run(data_root, tmp_path_factory):
    """A finished 2-epoch tiny run (testkit.train_tiny on `data_root`) keeping both checkpoints, per module."""
    from testkit import train_tiny

    out = tmp_path_factory.mktemp("run2") / "E"
    assert train_tiny(data_root, out, "--epochs", "2", "--keep-checkpoints", "0") == 0
    return out


@pytest.fixture(scope="module")
def market_copy(data_root, tmp_path_factory):
    """The training, query and gallery folders of `data_root`'s synthetic set, copied into a folder of
    their own (read as --dataset market1501), per module; testkit.broken_copy damages a copy of it."""
    import shutil
    from pathlib import Path

    src = Path(data_root) / "synthetic"
    dst = tmp_path_factory.mktemp("market") / "clean"
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        shutil.copytree(src / split, dst / split)
    return dst
