"""relation_embed: every backend against the reference (rga_kernels/reference.py)."""
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import rga_kernels
from rga_kernels import relation_embed, relation_embed_reference

from testkit import DEVICES, assert_close, assert_within_torch_error, backend_params, forward_backward, relation_inputs


def _cases(devices=None):
    """(device, backend) pairs: those missing here are skipped, with the reason."""
    return backend_params() if devices is None else backend_params(devices=devices)


def _check_against_reference(device, backend, B, d, n, M, dtype, k=3.0, seed=0, transform=None):
    """Error of the backend vs a float64 reference at most k x PyTorch's own error in `dtype`.

    PyTorch's own error is the reference computed directly in `dtype` (flash-attention style).
    """
    inputs = relation_inputs(B, d, n, M, dtype=dtype, device=device, seed=seed)
    grad = torch.randn(B, M, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device, dtype)
    if transform is not None:
        inputs, grad = transform(inputs, grad)
    ref64 = forward_backward(relation_embed_reference, [t.double() for t in inputs], grad.double())
    ref_lp = forward_backward(relation_embed_reference, inputs, grad)
    got = forward_backward(lambda a, b, c: relation_embed(a, b, c, backend=backend), inputs, grad)
    for name, g, r, rl in zip(("out", "dtheta", "dphi", "dweight"), got, ref64, ref_lp):
        assert g.dtype == dtype, f"{name}: {g.dtype}"
        assert_within_torch_error(f"{backend} {name}", g, r, rl, k=k)


@pytest.mark.parametrize("device,backend", _cases())
@pytest.mark.parametrize("shape", [(2, 3, 5, 2), (1, 1, 1, 1), (2, 2, 7, 3)])
def test_gradcheck_float64(device, backend, shape):
    B, d, n, M = shape
    inputs = [t.requires_grad_() for t in relation_inputs(B, d, n, M, dtype=torch.float64, device=device)]
    # The Triton interpreter costs ~0.1 s a call: check random directional derivatives there
    # (gradcheck's fast mode) instead of every Jacobian entry.
    interpreted = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(lambda a, b, c: relation_embed(a, b, c, backend=backend), inputs,
                                    fast_mode=interpreted)


