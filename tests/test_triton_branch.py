"""The Triton branch kernels (rga_kernels._triton_branch) against branch_reference, one launch each.

On CPU they run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 before any import
of the kernels); shapes are small and odd, inputs float64 (and a float32 check), some non-contiguous.
"""
import pytest
import torch

from rga_kernels import branch_reference as ref
from rga_kernels.launches import count_launches

_triton = pytest.importorskip("rga_kernels._triton")
if not _triton.usable_on("cuda" if torch.cuda.is_available() else "cpu")[0]:
    pytest.skip("Triton kernels not usable here", allow_module_level=True)
from rga_kernels._triton_branch import TritonKernels as TK  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-10, atol=1e-10)


def _rand(*shape, dtype=torch.float64, strided=False, seed=None):
    """Random (B, K, n) data; strided: a non-contiguous view (channels and nodes swapped in memory)."""
    if strided:
        return torch.randn(shape[0], shape[2], shape[1], dtype=dtype, device=DEV).transpose(1, 2)
    return torch.randn(*shape, dtype=dtype, device=DEV)


def _params(K, dtype=torch.float64):
    w = torch.rand(K, dtype=dtype, device=DEV) + 0.5
    w[0] = -w[0]  # a negative scale flips the ReLU mask
    return w, torch.randn(K, dtype=dtype, device=DEV) * 0.5


def _running(K, dtype=torch.float64):
    return torch.randn(K, dtype=dtype, device=DEV) * 0.1, torch.rand(K, dtype=dtype, device=DEV) + 0.5


def _one_launch(fn, name):
    counts = count_launches(fn, by_op=True)
    assert counts == {f"triton::{name}": 1}, counts


def _close(got, want, **tol):
    tol = tol or TOL
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _close(g, w, **tol)
    else:
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
        torch.testing.assert_close(got, want, **tol)


CASES = [  # (B, groups, mean_group, prefix P, n)
    (1, (5,), -1, 0, 13),
    (2, (3, 4, 2), 2, 0, 13),
    (3, (3, 4), -1, 0, 32),
    (2, (2, 3, 2), 1, 0, 32),
    (3, (4,), -1, 1, 13),
    (2, (4,), -1, 2, 32),
    (2, (7,), 0, 0, 13),
    (2, (3, 70), 1, 0, 13),  # a mean group of more than one (64-channel) chunk
    (3, (2, 3, 2), 2, 0, 1000),  # N = 3000: several loop steps per program
]


