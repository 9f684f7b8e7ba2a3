"""The tests' shared plumbing: the backend list, inputs, the accuracy comparison and file helpers.

Test files import them (``from testkit import ...``; tests/ is on sys.path under pytest). The module
is not named conftest so that ``pytest tests bench`` (whose bench/ has its own conftest.py) imports
the right one. The environment switches and the fixtures are in conftest.py.
"""
# ------------------------------------------------------------------------------------------------
# Shared test plumbing: the backend list, inputs and the accuracy comparison live here once, so a
# new backend touches one list (rga_kernels.BACKENDS) and the tolerance rule one function.
# ------------------------------------------------------------------------------------------------
import os
from pathlib import Path

import pytest
import torch

import rga_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST_BACKENDS = tuple(b for b in rga_kernels.BACKENDS if b != "reference")


def backend_params(backends=FAST_BACKENDS, devices=DEVICES, extra_reason=None, with_device=True):
    """pytest.param((device,) backend) for every pair; a pair this machine cannot run is skipped
    with the reason backend_status gives (or ``extra_reason(device, backend)``, when it returns one)."""
    params = []
    for dev in devices:
        status = rga_kernels.backend_status(dev)
        for b in backends:
            ok, why = status[b]
            if ok and extra_reason is not None and extra_reason(dev, b):
                ok, why = False, extra_reason(dev, b)
            marks = () if ok else (pytest.mark.skip(reason=f"{b} on {dev}: {why}"),)
            values = (dev, b) if with_device else (b,)
            params.append(pytest.param(*values, id=f"{dev}-{b}" if with_device else b, marks=marks))
    return params