@pytest.mark.parametrize("device,backend", _cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(device, backend, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter: bf16 Triton is tested on a GPU")
    _check_against_reference(device, backend, B=2, d=16, n=96, M=12, dtype=dtype)


@pytest.mark.parametrize("device,backend", _cases())
@pytest.mark.parametrize("n", [1, 63, 127, 257])
@pytest.mark.parametrize("d", [1, 7])
def test_odd_sizes(device, backend, n, d):
    _check_against_reference(device, backend, B=1, d=d, n=n, M=1, dtype=torch.float32)


@pytest.mark.parametrize("device,backend", _cases())
def test_odd_sizes_batched(device, backend):
    _check_against_reference(device, backend, B=3, d=7, n=63, M=5, dtype=torch.float32)


def _non_contiguous(inputs, grad):
    theta, phi, weight = inputs
    theta = theta.transpose(1, 2).contiguous().transpose(1, 2)  # (B, d, n) stored as (B, n, d)
    phi = torch.cat([phi, phi], dim=1)[:, ::2]  # strided along d
    weight = weight.t().contiguous().t()  # column-major
    grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (theta.is_contiguous() or phi.is_contiguous() or weight.is_contiguous() or grad.is_contiguous())
    return [theta, phi, weight], grad


@pytest.mark.parametrize("device,backend", _cases())
def test_non_contiguous(device, backend):
    _check_against_reference(device, backend, B=2, d=5, n=33, M=4, dtype=torch.float32, transform=_non_contiguous)


@pytest.mark.parametrize("device,backend", _cases())
def test_expanded_grad(device, backend):
    """A gradient with stride 0 (what .sum() or .mean() sends back) is handled."""
    theta, phi, weight = [t.requires_grad_() for t in relation_inputs(2, 3, 17, 4, device=device)]
    relation_embed(theta, phi, weight, backend=backend).sum().backward()
    t2, p2, w2 = [t.detach().double().requires_grad_() for t in (theta, phi, weight)]
    relation_embed_reference(t2, p2, w2).sum().backward()
    for got, ref in ((theta.grad, t2.grad), (phi.grad, p2.grad), (weight.grad, w2.grad)):
        assert_close(got.double(), ref, "float32_wide")


def _largest_allocation(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("device", DEVICES)
def test_no_n_by_n_allocation(device):
    """No backend but `reference` allocates an n x n tensor, forward or backward.

    The reference is the positive control: the same probe must see its (B, 2n, n) buffer.
    """
    B, d, n, M = 2, 4, 256, 8
    inputs = [t.requires_grad_() for t in relation_inputs(B, d, n, M, device=device)]

    def run(backend):
        def fn():
            relation_embed(*inputs, backend=backend).sum().backward()
        return fn

    nn_bytes = n * n * 4
    assert _largest_allocation(run("reference"), device) >= nn_bytes
    for backend in rga_kernels.available_backends(device):
        if backend != "reference":
            peak = _largest_allocation(run(backend), device)
            assert peak < nn_bytes, f"{backend} allocated {peak} bytes at once (n x n is {nn_bytes})"


def test_auto_picks_available_backend():
    theta, phi, weight = relation_inputs(2, 3, 9, 4)
    out = relation_embed(theta, phi, weight)
    assert_close(out, relation_embed_reference(theta, phi, weight), "float32_abs")
    expected = "cpp" if "cpp" in rga_kernels.available_backends("cpu") else "torch"
    assert rga_kernels.ops._resolve_backend("auto", theta.device) == expected


def test_autocast_mixed_dtypes():
    """Inside autocast a float32 weight meets bfloat16 activations, as in a real module."""
    theta, phi, weight = relation_inputs(2, 8, 24, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = relation_embed(theta.bfloat16(), phi.bfloat16(), weight)
    assert out.dtype == torch.bfloat16
    ref = relation_embed_reference(theta.double(), phi.double(), weight.double())
    assert (out.double() - ref).abs().max() <= 0.05 * ref.abs().max()


# ------------------------------------------------------------------------------------ bad input


def _good():
    return relation_inputs(2, 3, 5, 4)


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda t, p, w: (t[0], p, w), ValueError, r"theta must be \(B, d, n\), got shape \(3, 5\)"),
        (lambda t, p, w: (t, p[..., None], w), ValueError, r"phi must be \(B, d, n\)"),
        (lambda t, p, w: (t, p[:1], w), ValueError, r"mismatched: B 2 vs 1"),
        (lambda t, p, w: (t, p[:, :2], w), ValueError, r"mismatched: d 3 vs 2"),
        (lambda t, p, w: (t, p[..., :4], w), ValueError, r"mismatched: n 5 vs 4"),
        (lambda t, p, w: (t, p, w[:, :9]), ValueError, r"weight must be \(M, 2n\) = \(M, 10\).*\(4, 9\)"),
        (lambda t, p, w: (t, p, w[0]), ValueError, r"weight must be \(M, 2n\)"),
        (lambda t, p, w: (t, p, w.double()), TypeError, r"dtypes differ"),
        (lambda t, p, w: (t.long(), p, w), TypeError, r"theta must be float16, bfloat16, float32 or float64"),
        (lambda t, p, w: (t, p, w.int()), TypeError, r"weight must be float"),
        (lambda t, p, w: (t.numpy(), p, w), TypeError, r"theta must be a torch.Tensor"),
        (lambda t, p, w: (t[:, :, :0], p[:, :, :0], w[:, :0]), ValueError, r"empty input"),
        (lambda t, p, w: (t, p, w.to("meta")), ValueError, r"different devices"),
    ],
)
def test_bad_input(mutate, exc, pattern):
    with pytest.raises(exc, match=pattern):
        relation_embed(*mutate(*_good()))


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'flash'.*expected 'auto' or one of"):
        relation_embed(*_good(), backend="flash")
    with pytest.raises(TypeError, match="backend must be a string"):
        relation_embed(*_good(), backend=3)


def test_unavailable_backend_says_why():
    missing = [b for b, (ok, _) in rga_kernels.backend_status("cpu").items() if not ok]
    if not missing:
        pytest.skip("every backend is available for CPU tensors here")
    with pytest.raises(ValueError, match=rf"backend '{missing[0]}' is not available for cpu tensors"):
        relation_embed(*_good(), backend=missing[0])


def test_info_runs(capsys):
    from rga_kernels import info

    assert info.main() == 0
    text = capsys.readouterr().out
    for b in rga_kernels.BACKENDS:
        assert b in text


@pytest.mark.skipif(os.environ.get("RGA_EXPECT_CUDA_BUILD") != "1",
                    reason="set RGA_EXPECT_CUDA_BUILD=1 where the CUDA part must have been compiled (CI)")
def test_cuda_part_was_built():
    assert rga_kernels.ops._EXT_OK, rga_kernels.ops._EXT_REASON
    assert rga_kernels.ops._ext_has_cuda(), "rga_kernels._C has no CUDA kernel for rga_kernels::relation_fwd"


@pytest.mark.parametrize("device,backend", _cases())
def test_double_backward_gradgradcheck(device, backend):
    """Second derivatives (create_graph=True) are exact on every backend, not only first ones."""
    inputs = [t.requires_grad_() for t in relation_inputs(2, 3, 5, 2, dtype=torch.float64, device=device)]
    interpreted = backend == "triton" and device == "cpu"
    assert torch.autograd.gradgradcheck(lambda a, b, c: relation_embed(a, b, c, backend=backend), inputs,
                                        fast_mode=interpreted)


@pytest.mark.parametrize("device,backend", _cases())
def test_gradient_penalty_matches_reference(device, backend):
    """The case that used to be silently wrong: d/dphi and d/dW of a gradient taken with create_graph."""
    def penalty(fn):
        a, b, w = (t.clone().requires_grad_() for t in relation_inputs(2, 4, 5, 3, dtype=torch.float64, device=device))
        g, = torch.autograd.grad(fn(a, b, w).pow(2).sum(), a, create_graph=True)
        return torch.autograd.grad(g.sum(), (b, w))

    got = penalty(lambda a, b, w: relation_embed(a, b, w, backend=backend))
    want = penalty(relation_embed_reference)
    for g, r in zip(got, want):
        assert_close(g, r, "float64")


def test_env_backend_named_in_errors(monkeypatch):
    theta, phi, weight = relation_inputs(1, 2, 3, 2)
    monkeypatch.setenv("RGA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"RGA_KERNELS_BACKEND='bogus' \(environment variable\)"):
        relation_embed(theta, phi, weight)


def test_torch_func_transforms_run_plain_ops_or_say_why():
    """Per-sample gradients (vmap of grad): "auto" takes the plain-ops backend, which torch.func can
    transform; a kernel backend named explicitly is one clear error (not PyTorch's about
    setup_context)."""
    from torch.func import grad, vmap

    theta, phi, weight = relation_inputs(3, 2, 5, 4, dtype=torch.float64)
    per_sample = vmap(grad(lambda t, p: relation_embed(t.unsqueeze(0), p.unsqueeze(0), weight).pow(2).sum()))
    want = vmap(grad(lambda t, p: relation_embed_reference(t.unsqueeze(0), p.unsqueeze(0), weight).pow(2).sum()))
    assert_close(per_sample(theta, phi), want(theta, phi), "float64")
    with pytest.MonkeyPatch.context() as mp:  # the environment's preference is for the kernels: not here
        mp.setenv("RGA_KERNELS_BACKEND", "cpp")
        assert_close(per_sample(theta, phi), want(theta, phi), "float64")
    for backend in rga_kernels.available_backends("cpu"):
        if backend in ("reference", "torch"):
            continue
        f = vmap(grad(lambda t, p: relation_embed(t.unsqueeze(0), p.unsqueeze(0), weight, backend=backend).sum()))
        with pytest.raises(ValueError, match=f"backend '{backend}' cannot run under torch.func transforms"):
            f(theta, phi)
