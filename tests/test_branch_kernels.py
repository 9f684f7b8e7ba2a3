"""The fused branch's kernels (rga_kernels.branch) against their plain-PyTorch oracle.

Every backend with its own kernels (cpp and cuda: csrc/branch*.{h,cpp,cu}; triton:
rga_kernels/_triton_branch.py) is compared kernel by kernel with rga_kernels/branch_reference.py
in float64 (outputs, statistics, the in-place running statistics), at odd sizes, batch 1, with
non-contiguous inputs; each call launches the number of kernels it says it does. The module built
from them is tested against the reference module in tests/test_rga_module.py.
"""
import copy

import pytest
import torch

import rga_kernels
from rga_kernels import branch_reference as ref
from rga_kernels._branch_chain import _kernels
from rga_kernels._triton_branch_kernels import GATE_SPLIT_WORK
from rga_kernels.launches import count_launches
from testkit import assert_close, backend_params

KERNEL_BACKENDS = ("cpp", "cuda", "triton")
# kernel launches per call (the CUDA kernels; the CPU records the same kernel:: events): the CUDA
# bn_act_fwd takes a second kernel for the mean over a group's channels, Triton does it in one
LAUNCHES = {"bn_act_fwd_mean": {"triton": 1}, "bn_act_fwd": 1, "bn_stats": 1, "bn_act_bwd": 1, "gate_fwd": 1,
            "gate_bwd": 1, "head_bwd": 1}
DEFAULT_MEAN_LAUNCHES = 2


def _params():
    return backend_params(KERNEL_BACKENDS)


def _rand(*shape, seed, device, dtype=torch.float64, transpose=False):
    g = torch.Generator().manual_seed(seed)
    if transpose:  # a (B, K, n) view of a (B, n, K) tensor
        B, K, n = shape
        return torch.randn(B, n, K, generator=g, dtype=torch.float64).to(device, dtype).transpose(1, 2)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)


