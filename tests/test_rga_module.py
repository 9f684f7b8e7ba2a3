"""RGAModule: public parameter layout, semantics against an independent oracle, and the fused path.

Everything in float64 on small maps (H != W so a transposed index cannot hide). The fused path is
checked through every relation_embed backend this machine has (torch always, cpp when the
extension is built, triton under the interpreter on CPU).
"""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import rga_kernels
from testkit import assert_close, backend_params
from rga import RGAModule

C, H, W = 16, 8, 4
SMALL = dict(cha_ratio=4, spa_ratio=4, down_ratio=2)  # C' = 4, N' = 8: non-trivial widths everywhere

CONFIGS = {
    "sc": dict(),
    "cs": dict(order="cs"),
    "parallel": dict(order="parallel"),
    "s": dict(use_channel=False),
    "c": dict(use_spatial=False),
    "s_wo_rel": dict(use_channel=False, use_relation=False),
    "c_wo_rel": dict(use_spatial=False, use_relation=False),
    "sc_wo_ori": dict(use_original=False),
    "sc_symmetric": dict(embedding="symmetric"),
    "sc_none": dict(embedding="none"),
}


TRITON_SUBSET = {("sc", True), ("parallel", False), ("sc_none", True)}


def _backends():
    # These tests run on CPU float64 tensors: ask for the CPU backends (on a GPU machine triton
    # is available for CUDA tensors only).
    return backend_params(("torch", "cpp", "triton"), devices=["cpu"], with_device=False)