def relation_inputs(B, d, n, M, dtype=torch.float32, device="cpu", seed=0, grad=False, scale=1.0,
                    requires_grad=False):
    """theta, phi (B, d, n) (times `scale`), weight (M, 2n) scaled like a real embedding, and with
    grad=True the output gradient (B, M, n): drawn in float64 from a seeded generator, then cast.
    requires_grad: theta, phi and weight as leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, d, n, generator=g, dtype=torch.float64) * scale,
          torch.randn(B, d, n, generator=g, dtype=torch.float64) * scale,
          torch.randn(M, 2 * n, generator=g, dtype=torch.float64) / (2 * n) ** 0.5]
    if grad:
        ts.append(torch.randn(B, M, n, generator=g, dtype=torch.float64))
    ts = [t.to(device=device, dtype=dtype) for t in ts]
    for t in ts[:3]:
        t.requires_grad_(requires_grad)
    return ts


def forward_backward(fn, inputs, grad, dtype=None):
    """[out, *gradients of the inputs] of ``fn(*inputs)`` for the output gradient `grad`, through
    autograd, on fresh leaves (cast to `dtype` when given: float64 makes it the reference)."""
    leaves = [(t.detach().to(dtype) if dtype is not None else t.detach().clone()).requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad if dtype is None else grad.to(dtype))
    return [out.detach(), *grads]


def assert_within_torch_error(name, got, ref64, torch_lowp, k=3.0, rel_floor=1e-6):
    """Flash-attention-style tolerance: the error of ``got`` against a float64 reference at most k
    times PyTorch's own error in the same dtype (``torch_lowp``), plus a small relative floor.
    Without ``torch_lowp`` (float64 inputs) the error must be at float64 rounding level."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten output?)"
    err = (got.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    if torch_lowp is None:
        tol = 1e-12 * max(scale, 1.0)
    else:
        tol = k * (torch_lowp.double() - ref64).abs().max().item() + rel_floor * scale + 1e-12
    assert err <= tol, f"{name} {got.dtype}: error {err:.3e} > tolerance {tol:.3e} (max |ref| {scale:.3g})"


def read_only_folder(tmp_path):
    """A folder this process cannot create files in (root ignores permission bits: use sysfs)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    d = "/sys/kernel"
    try:
        os.close(os.open(os.path.join(d, ".rga-probe"), os.O_WRONLY | os.O_CREAT, 0o666))
    except OSError:
        return d
    pytest.skip("no read-only folder available to this user")


# ------------------------------------------------------------------------------------------------
# Tiny training runs: a ResNet-18 RGA-SC at 64x32 on a synthetic set of 8 training identities
# (conftest.py's `data_root` fixture builds the set; rga.train's flags for a run come from here).
# ------------------------------------------------------------------------------------------------
#: the tiny set's identities and cameras (conftest.py's `market_root` generates it at the default 128x64)
TINY_LAYOUT = ["num_train_ids=8", "num_test_ids=4", "num_cameras=2", "min_cams_per_id=2", "max_cams_per_id=2",
               "min_imgs_per_cam=2", "max_imgs_per_cam=2", "num_distractors=2"]
TINY_DATA = TINY_LAYOUT + ["height=64", "width=32"]


def build_tiny_dataset(root):
    from rga.data import build_dataset
    return build_dataset("synthetic", str(root), verbose=False,
                         **{k: int(v) for k, v in (kv.split("=") for kv in TINY_DATA)})


def tiny_run_args(data_root, out, *extra, dataset=None, pretrained="none"):
    """rga.train's command line for a tiny CPU run into `out` (one thread, no evaluation before the
    last epoch); `dataset` adds --dataset (the synthetic one gets TINY_DATA's options); `pretrained`
    None leaves --pretrained at its default."""
    args = ["--data-root", str(data_root), "--output-dir", str(out), "--backbone", "resnet18",
            "--height", "64", "--width", "32", "--batch-ids", "4", "--batch-instances", "2", "--workers", "0",
            "--threads", "1", "--eval-every", "0", "--warmup-epochs", "1", "--test-batch-size", "32",
            "--no-progress"]
    if dataset is not None:
        args += ["--dataset", dataset]
    if pretrained is not None:
        args += ["--pretrained", pretrained]
    if dataset in (None, "synthetic"):
        for kv in TINY_DATA:
            args += ["--dataset-opt", kv]
    return args + list(extra)


def train_tiny(data_root, out, *extra, dataset="synthetic"):
    """rga.train.main (its exit code) for a tiny run (tiny_run_args with --dataset `dataset` and
    --pretrained at its default)."""
    import rga.train

    return rga.train.main(tiny_run_args(data_root, out, *extra, dataset=dataset, pretrained=None))


def broken_copy(market_copy, tmp_path, how):
    """A copy of `market_copy` (conftest.py's fixture) at tmp_path/`how`, damaged as `how` says:
    "empty_query" (no query image), "bad_gallery" or "bad_train" (one image of that split is not a
    JPEG); returns (root, the text the error must name)."""
    import shutil

    root = tmp_path / how
    shutil.copytree(market_copy, root)
    if how == "empty_query":
        for p in (root / "query").iterdir():
            p.unlink()
        return root, "empty split(s): query"
    split = "bounding_box_test" if how == "bad_gallery" else "bounding_box_train"
    victim = sorted((root / split).iterdir())[3]
    victim.write_bytes(b"this is not a JPEG")
    return root, f"{victim} (UnidentifiedImageError: cannot identify image file)"


def quick_market_args(root, out, *extra):
    """rga.train's command line for a quick-preset run on the Market-1501-layout folder `root`
    (conftest.py's `market_root`), one thread, into `out`."""
    return ["--preset", "quick", "--threads", "1", "--dataset", "market1501", "--data-root", str(root),
            "--batch-ids", "4", "--batch-instances", "2", "--output-dir", str(out), "--no-progress", *extra]


# ------------------------------------------------------------------------------------------------
# The comparison: assert_close(got, expected, "name") with the tolerances below, each named for what
# it compares (torch.testing.assert_close's own dtype defaults when no name is given). Low-precision
# kernels against a float64 reference use the shared rule instead: assert_within_torch_error.
# ------------------------------------------------------------------------------------------------
TOLERANCES = {
    "exact": dict(rtol=0, atol=0),                   # bit for bit
    "float64": dict(rtol=1e-10, atol=1e-10),         # the same float64 math by another route
    "float64_tight": dict(rtol=1e-10, atol=1e-12),   # ... with values near zero held tighter
    "float64_regrouped": dict(rtol=1e-9, atol=1e-10),  # float64 sums taken in another grouping
    "float64_grad": dict(rtol=1e-9, atol=1e-9),      # float64 gradients through another route
    "compiled": dict(rtol=1e-7, atol=1e-8),          # torch.compile against eager, float64
    "float32": dict(rtol=1e-4, atol=1e-5),           # float32 by another op order
    "float32_loss": dict(rtol=1e-5, atol=1e-6),      # a float32 scalar (a loss) by another route
    "float32_grad": dict(rtol=1e-4, atol=1e-6),      # float32 gradients by another route
    "float32_abs": dict(rtol=1e-5, atol=1e-5),       # float32 outputs of order one
    "float32_wide": dict(rtol=1e-4, atol=1e-4),      # float32 against a float64 reference
    "similarity": dict(rtol=0, atol=1e-5),           # cosine similarities in [-1, 1], float32
}


def assert_close(got, expected, tol: str | None = None, **kw):
    """torch.testing.assert_close with the named tolerance `tol` (see TOLERANCES)."""
    torch.testing.assert_close(got, expected, **(TOLERANCES[tol] if tol is not None else {}), **kw)


# ------------------------------------------------------------------------------------------------
# The error and file-safety tests' helpers: the one-line error rule, a subprocess's environment, a
# tiny gallery, run folder and exported program, and a pickle whose loading leaves a trace.
# ------------------------------------------------------------------------------------------------
#: the repository's root; a subprocess test runs there with SUBPROCESS_ENV (one thread, no warnings,
#: this checkout's packages first)
REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


def one_error_line(err: str) -> str:
    """The one `PROG: error: ...` line that stderr must be (no traceback)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert ": error: " in lines[0], lines[0]
    return lines[0]


def write_gallery(root):
    """Six random 96x48 crops named like Market-1501's (3 identities x 2 cameras) in `root`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for pid in (1, 2, 3):
        for cam in (1, 2):
            Image.fromarray(rng.integers(0, 256, (96, 48, 3), dtype=np.uint8)).save(
                root / f"{pid:04d}_c{cam}s1_000001_00.png")
    return root


def write_tiny_checkpoint(folder, height=64, width=32):
    """`folder`/checkpoint_ep0001.pth: a ResNet-18 baseline at height x width (format 1)."""
    from rga import build_model

    torch.manual_seed(0)
    model = build_model("baseline", 5, height=height, width=width, backbone="resnet18", pretrained=False).eval()
    config = {"arch": "baseline", "backbone": "resnet18", "height": height, "width": width}
    torch.save({"epoch": 1, "model": model.state_dict(), "config": config, "num_classes": 5},
               folder / "checkpoint_ep0001.pth")
    return folder


def tiny_exported_program():
    """torch.export of a Linear(4, 2): the smallest ExportedProgram."""
    return torch.export.export(torch.nn.Linear(4, 2), (torch.randn(2, 4),))


class CodeRunningPayload:
    """Unpickling this creates the file `marker`: the proof that loading ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