def _bn_params(K, seed, device, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = (1 + 0.3 * torch.randn(K, generator=g, dtype=torch.float64)).to(device, dtype)
    b = (0.2 * torch.randn(K, generator=g, dtype=torch.float64)).to(device, dtype)
    rm = (0.3 * torch.randn(K, generator=g, dtype=torch.float64)).to(device, dtype)
    rv = (0.5 + torch.rand(K, generator=g, dtype=torch.float64)).to(device, dtype)
    return w, b, rm, rv


def _gate_fwd_launches(backend, B, Kh, n):
    """gate_fwd in training: the GPU backends split B*n*Kh >= GATE_SPLIT_WORK over two launches."""
    return 2 if backend in ("cuda", "triton") and B * n * Kh >= GATE_SPLIT_WORK else 1


def _check_launches(fn, name, backend, want=None):
    counts = count_launches(fn, by_op=True)
    kernels = sum(v for k, v in counts.items() if k.startswith(("kernel::", "triton::")))
    want = LAUNCHES[name] if want is None else want
    if isinstance(want, dict):
        want = want.get(backend, DEFAULT_MEAN_LAUNCHES)
    assert kernels == want and sum(counts.values()) == want, f"{name}: {dict(counts)}"


CASES = [  # (B, groups, mean_group, prefix channels, transposed y, n)
    (3, (3, 4, 2), 2, 0, False, 13),
    (1, (5, 2), -1, 0, True, 13),
    (2, (4,), -1, 1, False, 13),
    (2, (3, 3, 5), 2, 0, True, 13),
    (3, (3, 70), 1, 0, False, 1000),  # B*n = 3000 and 70 channels: every loop runs several blocks
]


@pytest.mark.parametrize("device, backend", _params())
@pytest.mark.parametrize("batch_stats, running", [(True, True), (False, True), (True, False)],
                         ids=["train", "eval", "no-running"])
@pytest.mark.parametrize("B, groups, mean_group, P, transposed, n", CASES)
def test_bn_act_fwd(device, backend, batch_stats, running, B, groups, mean_group, P, transposed, n):
    k = _kernels(backend)
    K = sum(groups)
    y = _rand(B, K, n, seed=1, device=device, transpose=transposed) * 2 + 0.5
    w, b, rm, rv = _bn_params(K, 2, device)
    prefix = _rand(B, P, n, seed=3, device=device) if P else None
    stats = (rm.clone(), rv.clone()) if running else (None, None)
    stats_ref = (rm.clone(), rv.clone()) if running else (None, None)
    got = k.bn_act_fwd(y, w, b, *stats, batch_stats, 0.1, 1e-5, groups, mean_group, prefix)
    want = ref.bn_act_fwd(y, w, b, *stats_ref, batch_stats, 0.1, 1e-5, groups, mean_group, prefix)
    for i, (o, e) in enumerate(zip(got[0], want[0])):
        assert o.shape == e.shape, f"output {i}: {tuple(o.shape)} != {tuple(e.shape)}"
        if o.numel():
            assert_close(o, e, "float64")
    for name, o, e in (("mean", got[1], want[1]), ("invstd", got[2], want[2])):
        assert_close(o, e, "float64", msg=name)
    if mean_group >= 0:
        assert_close(got[3], want[3], "float64")
    if running:
        assert_close(stats[0], stats_ref[0], "float64")
        assert_close(stats[1], stats_ref[1], "float64")
    name = "bn_act_fwd_mean" if mean_group >= 0 else "bn_act_fwd"
    _check_launches(lambda: k.bn_act_fwd(y, w, b, None, None, True, 0.1, 1e-5, groups, mean_group, prefix), name,
                    backend)


@pytest.mark.parametrize("device, backend", _params())
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("B, groups, mean_group, P, transposed, n", CASES)
def test_bn_act_bwd(device, backend, batch_stats, B, groups, mean_group, P, transposed, n):
    k = _kernels(backend)
    K = sum(groups)
    y = _rand(B, K, n, seed=4, device=device, transpose=transposed)
    w, b, _, _ = _bn_params(K, 5, device)
    mean, invstd = ref.bn_stats(y, None, None, True, 0.0, 1e-5)
    # gradients of the written groups, the last one left out (no gradient), one non-contiguous
    written = [i for i in range(len(groups)) if i != mean_group]
    grads = [_rand(B, groups[i], n, seed=10 + i, device=device, transpose=i == 0) for i in written[:max(1, len(written) - 1)]]
    gcm = _rand(B, 1, n, seed=20, device=device) if mean_group >= 0 else None
    got = k.bn_act_bwd(grads, y, w, b, mean, invstd, batch_stats, gcm, mean_group, groups)
    want = ref.bn_act_bwd(grads, y, w, b, mean, invstd, batch_stats, gcm, mean_group, groups)
    for name, o, e in zip(("grad_y", "grad_weight", "grad_bias"), got, want):
        assert_close(o, e, "float64", msg=name)
    assert got[0].stride() == y.stride(), "grad_y must have y's layout"
    _check_launches(lambda: k.bn_act_bwd(grads, y, w, b, mean, invstd, batch_stats, gcm, mean_group, groups),
                    "bn_act_bwd", backend)


@pytest.mark.parametrize("device, backend", _params())
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("B, Kh, n, transposed", [(2, 3, 13, False), (1, 1, 7, False), (3, 5, 32, True),
                                                  (2, 70, 1500, False), (2, 64, 2100, False)])
def test_gate_fwd_and_head_bwd(device, backend, batch_stats, B, Kh, n, transposed, split=None):
    k = _kernels(backend)
    h = _rand(B, Kh, n, seed=6, device=device, transpose=transposed)
    hw, hb, hrm, hrv = _bn_params(Kh, 7, device)
    h_mean, h_invstd = ref.bn_stats(h, None, None, True, 0.0, 1e-5)
    w2 = _rand(1, Kh, seed=8, device=device)
    lw, lb, lrm, lrv = _bn_params(1, 9, device)
    run, run_ref = (lrm.clone(), lrv.clone()), (lrm.clone(), lrv.clone())
    got = k.gate_fwd(h, hw, hb, h_mean, h_invstd, w2, lw, lb, *run, batch_stats, 0.1, 1e-5)
    want = ref.gate_fwd(h, hw, hb, h_mean, h_invstd, w2, lw, lb, *run_ref, batch_stats, 0.1, 1e-5)
    for name, o, e in zip(("a", "l", "l_mean", "l_invstd"), got, want):
        assert_close(o, e, "float64", msg=name)
    assert_close(run[0], run_ref[0], "float64")
    assert_close(run[1], run_ref[1], "float64")
    _check_launches(lambda: k.gate_fwd(h, hw, hb, h_mean, h_invstd, w2, lw, lb, None, None, True, 0.1, 1e-5),
                    "gate_fwd", backend, split or _gate_fwd_launches(backend, B, Kh, n))
    _check_launches(lambda: k.gate_fwd(h, hw, hb, h_mean, h_invstd, w2, lw, lb, lrm, lrv, False, 0.1, 1e-5),
                    "gate_fwd", backend)  # evaluation: one launch at any size

    a, l, l_mean, l_invstd = want
    gs = _rand(B, 1, n, seed=12, device=device)
    got = k.head_bwd(gs, l, lw, l_mean, l_invstd, h, hw, hb, h_mean, h_invstd, w2, batch_stats)
    want = ref.head_bwd(gs, l, lw, l_mean, l_invstd, h, hw, hb, h_mean, h_invstd, w2, batch_stats)
    for name, o, e in zip(("grad_h", "grad_w2", "grad_h_weight", "grad_h_bias", "grad_l_weight", "grad_l_bias"),
                          got, want):
        assert_close(o, e, "float64", msg=name)
    _check_launches(lambda: k.head_bwd(gs, l, lw, l_mean, l_invstd, h, hw, hb, h_mean, h_invstd, w2, batch_stats),
                    "head_bwd", backend)


@pytest.mark.parametrize("device, backend", backend_params(("triton",)))
@pytest.mark.parametrize("B, Kh, n, transposed", [(2, 3, 13, False), (3, 5, 200, True), (1, 33, 500, False),
                                                  (2, 70, 1500, False)])
def test_gate_fwd_split_at_small_sizes(device, backend, B, Kh, n, transposed, monkeypatch):
    """The two-launch gate_fwd (blocks' partial statistics, then their merge) at sizes that otherwise
    take the single program: one block, 2 to 47 blocks with a short last one, batch 1, transposed."""
    import rga_kernels._triton_branch as triton_branch

    monkeypatch.setattr(triton_branch, "GATE_SPLIT_WORK", 0)
    test_gate_fwd_and_head_bwd(device, backend, True, B, Kh, n, transposed, split=2)


@pytest.mark.parametrize("device, backend", _params())
def test_gate_fwd_without_nodes_in_eval_gives_the_running_statistics(device, backend):
    k = _kernels(backend)
    h = torch.empty(2, 3, 0, dtype=torch.float64, device=device)
    hw, hb, hrm, hrv = _bn_params(3, 7, device)
    w2 = _rand(1, 3, seed=8, device=device)
    lw, lb, lrm, lrv = _bn_params(1, 9, device)
    args = (h, hw, hb, hrm, 1 / (hrv + 1e-5).sqrt(), w2, lw, lb, lrm, lrv, False, 0.1, 1e-5)
    for o, e in zip(k.gate_fwd(*args), ref.gate_fwd(*args)):
        assert_close(o, e, "float64")


def test_gate_split_threshold_is_the_same_in_cuda_and_triton():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "csrc" / "branch.h").read_text()
    m = re.search(r"kGateSplitWork = int64_t\(1\) << (\d+);", text)
    assert m is not None and 1 << int(m.group(1)) == GATE_SPLIT_WORK


