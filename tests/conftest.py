import os

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


# ------------------------------------------------------------------------------------------------
# Shared test plumbing: the backend list, inputs and the accuracy comparison live here once, so a
# new backend touches one list (rga_kernels.BACKENDS) and the tolerance rule one function.
# Test files import them (`from conftest import ...`; tests/ is on sys.path under pytest).
# ------------------------------------------------------------------------------------------------
import pytest  # noqa: E402

import rga_kernels  # noqa: E402

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


def relation_inputs(B, d, n, M, dtype=torch.float32, device="cpu", seed=0, grad=False):
    """theta, phi (B, d, n), weight (M, 2n) scaled like a real embedding, and with grad=True the
    output gradient (B, M, n): drawn in float64 from a seeded generator, then cast."""
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, d, n, generator=g, dtype=torch.float64), torch.randn(B, d, n, generator=g, dtype=torch.float64),
          torch.randn(M, 2 * n, generator=g, dtype=torch.float64) / (2 * n) ** 0.5]
    if grad:
        ts.append(torch.randn(B, M, n, generator=g, dtype=torch.float64))
    return [t.to(device=device, dtype=dtype) for t in ts]


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
