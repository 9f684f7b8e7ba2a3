"""Tests of the Triton kernels (rga_kernels/_triton.py) against the plain-PyTorch reference.

Without a CUDA device the kernels run under the Triton interpreter (TRITON_INTERPRET=1, which must be set
before the kernels are decorated, i.e. before rga_kernels._triton is imported). Shapes are small and odd
so that every mask matters; under the interpreter the block sizes follow the problem sizes.
"""
import os

import torch

from testkit import assert_close, assert_within_torch_error, forward_backward, relation_inputs

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, one fixed config instead of autotuning every test shape; test_each_config covers the rest.
os.environ.setdefault("RGA_TRITON_AUTOTUNE", "0")  # also set by conftest.py before collection

import subprocess
import sys

import pytest

from rga_kernels import _triton as K
from rga_kernels.reference import relation_embed_factorized, relation_embed_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_OK, _WHY = K.usable_on(DEV) if K.TRITON_AVAILABLE else (False, K.TRITON_UNAVAILABLE_REASON)
needs_kernels = pytest.mark.skipif(not _OK, reason=f"Triton kernels not usable on {DEV}: {_WHY}")


def _kernels(theta, phi, weight, grad):
    out, p, q = K.relation_fwd(theta, phi, weight)
    dtheta, dphi, dweight = K.relation_bwd(grad, theta, phi, weight, p, q)
    return [out, dtheta, dphi, dweight]


NAMES = ("out", "dtheta", "dphi", "dweight")


def _check(theta, phi, weight, grad):
    ref = forward_backward(relation_embed_reference, (theta, phi, weight), grad, dtype=torch.float64)
    got = _kernels(theta, phi, weight, grad)
    base = forward_backward(relation_embed_factorized, (theta, phi, weight), grad) if theta.dtype != torch.float64 else None
    # tf32x3 dots on a GPU are close to, not exactly, fp32: a larger relative floor there
    floor = 2e-5 if theta.dtype == torch.float32 and theta.is_cuda else 1e-5
    for name, r, k, src in zip(NAMES, ref, got, (theta, theta, phi, weight)):
        assert k.dtype == src.dtype, name
        assert_within_torch_error(name, k, r, None if base is None else base[NAMES.index(name)], k=2.0, rel_floor=floor)


ODD_SHAPES = [(1, d, n, 1) for n in (1, 63, 127, 257) for d in (1, 7)]
# several batch entries and M rows (batch reduction of dweight, M tiles, K loop over M for dtheta/dphi)
MIXED_SHAPES = [(3, 5, 37, 19), (2, 3, 9, 130)]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,d,n,M", ODD_SHAPES + MIXED_SHAPES)
def test_matches_reference(B, d, n, M, dtype):
    _check(*relation_inputs(B, d, n, M, dtype, device=DEV, grad=True))


@needs_kernels
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is only tested on CUDA")
@pytest.mark.parametrize("B,d,n,M", [(1, 7, 257, 1), (3, 5, 37, 19), (4, 32, 300, 70)])
def test_matches_reference_bf16(B, d, n, M):
    _check(*relation_inputs(B, d, n, M, torch.bfloat16, device=DEV, grad=True))


@needs_kernels
@pytest.mark.parametrize("B,d,n,M", [(1, 1, 1, 1), (3, 5, 37, 19), (2, 3, 9, 130)])
def test_matches_reference_float64(B, d, n, M):
    _check(*relation_inputs(B, d, n, M, torch.float64, device=DEV, grad=True))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(dtype):
    B, d, n, M = 3, 5, 37, 11
    theta, phi, weight, _ = relation_inputs(B, d, n, M, dtype, seed=1, device=DEV, grad=True)
    theta_nc = theta.transpose(1, 2).contiguous().transpose(1, 2)  # (B, d, n) with n-stride d
    phi_big = torch.zeros(B, 2 * d, n + 3, device=DEV, dtype=dtype)
    phi_big[:, ::2, 1 : n + 1] = phi
    phi_nc = phi_big[:, ::2, 1 : n + 1]  # strided rows, offset storage
    weight_nc = weight.t().contiguous().t()  # column-major (M, 2n)
    grad_row = torch.randn(1, M, n, device=DEV, dtype=torch.float64).to(dtype)
    grad_nc = grad_row.expand(B, M, n)  # batch stride 0
    assert not (theta_nc.is_contiguous() or phi_nc.is_contiguous() or weight_nc.is_contiguous())
    _check(theta_nc, phi_nc, weight_nc, grad_nc)
    # the results do not depend on the layout
    a = _kernels(theta_nc, phi_nc, weight_nc, grad_nc)
    b = _kernels(theta, phi, weight, grad_nc.contiguous())
    for name, x, y in zip(NAMES, a, b):
        assert_close(x, y, "exact", msg=name)