@pytest.mark.parametrize("device, backend", _params())
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_gate_bwd(device, backend, transposed):
    k = _kernels(backend)
    B, D, n = 2, 6, 9
    target = _rand(B, D, n, seed=13, device=device, transpose=transposed)
    grad_out = _rand(B, D, n, seed=14, device=device, transpose=transposed)
    a = torch.sigmoid(_rand(B, 1, n, seed=15, device=device))
    got = k.gate_bwd(grad_out, target, a)
    want = ref.gate_bwd(grad_out, target, a)
    assert_close(got[0], want[0], "float64")
    assert_close(got[1], want[1], "float64")
    assert got[0].stride() == target.stride(), "grad_target must have target's layout"
    _check_launches(lambda: k.gate_bwd(grad_out, target, a), "gate_bwd", backend)


LOW_PRECISION = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
                 torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("device, backend", _params())
@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
def test_low_precision_inputs(device, backend, dtype):
    """float32/float16/bfloat16 inputs (as under autocast) with float32 parameters, running
    statistics and accumulation: every kernel against the oracle run on the same inputs."""
    k = _kernels(backend)
    tol = LOW_PRECISION[dtype]
    B, groups, n = 2, (3, 4, 2), 32
    K = sum(groups)
    y = _rand(B, K, n, seed=30, device=device, dtype=dtype, transpose=True)
    w, b, rm, rv = (t.float() for t in _bn_params(K, 31, device))
    rm2, rv2 = rm.clone(), rv.clone()
    want = ref.bn_act_fwd(y, w, b, rm, rv, True, 0.1, 1e-5, groups, 2)
    got = k.bn_act_fwd(y, w, b, rm2, rv2, True, 0.1, 1e-5, groups, 2, None)
    for o, e in zip(got[0][:2], want[0][:2]):
        assert_close(o, e, **tol)
    for o, e in zip((*got[1:], rm2, rv2), (*want[1:], rm, rv)):
        assert_close(o, e, **tol)
    grads = [_rand(B, kk, n, seed=32 + i, device=device, dtype=dtype) for i, kk in enumerate(groups[:2])]
    gcm = _rand(B, 1, n, seed=35, device=device, dtype=dtype)
    bargs = (y, w, b, want[1], want[2], True, gcm, 2, groups)
    for o, e in zip(k.bn_act_bwd(grads, *bargs), ref.bn_act_bwd(grads, *bargs)):
        assert_close(o, e, **tol)
    h = _rand(B, 5, n, seed=36, device=device, dtype=dtype)
    hw, hb, _, _ = (t.float() for t in _bn_params(5, 37, device))
    hm, hi = ref.bn_stats(h, None, None, True, 0.1, 1e-5)
    w2 = _rand(1, 5, seed=38, device=device, dtype=torch.float32)
    lw, lb = torch.ones(1, device=device), torch.zeros(1, device=device)
    args = (h, hw, hb, hm, hi, w2, lw, lb, None, None, True, 0.1, 1e-5)
    want = ref.gate_fwd(*args)
    for o, e in zip(k.gate_fwd(*args), want):
        assert_close(o, e, **tol)
    bargs = (_rand(B, 1, n, seed=39, device=device, dtype=dtype), want[1], lw, want[2], want[3], h, hw, hb, hm, hi,
             w2, True)
    for o, e in zip(k.head_bwd(*bargs), ref.head_bwd(*bargs)):
        assert_close(o, e, **tol)
    target, go = _rand(B, 6, n, seed=40, device=device), _rand(B, 6, n, seed=41, device=device)
    for o, e in zip(k.gate_bwd(go, target, want[0]), ref.gate_bwd(go, target, want[0])):
        assert_close(o, e, **tol)