def _randomize(module, seed=0):
    """Non-trivial BN affine parameters and running statistics, so eval mode is a real test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
    return module


def _pair(fused, seed=0, **kw):
    torch.manual_seed(seed)
    ref = _randomize(RGAModule(C, (H, W), **{**SMALL, **kw}).double(), seed)
    fus = copy.deepcopy(ref)
    fus.fused = fused
    return ref, fus


def _step(module, x, grad):
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad


def _assert_same(ref, fus, x, steps=2, tol=1e-10):
    for _ in range(steps):
        grad = torch.randn_like(x)
        o1, gx1 = _step(ref, x, grad)
        o2, gx2 = _step(fus, x, grad)
        torch.testing.assert_close(o2, o1, rtol=tol, atol=tol)
        torch.testing.assert_close(gx2, gx1, rtol=tol, atol=tol)
        x = x + 0.1 * torch.randn_like(x)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), fus.named_parameters()):
        assert n1 == n2
        assert p1.grad is not None and p2.grad is not None, n1
        torch.testing.assert_close(p2.grad, p1.grad, rtol=tol, atol=tol, msg=lambda m: f"{n1}: {m}")
    for (n1, b1), (n2, b2) in zip(ref.named_buffers(), fus.named_buffers()):
        torch.testing.assert_close(b2, b1, rtol=tol, atol=tol, msg=lambda m: f"{n1}: {m}")


def _x(b=3, seed=1):
    return torch.randn(b, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# The fused path equals the reference path
# ------------------------------------------------------------------------------------------------

def _equivalence_cases():
    # every configuration in train and eval mode through torch and cpp; the Triton interpreter is
    # slow on CPU, so it runs a representative subset
    for backend in _backends():
        for config in CONFIGS:
            for train in (True, False):
                if backend.values[0] == "triton" and (config, train) not in TRITON_SUBSET:
                    continue
                mode = "train" if train else "eval"
                yield pytest.param(config, train, backend.values[0], marks=backend.marks,
                                   id=f"{config}-{mode}-{backend.values[0]}")


@pytest.mark.parametrize("config, train, backend", list(_equivalence_cases()))
def test_fused_equals_reference(config, train, backend):
    ref, fus = _pair(backend, **CONFIGS[config])
    ref.train(train)
    fus.train(train)
    _assert_same(ref, fus, _x(), steps=1 if backend == "triton" else 2)


def _random_cases(n=24):
    """Sizes, ratios, batch, configuration and mode drawn with a fixed seed: the C++ chain's
    shape handling (odd node counts, a batch of 1, widths that do not divide) beyond the one shape above."""
    g = torch.Generator().manual_seed(2026)
    names = sorted(CONFIGS)
    for i in range(n):
        def pick(lo, hi):
            return int(torch.randint(lo, hi + 1, (1,), generator=g))
        yield pytest.param(dict(c=pick(5, 24), h=pick(1, 7), w=pick(1, 6), b=pick(1, 4), cha=pick(2, 5),
                                spa=pick(2, 5), down=pick(1, 3), config=names[pick(0, len(names) - 1)],
                                train=bool(pick(0, 1))), id=f"case{i}")


@pytest.mark.parametrize("case", list(_random_cases()))
def test_cpp_chain_equals_reference_on_random_shapes(case):
    if "cpp" not in rga_kernels.available_backends("cpu"):
        pytest.skip(rga_kernels.backend_status("cpu")["cpp"][1])
    torch.manual_seed(0)
    kw = dict(cha_ratio=case["cha"], spa_ratio=case["spa"], down_ratio=case["down"], **CONFIGS[case["config"]])
    ref = _randomize(RGAModule(case["c"], (case["h"], case["w"]), **kw).double())
    fus = copy.deepcopy(ref)
    fus.fused = "cpp"
    ref.train(case["train"])
    fus.train(case["train"])
    x = torch.randn(case["b"], case["c"], case["h"], case["w"], dtype=torch.float64)
    if case["train"] and case["b"] * case["h"] * case["w"] == 1:
        pytest.skip("batch statistics of a single value: BatchNorm refuses it on both paths")
    _assert_same(ref, fus, x, steps=2)


class _ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("fused", [False, "torch"], ids=["reference", "fused"])
def test_fused_never_builds_the_relation_matrix(fused):
    c, h, w = 40, 8, 4  # spatial R is 32x32 (stacked 64x32), channel R 40x40 (stacked 80x40)
    m = RGAModule(c, (h, w), **SMALL, fused=fused).double()
    x = torch.randn(2, c, h, w, dtype=torch.float64, requires_grad=True)
    with _ShapeLog() as log:
        m(x).sum().backward()
    relation_shaped = {s for s in log.shapes if len(s) >= 3 and s[-2:] in {(32, 32), (64, 32), (40, 40), (80, 40)}}
    if fused:
        assert not relation_shaped, relation_shaped
    else:  # the check can fail: the reference path does build them
        assert relation_shaped


def test_fused_true_uses_auto_backend_and_matches():
    ref, fus = _pair(True)
    assert fus.backend == "auto"
    _assert_same(ref, fus, _x(), steps=1)


def test_fused_batch_one_and_noncontiguous_input():
    ref, fus = _pair("torch")
    x = _x(b=4)[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3)  # same values, odd strides
    assert not x.is_contiguous()
    _assert_same(ref, fus, x, steps=1)
    ref.eval(), fus.eval()  # batch 1 is legal in eval mode
    _assert_same(ref, fus, _x(b=1), steps=1)


@pytest.mark.parametrize("backend", [b for b in _backends() if b.values[0] in ("torch", "cpp")])
@pytest.mark.parametrize("config", ["sc", "cs", "parallel"])
def test_fused_channels_last_input(config, backend):
    ref, fus = _pair(backend, **CONFIGS[config])
    x = _x().to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    _assert_same(ref, fus, x, steps=2)
    ref.eval(), fus.eval()
    _assert_same(ref, fus, x, steps=1)
    assert fus(x).is_contiguous(memory_format=torch.channels_last)  # no layout round trip


def test_fused_cumulative_bn_momentum_none():
    ref, fus = _pair("torch")
    for m in (ref, fus):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = None
    _assert_same(ref, fus, _x(), steps=3)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_without_running_statistics(backend, train):
    """track_running_stats=False: batch statistics in both modes, no buffers to update; the
    branch kernels take that path (not the composite fallback)."""
    def untracked(m):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.track_running_stats = False
                bn.running_mean = bn.running_var = bn.num_batches_tracked = None
        return m.train(train)

    ref, fus = _pair(backend)
    ref, fus = untracked(ref), untracked(fus)
    _assert_same(ref, fus, _x(), steps=2)
    if backend != "torch":
        from rga_kernels.launches import count_launches

        counts = count_launches(lambda: fus(_x()), by_op=True)
        assert any(k.startswith(("kernel::", "triton::_bn")) for k in counts), dict(counts)


def test_fused_with_sync_batchnorm_modules():
    """After convert_sync_batchnorm the fused path calls the BN modules themselves (no sync here)."""
    ref, fus = _pair("torch")
    ref = torch.nn.SyncBatchNorm.convert_sync_batchnorm(ref)
    fus = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fus)
    assert isinstance(fus.theta_spatial[1], torch.nn.SyncBatchNorm)
    _assert_same(ref, fus, _x(), steps=2)
    ref.eval(), fus.eval()
    _assert_same(ref, fus, _x(), steps=1)


def test_train_eval_switches():
    ref, fus = _pair("torch")
    x = _x()
    _assert_same(ref, fus, x, steps=2)
    before = {k: v.clone() for k, v in fus.state_dict().items()}
    ref.eval(), fus.eval()
    _assert_same(ref, fus, x, steps=1)
    after = fus.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "eval mode must not touch running stats"
    ref.train(), fus.train()
    _assert_same(ref, fus, x, steps=1)
    assert not torch.equal(before["W_spatial.1.running_mean"], fus.state_dict()["W_spatial.1.running_mean"])
    assert fus.W_spatial[1].num_batches_tracked.item() == 3


def test_fused_flag_switch_after_construction():
    torch.manual_seed(0)
    m = _randomize(RGAModule(C, (H, W), **SMALL).double().eval())
    x = _x()
    out_ref = m(x)
    m.fused = "torch"
    assert_close(m(x), out_ref, "float64")
    with pytest.raises(ValueError, match="fused"):
        m.fused = "nope"
    with pytest.raises(TypeError):
        m.fused = 3


def test_torch_compile_fused_matches_eager():
    # the cpp custom op when built (fake kernel + registered autograd), else plain torch ops
    backend = "cpp" if "cpp" in rga_kernels.available_backends() else "torch"
    torch._dynamo.reset()
    _, eager = _pair(backend)
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, backend="aot_eager", fullgraph=True)
    x = _x()
    for _ in range(2):  # train mode: forward, backward and the running-stat updates
        grad = torch.randn_like(x)
        o1, gx1 = _step(eager, x, grad)
        o2, gx2 = _step(compiled, x, grad)
        assert_close(o2, o1, "float64")
        assert_close(gx2, gx1, "float64")
    for (n, p1), p2 in zip(eager.named_parameters(), compiled_mod.parameters()):
        assert_close(p2.grad, p1.grad, "float64", msg=lambda m: f"{n}: {m}")
    for (n, b1), b2 in zip(eager.named_buffers(), compiled_mod.buffers()):
        assert_close(b2, b1, "float64", msg=lambda m: f"{n}: {m}")
    eager.eval(), compiled_mod.eval()
    assert_close(compiled(x), eager(x), "float64")


@pytest.mark.parametrize("backend", [b for b in _backends() if b.values[0] in ("torch", "cpp")])
@pytest.mark.parametrize("config", ["sc", "parallel"])
def test_fused_bf16_autocast_close_to_fp32(backend, config):
    torch.manual_seed(0)
    m = RGAModule(C, (H, W), **SMALL, **CONFIGS[config], fused=backend)
    x = torch.randn(4, C, H, W, requires_grad=True)
    grads = []
    outs = []
    for bf16 in (False, True):
        m.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(x)
        out.float().pow(2).sum().backward()
        outs.append(out.detach().float())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    ref, out = outs
    assert out.shape == ref.shape and out.dtype == torch.float32  # the gate multiplies the fp32 input
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    # bf16 GEMMs: the gradients are near, not equal (the fp64 tests are exact); all of them
    # together point the way the fp32 ones do
    g32, g16 = (torch.cat([g.flatten() for g in gs]) for gs in grads)
    assert torch.isfinite(g16).all()
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99


# ------------------------------------------------------------------------------------------------
# Semantics: an independent functional oracle written from the paper / relation-math.md and
# driven only by the public checkpoint's parameter names.
# ------------------------------------------------------------------------------------------------

def _oracle_branch(sd, prefix, feats, training):
    """feats: (B, D, n) node features along the last axis; returns attention logits (B, n)."""
    def cbr(name, t):  # 1x1 conv + BN (+ReLU) on a (B, k, n) tensor from state-dict entries
        w = sd[f"{name}.0.weight"].flatten(1)
        t = torch.einsum("kd,bdn->bkn", w, t)
        return F.relu(F.batch_norm(t, sd[f"{name}.1.running_mean"].clone(), sd[f"{name}.1.running_var"].clone(),
                                   sd[f"{name}.1.weight"], sd[f"{name}.1.bias"], training))

    th = cbr(f"theta_{prefix}", feats)
    ph = cbr(f"phi_{prefix}", feats)
    B, _, n = th.shape
    R = torch.einsum("bdi,bdj->bij", th, ph)  # R[i, j] = θ_i · φ_j
    r = torch.cat([R, R.transpose(1, 2)], dim=2)  # r_i = [R(i, :), R(:, i)], (B, n, 2n)
    z = cbr(f"gg_{prefix}", r.transpose(1, 2))  # (B, n', n)
    g = cbr(f"gx_{prefix}", feats).mean(1, keepdim=True)
    y = torch.cat([g, z], 1)
    hdn = torch.einsum("kc,bcn->bkn", sd[f"W_{prefix}.0.weight"].flatten(1), y)
    hdn = F.relu(F.batch_norm(hdn, sd[f"W_{prefix}.1.running_mean"].clone(), sd[f"W_{prefix}.1.running_var"].clone(),
                              sd[f"W_{prefix}.1.weight"], sd[f"W_{prefix}.1.bias"], training))
    s = torch.einsum("kc,bcn->bkn", sd[f"W_{prefix}.3.weight"].flatten(1), hdn)
    s = F.batch_norm(s, sd[f"W_{prefix}.4.running_mean"].clone(), sd[f"W_{prefix}.4.running_var"].clone(),
                     sd[f"W_{prefix}.4.weight"], sd[f"W_{prefix}.4.bias"], training)
    return s[:, 0]


def _oracle_sc(sd, x, training):
    b, c, h, w = x.shape
    xs = x.reshape(b, c, h * w)
    a_s = torch.sigmoid(_oracle_branch(sd, "spatial", xs, training))  # (B, HW)
    x1 = xs * a_s[:, None, :]
    a_c = torch.sigmoid(_oracle_branch(sd, "channel", x1.transpose(1, 2), training))  # (B, C)
    return (x1 * a_c[:, :, None]).reshape(b, c, h, w)


@pytest.mark.parametrize("fused", [False, "torch"], ids=["reference", "fused"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_independent_oracle(fused, train):
    torch.manual_seed(0)
    m = _randomize(RGAModule(C, (H, W), **SMALL, fused=fused).double())
    m.train(train)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    x = _x()
    assert_close(m(x), _oracle_sc(sd, x, train), "float64_tight")


def test_relation_vector_order_row_then_column():
    """A relation embedding that reads only column j of the first half sees R(i, j) at node i."""
    torch.manual_seed(0)
    m = RGAModule(C, (H, W), use_channel=False, use_original=False, **SMALL).double().eval()
    n = H * W
    x = _x()
    theta, phi = m.theta_spatial(x).flatten(2), m.phi_spatial(x).flatten(2)
    R = theta.transpose(1, 2) @ phi
    seen = {}

    def hook(mod, inp):
        seen["rel"] = inp[0].flatten(2)  # (B, 2n, n): channel j at node i

    handle = m.gg_spatial[0].register_forward_pre_hook(hook)
    m(x)
    handle.remove()
    torch.testing.assert_close(seen["rel"][:, :n, :], R.transpose(1, 2))  # [j, i] = R(i, j): the row of i
    torch.testing.assert_close(seen["rel"][:, n:, :], R)  # [j, i] = R(j, i): the column of i


# ------------------------------------------------------------------------------------------------
# Combinations: the orders and the parallel fusion
# ------------------------------------------------------------------------------------------------

def _single_branches(m):
    sd = m.state_dict()
    s_only = RGAModule(C, (H, W), **SMALL, use_channel=False).double()
    c_only = RGAModule(C, (H, W), **SMALL, use_spatial=False).double()
    s_only.load_state_dict({k: v for k, v in sd.items() if "_spatial." in k})
    c_only.load_state_dict({k: v for k, v in sd.items() if "_channel." in k})
    return s_only.eval(), c_only.eval()


@pytest.mark.parametrize("fused", [False, "torch"], ids=["reference", "fused"])
def test_orders_compose_single_branches(fused):
    x = _x().abs() + 0.5  # positive: the parallel check divides by x
    outs = {}
    for order in ("sc", "cs", "parallel"):
        torch.manual_seed(0)
        m = _randomize(RGAModule(C, (H, W), **SMALL, order=order, fused=fused).double()).eval()
        s_only, c_only = _single_branches(m)
        outs[order] = m(x)
        if order == "sc":
            expected = c_only(s_only(x))
        elif order == "cs":
            expected = s_only(c_only(x))
        else:  # documented fusion: out = x · σ(s(x)) · σ(c(x))
            expected = s_only(x) * c_only(x) / x
        assert_close(outs[order], expected, "float64_tight")
    assert not torch.allclose(outs["sc"], outs["parallel"])
    assert not torch.allclose(outs["sc"], outs["cs"])


# ------------------------------------------------------------------------------------------------
# Parameter names, shapes and checkpoints
# ------------------------------------------------------------------------------------------------

def _public_keys(prefix, cin_embed, c_embed, cin_rel, c_rel, hidden):
    """The entries the public RGA_Module has for one branch, with their shapes."""
    keys = {}

    def cbr(name, cin, cout):
        keys[f"{name}.0.weight"] = (cout, cin, 1, 1)
        for s in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.1.{s}"] = (cout,)
        keys[f"{name}.1.num_batches_tracked"] = ()

    for name in ("theta", "phi", "gx"):
        cbr(f"{name}_{prefix}", cin_embed, c_embed)
    cbr(f"gg_{prefix}", cin_rel, c_rel)
    keys[f"W_{prefix}.0.weight"] = (hidden, 1 + c_rel, 1, 1)
    keys[f"W_{prefix}.3.weight"] = (1, hidden, 1, 1)
    for idx, width in ((1, hidden), (4, 1)):
        for s in ("weight", "bias", "running_mean", "running_var"):
            keys[f"W_{prefix}.{idx}.{s}"] = (width,)
        keys[f"W_{prefix}.{idx}.num_batches_tracked"] = ()
    return keys


def test_default_parameter_names_and_shapes_are_public():
    c, h, w = 64, 8, 8  # defaults s1 = s2 = 8: C' = 8, N = 64, N' = 8, widths 9 -> 1
    m = RGAModule(c, (h, w))
    expected = {**_public_keys("spatial", c, c // 8, 2 * h * w, h * w // 8, (1 + h * w // 8) // 8),
                **_public_keys("channel", h * w, h * w // 8, 2 * c, c // 8, (1 + c // 8) // 8)}
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == expected


def test_public_state_dict_loads_strict_and_round_trips():
    c, h, w = 64, 8, 8
    torch.manual_seed(0)
    src = _randomize(RGAModule(c, (h, w)).double()).eval()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    for fused in (False, "torch"):
        dst = RGAModule(c, (h, w), fused=fused).double().eval()
        dst.load_state_dict(sd, strict=True)
        assert_close(dst(x), src(x), "float64_tight")


@pytest.mark.parametrize(
    "kw, absent, present",
    [
        (dict(use_relation=False), ("theta_", "phi_", "gg_"), ("gx_", "W_")),
        (dict(use_original=False), ("gx_",), ("theta_", "phi_", "gg_")),
        (dict(embedding="symmetric"), ("phi_",), ("theta_", "gg_", "gx_")),
        (dict(embedding="none"), ("theta_", "phi_"), ("gg_", "gx_")),
        (dict(use_channel=False), ("_channel",), ("_spatial",)),
    ],
)
def test_ablation_parameters(kw, absent, present):
    keys = list(RGAModule(C, (H, W), **SMALL, **kw).state_dict())
    for a in absent:
        assert not any(a in k for k in keys), (a, keys)
    for p in present:
        assert any(p in k for k in keys), (p, keys)


def test_wo_relation_attention_width():
    m = RGAModule(C, (H, W), **SMALL, use_relation=False)
    assert m.W_spatial[0].weight.shape == (1, 1, 1, 1)  # y = [pool_c(g(x))], hidden max(1, 1 // s2)
    m = RGAModule(C, (H, W), **SMALL, use_original=False)
    assert m.W_spatial[0].weight.shape == (4, 8, 1, 1)  # y = [z], N' = 8, hidden 8 // 2


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, "torch"], ids=["reference", "fused"])
def test_wrong_spatial_size_names_both_sizes(fused):
    m = RGAModule(C, (H, W), **SMALL, fused=fused)
    with pytest.raises(ValueError, match=r"built for 8x4 .*got 4x8.*spatial_size=\(4, 8\)"):
        m(torch.randn(2, C, 4, 8))
    with pytest.raises(ValueError, match="16 channels but got 8"):
        m(torch.randn(2, 8, H, W))
    with pytest.raises(ValueError, match="B, C, H, W"):
        m(torch.randn(C, H, W))
    with pytest.raises(TypeError):
        m([1, 2, 3])


@pytest.mark.parametrize(
    "kw, exc",
    [
        (dict(order="xy"), ValueError),
        (dict(embedding="dot"), ValueError),
        (dict(use_spatial=False, use_channel=False), ValueError),
        (dict(use_relation=False, use_original=False), ValueError),
        (dict(cha_ratio=32), ValueError),  # 16 // 32 = 0 channels left
        (dict(cha_ratio=0), ValueError),
        (dict(spa_ratio=2.0), TypeError),
        (dict(fused="cuda-ish"), ValueError),
    ],
)
def test_bad_arguments(kw, exc):
    with pytest.raises(exc):
        RGAModule(C, (H, W), **kw)


def test_bad_spatial_size_argument():
    with pytest.raises(TypeError):
        RGAModule(C, 32)
    with pytest.raises(ValueError):
        RGAModule(C, (0, 4))


# ------------------------------------------------------------------------------------------------
# Double backward, export, attention maps, tied statistics, empty batches
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,train", [("sc", True), ("cs", False), ("parallel", True), ("c", False)])
@pytest.mark.parametrize("backend", _backends())
def test_gradient_penalty_fused_equals_reference(backend, config, train):
    """A gradient penalty on the input (create_graph=True) gives the reference's parameter
    gradients: the fused path differentiates a recompute of its whole chain of branches."""
    if backend == "triton" and config != "sc":
        pytest.skip("the interpreter is slow: one order on triton")
    ref, fus = _pair(backend, **CONFIGS[config])
    x = _x(b=2)
    grads = []
    for m in (ref, fus):
        m.train(train)
        xi = x.clone().requires_grad_()
        gx, = torch.autograd.grad(m(xi).pow(2).sum(), xi, create_graph=True)
        gx.pow(2).sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for g1, g2 in zip(*grads):
        assert_close(g2, g1, "float64_grad")


@pytest.mark.parametrize("backend", [b for b in _backends() if b.values[0] in ("torch", "cpp")])
@pytest.mark.parametrize("config", ["sc", "cs", "parallel", "s", "c"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_keep_attention_same_maps_on_both_paths(config, train, backend):
    ref, fus = _pair(backend, **CONFIGS[config])
    x = _x()
    maps = []
    for m in (ref, fus):
        m.train(train)
        m.keep_attention = True
        m(x)
        maps.append(dict(m.last_attention))
    assert set(maps[0]) == set(maps[1]) == {k for k, on in (("spatial", ref.use_spatial),
                                                              ("channel", ref.use_channel)) if on}
    for k in maps[0]:
        want = (3, 1, H, W) if k == "spatial" else (3, C, 1, 1)
        assert maps[0][k].shape == want and not maps[0][k].requires_grad
        assert_close(maps[1][k], maps[0][k], "float64")
    fus.keep_attention = False
    fus.last_attention = {}
    fus(x)
    assert fus.last_attention == {}


@pytest.mark.parametrize("fused", [False, "torch"], ids=["reference", "fused"])
def test_empty_batch_returns_empty(fused):
    m = RGAModule(C, (H, W), **SMALL, fused=fused).double()
    for train in (True, False):
        m.train(train)
        out = m(torch.zeros(0, C, H, W, dtype=torch.float64))
        assert out.shape == (0, C, H, W)


def test_tied_running_statistics_survive_to_load_and_save():
    """The fused path's θ/φ/g BN statistics are views of one buffer; .to(), load_state_dict and
    state_dict keep the module correct (and state_dict hands out independent tensors)."""
    ref, fus = _pair("torch")
    fus = fus.float().double()  # _apply replaces every buffer: they must be tied again
    bns = fus._embedding_bns("spatial")
    base = bns[0].running_mean._base
    assert base is not None and all(b.running_mean._base is base for b in bns)
    sd = fus.state_dict()
    assert all(v._base is None for v in sd.values()), "state_dict must not hand out views"
    fus.load_state_dict(ref.state_dict())
    assert bns[0].running_mean._base is base, "load_state_dict copies in place: still tied"
    _assert_same(ref, fus, _x(), steps=2)
    # buffers replaced from outside (untied): the fused path still updates each module's statistics
    for b in bns:
        b.running_mean = b.running_mean.clone()
    ref2, fus2 = copy.deepcopy(ref), copy.deepcopy(fus)
    for b in fus2._embedding_bns("spatial"):
        b.running_var = b.running_var.clone()
    _assert_same(ref2, fus2, _x(seed=3), steps=2)


@pytest.mark.parametrize("dim", ["bounded", "auto"])
def test_export_dynamic_batch_fused_model(dim):
    from torch.export import Dim

    from rga import build_model

    torch.manual_seed(0)
    model = build_model("rga_sc", 10, height=64, width=32, fused=True, backbone="resnet18", pretrained=False).eval()
    spec = Dim("batch", max=64) if dim == "bounded" else Dim.AUTO
    ep = torch.export.export(model, (torch.randn(8, 3, 64, 32),), dynamic_shapes={"x": {0: spec}})
    for b in (1, 3, 64):
        x = torch.randn(b, 3, 64, 32)
        got, want = ep.module()(x), model(x)
        for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            assert_close(g, w, "float32")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fused_backend_runs_its_own_kernels(config, backend):
    """The module runs the backend's branch kernels for every variant (even after a deepcopy, which
    separates the tied statistics): not a silent fallback to the composite path."""
    from rga_kernels.branch import FUSED_BRANCH_BACKENDS
    from rga_kernels.launches import count_launches

    _, fus = _pair(backend, **CONFIGS[config])
    x = torch.randn(2, C, H, W, dtype=torch.float64, requires_grad=True)
    counts = count_launches(lambda: fus(x).sum().backward(), by_op=True)
    kernels = sum(v for k, v in counts.items() if k.startswith(("kernel::", "triton::_bn", "triton::_gate",
                                                                 "triton::_head")))
    if backend in FUSED_BRANCH_BACKENDS:
        assert kernels > 0, f"{backend} {config}: no branch kernel ran: {dict(counts)}"
    else:
        assert kernels == 0


@pytest.mark.parametrize("backend", _backends())
def test_copy_after_a_step_trains_its_own_parameters(backend):
    """A deepcopy (or pickle) made after the fused path planned runs on the copy's own tensors."""
    torch.manual_seed(0)
    m = RGAModule(C, (H, W), **SMALL, fused=backend).double().train()
    x = _x(b=2)
    m(x).sum().backward()
    for make in (copy.deepcopy, lambda t: torch.load(_buffer(t), weights_only=False)):
        c = make(m)
        m.zero_grad(set_to_none=True)
        c(x).pow(2).sum().backward()
        assert all(p.grad is not None for p in c.parameters()), "the copy's parameters got no gradient"
        assert all(p.grad is None for p in m.parameters()), "the copy trained the original's parameters"
        before = m.W_spatial[1].running_mean.clone()
        c(x)
        assert torch.equal(m.W_spatial[1].running_mean, before), "the copy updated the original's statistics"