@needs_kernels
def test_every_output_element_is_written(monkeypatch):
    """Outputs allocated by the kernels' wrappers start as NaN: an unwritten element would show."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(K.torch, "empty", nan_empty)
    for B, d, n, M in [(2, 3, 129, 67), (1, 1, 1, 1)]:
        got = _kernels(*relation_inputs(B, d, n, M, torch.float32, seed=2, device=DEV, grad=True))
        for name, t in zip(NAMES, got):
            assert torch.isfinite(t).all(), name


def _configs_to_check():
    if K.INTERPRET:  # small tiles: several M/N tiles and K steps on small shapes
        return [K._cfg(16, 16, 16, 4, 1), K._cfg(32, 16, 16, 4, 1)]
    return list(K._CONFIGS_ALL)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_each_config(dtype, monkeypatch):
    shape = (2, 5, 37, 19) if K.INTERPRET else (3, 33, 300, 70)
    inputs = relation_inputs(*shape, dtype, seed=4, device=DEV, grad=True)
    ran = 0
    for cfg in _configs_to_check():
        monkeypatch.setattr(K, "_FORCED_CONFIG", cfg)
        try:
            _check(*inputs)
        except Exception as exc:
            # On a GPU some tile configs exceed shared memory for some launches; the autotuner
            # skips those, and so does this test. Anything else is a failure.
            if type(exc).__name__ != "OutOfResources":
                raise
            continue
        ran += 1
    assert ran > 0, "no tile config could run"


class _RelationFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, phi, weight):
        out, p, q = K.relation_fwd(theta, phi, weight)
        ctx.save_for_backward(theta, phi, weight, p, q)
        return out

    @staticmethod
    def backward(ctx, grad):
        return K.relation_bwd(grad, *ctx.saved_tensors)


@needs_kernels
def test_gradcheck_float64():
    # fast mode (random projections): the full Jacobian costs ~100 launches per input element under
    # the interpreter; the float64 comparisons above check every gradient entry already.
    theta, phi, weight, _ = relation_inputs(2, 3, 5, 4, torch.float64, seed=3, device=DEV, grad=True)
    leaves = [t.requires_grad_() for t in (theta, phi, weight)]
    assert torch.autograd.gradcheck(_RelationFn.apply, leaves, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_usable_on_reports_a_reason():
    ok, why = K.usable_on("meta")
    assert not ok and why
    ok, why = K.usable_on(DEV)
    # Expected independently of usable_on: kernels run on a GPU, or on the CPU under the interpreter.
    assert ok == (K.TRITON_AVAILABLE and (DEV == "cuda" or K.INTERPRET)), why
    if not ok:
        assert why


def test_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from rga_kernels import _triton as K\n"
        "assert not K.TRITON_AVAILABLE and K.TRITON_UNAVAILABLE_REASON\n"
        "ok, why = K.usable_on('cpu'); assert not ok and why\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("B,d,n,M", [(16, 5, 37, 3), (13, 3, 20, 6)])
def test_split_batch_dweight(B, d, n, M, dtype):
    """A small dW output with a long batch spreads the batch over the grid (atomics into a zeroed
    fp32 buffer, uneven last chunk for B = 13): same values as the in-kernel reduction."""
    assert K._batch_chunk(M, n, B) > 0, "the shape must take the split path"
    _check(*relation_inputs(B, d, n, M, dtype, device=DEV, grad=True))


def test_batch_chunk_heuristic():
    assert K._batch_chunk(256, 2048, 64) == 0  # stage-1 spatial: 128 tiles, no split
    assert K._batch_chunk(16, 128, 64) > 0  # stage-3 spatial: 2 tiles, batch split
    assert K._batch_chunk(16, 128, 4) == 0  # too few batch entries to split
    chunk = K._batch_chunk(16, 128, 64)
    assert 4 <= chunk < 64