@pytest.mark.parametrize("device, backend", _params())
def test_statistics_are_stable_in_float32(device, backend):
    """A channel far from zero (mean 1e3, standard deviation 1): E[x²] − E[x]² in float32 loses
    most digits of the variance; the kernels' statistics stay within 1e-4 of float64."""
    k = _kernels(backend)
    y64 = 1e3 + _rand(4, 3, 257, seed=16, device=device)
    y = y64.float()
    w, b = torch.ones(3, device=device), torch.zeros(3, device=device)
    _, mean, invstd, _ = k.bn_act_fwd(y, w, b, None, None, True, 0.1, 1e-12, (3,), -1, None)
    var64 = y.double().var(dim=(0, 2), unbiased=False)
    assert_close(invstd.double(), torch.rsqrt(var64 + 1e-12), rtol=1e-4, atol=0)
    naive = (y * y).mean((0, 2)) - y.mean((0, 2)) ** 2  # the cancellation the kernels must avoid
    assert ((naive.double() - var64).abs() / var64).max() > 1e-2, "the test no longer exercises cancellation"


@pytest.mark.parametrize("device, backend", backend_params(("cpp", "cuda")))
def test_cpp_kernels_reject_bad_input_with_a_message(device, backend):
    k = _kernels(backend)
    y = torch.randn(2, 5, 7, device=device)
    w, b = torch.ones(5, device=device), torch.zeros(5, device=device)
    with pytest.raises(RuntimeError, match="channel groups sum to 4, expected K = 5"):
        k.bn_act_fwd(y, w, b, None, None, True, 0.1, 1e-5, (2, 2), -1, None)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous \(5,\) vector"):
        k.bn_act_fwd(y, w[:4], b, None, None, True, 0.1, 1e-5, (5,), -1, None)
    with pytest.raises(RuntimeError, match="without running statistics, batch_stats must be true"):
        k.bn_stats(y, None, None, False, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match=r"a must be \(2, 1, 7\)"):
        k.gate_bwd(y, y, torch.rand(2, 2, 7, device=device))