def _buffer(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("backend", [b for b in _backends() if b.values[0] in ("torch", "cpp")])
def test_tensors_replaced_below_the_module_after_a_forward_are_used(backend):
    """The fused path's plan holds the module's tensors; one swapped or reassigned below the
    module (where RGAModule.__setattr__ does not see it) after the plan was made must be used:
    torch.func.functional_call, a submodule's parameter or buffer, convert_sync_batchnorm."""
    ref, fus = _pair(backend)
    x = _x()
    for m in (ref, fus):
        m(x)  # planned
    # functional_call: the given tensors, their gradients, and the module's own ones afterwards
    grads = []
    for m in (ref, fus):
        new = {k: (v.detach() + 0.3).requires_grad_() for k, v in m.named_parameters()}
        out = torch.func.functional_call(m, new, (x,))
        out.pow(2).sum().backward()
        grads.append((out.detach(), [new[k].grad for k in new]))
    assert_close(grads[1][0], grads[0][0], "float64")
    for g2, g1 in zip(grads[1][1], grads[0][1]):
        assert_close(g2, g1, "float64")
    _assert_same(ref, fus, x, steps=1)
    # a submodule's parameter and buffer reassigned
    for m in (ref, fus):
        m.W_spatial[3].weight = torch.nn.Parameter(m.W_spatial[3].weight.detach() * -2)
        m.W_channel[1].running_mean = m.W_channel[1].running_mean.clone()
    _assert_same(ref, fus, x, steps=1)
    # convert_sync_batchnorm after a forward: the SyncBatchNorm modules run
    fus = torch.nn.SyncBatchNorm.convert_sync_batchnorm(fus)
    calls = []
    for bn in fus.modules():
        if isinstance(bn, torch.nn.SyncBatchNorm):
            bn.register_forward_hook(lambda *_: calls.append(1))
    fus(x)
    assert calls, "the SyncBatchNorm modules were bypassed"


@pytest.mark.parametrize("backend", [b for b in _backends() if b.values[0] in ("torch", "cpp")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_module_after_a_step(dtype, backend):
    """module.half() / .bfloat16() (no autocast) after a float32 step: the branch kernels keep BN
    parameters in float32, so such a module takes the composite path instead of failing."""
    torch.manual_seed(0)
    ref = _randomize(RGAModule(C, (H, W), **SMALL))
    fus = copy.deepcopy(ref)
    fus.fused = backend
    x = _x().float()
    for m in (ref, fus):
        m(x).sum().backward()
        m.to(dtype)
    xh = x.to(dtype)
    for train in (True, False):
        outs = []
        for m in (ref, fus):
            m.train(train)
            xi = xh.clone().requires_grad_()
            out = m(xi)
            out.float().pow(2).sum().backward()
            assert out.dtype == dtype and torch.isfinite(xi.grad).all()
            outs.append(out.float())
        assert (outs[1] - outs[0]).abs().max() <= 0.05 * outs[0].abs().max()


@pytest.mark.parametrize("backend", [True] + _backends())
@pytest.mark.parametrize("order", ["sc", "parallel"])
def test_torch_func_transforms_take_the_plain_path(backend, order):
    """Per-sample gradients (vmap over grad of functional_call) of a fused module: the fused
    path's autograd Functions cannot be transformed, so under torch.func the module runs its plain
    path, with the reference module's results."""
    from torch.func import functional_call, grad, vmap

    ref, fus = _pair(backend, order=order)
    ref.eval(), fus.eval()
    x = _x(b=3)
    got = []
    for m in (ref, fus):
        params = {k: v.detach() for k, v in m.named_parameters()}
        buffers = dict(m.named_buffers())

        def loss(p, xi, m=m, buffers=buffers):
            return functional_call(m, (p, buffers), (xi.unsqueeze(0),)).pow(2).sum()

        got.append(vmap(grad(loss), in_dims=(None, 0))(params, x))
    assert got[0].keys() == got[1].keys()
    for k in got[0]:
        assert_close(got[1][k], got[0][k], "float64", msg=k)