@pytest.mark.parametrize("B, groups, mean_group, P, n", CASES)
@pytest.mark.parametrize("batch_stats, running", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("strided", [False, True])
def test_bn_act_fwd_and_bwd(B, groups, mean_group, P, n, batch_stats, running, strided):
    torch.manual_seed(0)
    K = sum(groups)
    y = _rand(B, K, n, strided=strided) * 2 + 0.3
    w, b = _params(K)
    rm, rv = _running(K) if running else (None, None)
    rm2, rv2 = (rm.clone(), rv.clone()) if running else (None, None)
    prefix = _rand(B, P, n, strided=strided) if P else None
    args = (batch_stats, 0.1, 1e-5, groups, mean_group, prefix)
    want = ref.bn_act_fwd(y, w, b, rm, rv, *args)
    got = TK.bn_act_fwd(y, w, b, rm2, rv2, *args)
    _close(got[0], want[0])
    _close(got[1:], want[1:])
    if running:
        _close([rm2, rv2], [rm, rv])
    _one_launch(lambda: TK.bn_act_fwd(y, w, b, rm2, rv2, *args), "_bn_act_fwd_kernel")

    # backward: gradients of the written groups (a strided one among them), of chmean
    mean, invstd = want[1], want[2]
    written = [o for i, o in enumerate(want[0]) if i != mean_group]
    grad_outs = [_rand(*o.shape, strided=strided) for o in written]
    if P:  # the bwd sees the gradient of the channels behind the prefix: a slice
        grad_outs = [g[:, P:] for g in grad_outs]
    if len(grad_outs) > 1 and mean_group < 0:
        grad_outs = grad_outs[:-1]  # a missing trailing gradient
    grad_chmean = _rand(B, 1, n) if mean_group >= 0 else None
    bargs = (y, w, b, mean, invstd, batch_stats, grad_chmean, mean_group, groups)
    got = TK.bn_act_bwd(grad_outs, *bargs)
    _close(got, ref.bn_act_bwd(grad_outs, *bargs))
    assert got[0].stride() == y.stride()  # grad_y has y's layout
    _one_launch(lambda: TK.bn_act_bwd(grad_outs, *bargs), "_bn_act_bwd_kernel")


@pytest.mark.parametrize("B, K, n", [(1, 5, 13), (3, 7, 32)])
@pytest.mark.parametrize("batch_stats, running", [(True, True), (True, False), (False, True)])
def test_bn_stats(B, K, n, batch_stats, running):
    torch.manual_seed(1)
    y = _rand(B, K, n, strided=True) + 5.0  # an offset: a naive E[x^2] - E[x]^2 would lose digits
    rm, rv = _running(K) if running else (None, None)
    rm2, rv2 = (rm.clone(), rv.clone()) if running else (None, None)
    _close(TK.bn_stats(y, rm2, rv2, batch_stats, 0.3, 1e-3), ref.bn_stats(y, rm, rv, batch_stats, 0.3, 1e-3))
    if running:
        _close([rm2, rv2], [rm, rv])
    _one_launch(lambda: TK.bn_stats(y, rm2, rv2, batch_stats, 0.3, 1e-3), "_bn_stats_kernel")


@pytest.mark.parametrize("B, H, n", [(1, 5, 13), (2, 7, 32), (3, 5, 13), (2, 70, 50)])
@pytest.mark.parametrize("batch_stats, running", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("strided", [False, True])
def test_gate_fwd_and_head_bwd(B, H, n, batch_stats, running, strided):
    torch.manual_seed(2)
    h = _rand(B, H, n, strided=strided)
    hw, hb = _params(H)
    h_mean, h_invstd = ref.bn_stats(h, None, None, True, 0.1, 1e-5)
    w2 = torch.randn(1, H, dtype=torch.float64, device=DEV)
    lw, lb = _params(1)
    lw = lw.abs()
    rm, rv = _running(1) if running else (None, None)
    rm2, rv2 = (rm.clone(), rv.clone()) if running else (None, None)
    args = (h, hw, hb, h_mean, h_invstd, w2, lw, lb)
    want = ref.gate_fwd(*args, rm, rv, batch_stats, 0.1, 1e-5)
    got = TK.gate_fwd(*args, rm2, rv2, batch_stats, 0.1, 1e-5)
    _close(got, want)
    if running:
        _close([rm2, rv2], [rm, rv])
    _one_launch(lambda: TK.gate_fwd(*args, rm2, rv2, batch_stats, 0.1, 1e-5), "_gate_fwd_kernel")

    _, l, l_mean, l_invstd = want
    grad_s = _rand(B, 1, n)
    bargs = (grad_s, l, lw, l_mean, l_invstd, h, hw, hb, h_mean, h_invstd, w2, batch_stats)
    got = TK.head_bwd(*bargs)
    _close(got, ref.head_bwd(*bargs))
    assert got[0].stride() == h.stride()  # grad_h has h's layout
    _one_launch(lambda: TK.head_bwd(*bargs), "_head_bwd_kernel")


@pytest.mark.parametrize("B, C, n", [(1, 5, 13), (2, 7, 32), (3, 70, 13)])
@pytest.mark.parametrize("strided", [False, True])
def test_gate_bwd(B, C, n, strided):
    torch.manual_seed(3)
    target = _rand(B, C, n, strided=strided)
    grad_out = _rand(B, C, n, strided=not strided)
    a = torch.sigmoid(_rand(B, 1, n))
    got = TK.gate_bwd(grad_out, target, a)
    _close(got, ref.gate_bwd(grad_out, target, a))
    assert got[0].stride() == target.stride()
    _one_launch(lambda: TK.gate_bwd(grad_out, target, a), "_gate_bwd_kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    """fp32 statistics for fp32/fp16/bf16 inputs; fp32 parameters and running statistics (autocast)."""
    torch.manual_seed(4)
    B, groups, n = 2, (3, 4, 2), 32
    K = sum(groups)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
           torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    y = _rand(B, K, n, dtype=dtype, strided=True)
    w, b = (t.float() for t in _params(K))
    rm, rv = (t.float() for t in _running(K))
    rm2, rv2 = rm.clone(), rv.clone()
    want = ref.bn_act_fwd(y, w, b, rm, rv, True, 0.1, 1e-5, groups, 2)
    got = TK.bn_act_fwd(y, w, b, rm2, rv2, True, 0.1, 1e-5, groups, 2)
    _close(got[0], want[0], **tol)
    _close(got[1:], want[1:], **tol)
    _close([rm2, rv2], [rm, rv], **tol)
    grads = [_rand(B, k, n, dtype=dtype) for k in groups[:2]]
    gcm = _rand(B, 1, n, dtype=dtype)
    bargs = (y, w, b, want[1], want[2], True, gcm, 2, groups)
    _close(TK.bn_act_bwd(grads, *bargs), ref.bn_act_bwd(grads, *bargs), **tol)

    h = _rand(B, 5, n, dtype=dtype)
    hw, hb = (t.float() for t in _params(5))
    hm, hi = ref.bn_stats(h, None, None, True, 0.1, 1e-5)
    w2 = torch.randn(1, 5, device=DEV)
    lw, lb = torch.ones(1, device=DEV), torch.zeros(1, device=DEV)
    args = (h, hw, hb, hm, hi, w2, lw, lb, None, None, True, 0.1, 1e-5)
    want = ref.gate_fwd(*args)
    _close(TK.gate_fwd(*args), want, **tol)
    bargs = (_rand(B, 1, n, dtype=dtype), want[1], lw, want[2], want[3], h, hw, hb, hm, hi, w2, True)
    _close(TK.head_bwd(*bargs), ref.head_bwd(*bargs), **tol)
    target, go, a = _rand(B, 6, n, dtype=dtype), _rand(B, 6, n, dtype=dtype), want[0]
    _close(TK.gate_bwd(go, target, a), ref.gate_bwd(go, target, a), **tol)