def test_module_counts_every_batch_once_on_the_kernel_path():
    """num_batches_tracked: incremented by the branch kernels (cpp) exactly as nn.BatchNorm does."""
    if "cpp" not in rga_kernels.available_backends("cpu"):
        pytest.skip(rga_kernels.backend_status("cpu")["cpp"][1])
    from rga import RGAModule

    torch.manual_seed(0)
    m = RGAModule(16, (4, 4), cha_ratio=4, spa_ratio=4, down_ratio=2, fused="cpp").train()
    r = copy.deepcopy(m)
    r.fused = False
    for _ in range(3):
        x = torch.randn(2, 16, 4, 4)
        m(x)
        r(x)
    got = {k_: v for k_, v in m.state_dict().items() if k_.endswith("num_batches_tracked")}
    want = {k_: v for k_, v in r.state_dict().items() if k_.endswith("num_batches_tracked")}
    assert got == want and all(int(v) == 3 for v in got.values())


def test_chain_rejects_a_bad_description_with_a_message():
    """rga_kernels::chain (the cpp/cuda module op) and make_chain check what they are given."""
    if "cpp" not in rga_kernels.available_backends("cpu"):
        pytest.skip(rga_kernels.backend_status("cpu")["cpp"][1])
    from rga import RGAModule
    from rga.fused_branches import branch_args
    from rga_kernels.branch import Step, make_chain

    m = RGAModule(16, (4, 4), cha_ratio=4, spa_ratio=4, down_ratio=2, fused="cpp").train()
    spec, params, running = branch_args(m, "spatial", "cpp")
    x = torch.randn(2, 16, 16)
    with pytest.raises(ValueError, match="1 or 2 steps"):
        make_chain([Step(spec, running, False)] * 3, [params] * 3)
    with pytest.raises(ValueError, match="exactly two steps"):
        make_chain([Step(spec, running, False)], [params], parallel=True)
    with pytest.raises(ValueError, match="no target"):
        make_chain([Step(spec, running, False)] * 2, [params] * 2, parallel=True)(x, x)
    op = torch.ops.rga_kernels.chain.default
    flat = [t for t in (*params.emb_weight, *params.emb_bn_weight, *params.emb_bn_bias, params.rel_weight,
                        params.rel_bn_weight, params.rel_bn_bias, params.w1, params.h_bn_weight, params.h_bn_bias,
                        params.w2, params.l_bn_weight, params.l_bn_bias)]
    none = x.new_empty(0)
    running8 = [none if r is None else r for r in running[:8]]
    groups = list(spec.groups)
    meta = [0, 1, 1, spec.theta, spec.phi, spec.mean_group, 0, len(groups), *groups]
    with pytest.raises(RuntimeError, match="meta ends inside a step"):
        op(x, None, flat, running8, [], meta[:5], [0.1, 1e-5], False, None)
    with pytest.raises(RuntimeError, match=f"meta describes {len(flat)} parameters, got {len(flat) - 1}"):
        op(x, None, flat[:-1], running8, [], meta, [0.1, 1e-5], False, None)
    with pytest.raises(RuntimeError, match="8 running-statistics entries expected, got 7"):
        op(x, None, flat, running8[:7], [], meta, [0.1, 1e-5], False, None)
    with pytest.raises(RuntimeError, match=r"x must be \(B, C, n\)"):
        op(x[0], None, flat, running8, [], meta, [0.1, 1e-5], False, None)
    out, (a,) = op(x, None, flat, running8, [], meta, [0.1, 1e-5], False, None)  # the same arguments, well formed
    assert out.shape == x.shape and a.shape == (2, 1, 16)


