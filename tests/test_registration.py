"""torch.library registration: opcheck over every custom op, torch.compile over relation_embed."""
import pytest
import torch

from rga_kernels import relation_embed, relation_embed_reference

from testkit import assert_close, backend_params, relation_inputs


def _op_cases():
    """The backends with custom ops of their own (the C++ ops serve cpp and cuda)."""
    return backend_params(("cpp", "cuda", "triton"))


@pytest.mark.parametrize("device,backend", _op_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(device, backend, dtype):
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.rga_kernels, "relation_fwd" + suffix).default
    bwd = getattr(torch.ops.rga_kernels, "relation_bwd" + suffix).default
    theta, phi, weight = relation_inputs(2, 3, 11, 4, dtype, device, requires_grad=True)
    checks = {}
    if backend == "triton" and device == "cpu":
        # AOT tracing runs a triton_op's body with fake tensors, which only a GPU build of the
        # kernels accepts (the interpreter dereferences them): that check runs on GPUs.
        checks["test_utils"] = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(fwd, (theta, phi, weight), **checks)
    with torch.no_grad():
        _, p, q = fwd(theta, phi, weight)
    grad = torch.randn(theta.shape[0], weight.shape[0], theta.shape[2], device=device, dtype=dtype)
    torch.library.opcheck(bwd, (grad, theta.detach(), phi.detach(), weight.detach(), p, q), **checks)


def _compile_cases():
    def interpreter(dev, backend):
        if backend == "triton" and dev == "cpu":
            return "Inductor compiles Triton kernels for GPUs only; interpreter runs are eager"
        return None

    return backend_params(("torch", "cpp", "cuda", "triton"), extra_reason=interpreter)


@pytest.mark.parametrize("device,backend", _compile_cases())
def test_compile_fullgraph_matches_eager(device, backend):
    torch._dynamo.reset()

    def step(theta, phi, weight):
        return relation_embed(theta, phi, weight, backend=backend).square().mean()

    compiled = torch.compile(step, fullgraph=True)
    eager_in, comp_in = (relation_inputs(2, 3, 11, 4, device=device, requires_grad=True) for _ in range(2))
    loss_e = step(*eager_in)
    loss_e.backward()
    loss_c = compiled(*comp_in)
    loss_c.backward()
    assert_close(loss_c, loss_e, "float32_loss")
    for e, c in zip(eager_in, comp_in):
        assert_close(c.grad, e.grad, "float32_grad")
    ref = relation_embed_reference(*[t.detach().double() for t in eager_in]).square().mean()
    assert_close(loss_c.double(), ref, "float32_loss")


@pytest.mark.parametrize("device,backend", _compile_cases())
def test_compile_dynamic_batch(device, backend):
    """One compiled graph serves several batch sizes (dynamic shapes through the fake kernels)."""
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c: relation_embed(a, b, c, backend=backend), fullgraph=True, dynamic=True)
    for B in (2, 3, 5):
        theta, phi, weight = relation_inputs(B, 3, 11, 4, device=device)
        torch.testing.assert_close(fn(theta, phi, weight), relation_embed_reference(theta, phi, weight),
                                   rtol=1e-4, atol=1e-5)


class _Relation(torch.nn.Module):
    def __init__(self, n, M):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(M, 2 * n))

    def forward(self, theta, phi):
        return relation_embed(theta, phi, self.weight)


def test_export_uses_plain_aten_ops():
    """torch.export with backend="auto" records the factorized PyTorch ops, not a custom op, so
    the exported program runs where rga_kernels is not installed."""
    module = _Relation(11, 4)
    theta, phi, _ = relation_inputs(2, 3, 11, 4)
    exported = torch.export.export(module, (theta, phi))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not any("rga_kernels" in t for t in targets), targets
    assert any("bmm" in t or "matmul" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(theta, phi), relation_embed_reference(theta, phi, module.weight),
                               rtol=1e-4, atol=1e-5)