def _module_chain(m, backend):
    """(make_chain's function, steps) of an RGA-SC module's two branches on `backend`."""
    from rga.fused_branches import branch_args
    from rga_kernels.branch import Step, make_chain

    steps, params = [], []
    for branch in ("spatial", "channel"):
        spec, p, running = branch_args(m, branch, backend)
        steps.append(Step(spec, running, branch == "channel"))
        params.append(p)
    return make_chain(steps, params), steps


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_chain_frees_its_intermediates_after_backward(backend):
    """The chain keeps its intermediates outside the saved variables (a capsule in C++, a ctx
    attribute in Python); a backward without retain_graph frees them like the saved tensors,
    not only when the graph (held by the output or the loss) goes."""
    if backend == "cpp" and "cpp" not in rga_kernels.available_backends("cpu"):
        pytest.skip(rga_kernels.backend_status("cpu")["cpp"][1])
    from rga import RGAModule

    torch.manual_seed(0)
    run, _ = _module_chain(RGAModule(16, (4, 4), cha_ratio=4, spa_ratio=4, down_ratio=2).train(), backend)
    x = torch.randn(2, 16, 16, requires_grad=True)
    out, attention = run(x)
    attention = [a.detach() for a in attention]  # views: the spatial map may be the chain's own tensor

    def holders():  # how many tensors hold each attention's storage (the chain's own copy among them)
        return [torch._C._storage_Use_Count(a.untyped_storage()._cdata) for a in attention]

    alive = holders()
    out.sum().backward(retain_graph=True)
    assert holders() == alive, "retain_graph keeps the intermediates for the next backward"
    out.sum().backward()
    freed = holders()
    assert all(f < a for f, a in zip(freed, alive)), "the intermediates outlive the backward"
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()
    del out
    assert holders() == freed


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_chain_intermediates_go_through_saved_tensor_hooks(backend):
    """Non-reentrant checkpointing (saved-tensor hooks) drops the chain's intermediates after the
    forward and recomputes them for the backward, with the gradients of a plain run; an
    attention map modified in place before backward is an error, not a wrong gradient."""
    if backend == "cpp" and "cpp" not in rga_kernels.available_backends("cpu"):
        pytest.skip(rga_kernels.backend_status("cpu")["cpp"][1])
    from torch.utils.checkpoint import checkpoint

    from rga import RGAModule

    torch.manual_seed(0)
    m = RGAModule(16, (4, 4), cha_ratio=4, spa_ratio=4, down_ratio=2).double().eval()  # eval: no BN update
    m.fused = backend
    m.keep_attention = True
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, requires_grad=True)

    def holders():  # tensors holding the spatial map's storage (the chain's saved copy among them)
        return torch._C._storage_Use_Count(m.last_attention["spatial"].untyped_storage()._cdata)

    out = m(x)
    plain = holders()
    (gx,) = torch.autograd.grad(out.sum(), x)
    out = checkpoint(m, x, use_reentrant=False)
    assert holders() < plain, "checkpointing kept the chain's intermediates"
    (gx_ckpt,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(gx, gx_ckpt)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = m(x)
    assert sum(t.numel() for t in packed) > 3 * x.numel(), "the intermediates bypass the hooks"
    # the chain's own attention outputs (views of what its backward reads)
    run, _ = _module_chain(m.train(), backend)
    for i in range(2):
        out, attention = run(x.reshape(2, 16, 16))
        attention[i].mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
