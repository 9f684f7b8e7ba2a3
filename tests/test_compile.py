"""The whole fused model under torch.compile(fullgraph=True), and a step fit for CUDA graphs.

On the CPU the `cpp` backend stands for the GPU's backends (same registration: fake kernels and
autograd through torch.library). The "aot_eager" compiler backend runs Dynamo's full-graph capture
and AOTAutograd's joint forward/backward trace (where graph breaks and wrong fake kernels show up)
without spending minutes in Inductor's C++ code generation on a 2-core machine.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rga_kernels
from rga import build_model
from testkit import assert_close

pytestmark = pytest.mark.skipif("cpp" not in rga_kernels.available_backends("cpu"),
                                reason="needs the C++ extension")


def _pair(arch="resnet50"):
    torch.manual_seed(0)
    # float64: compiled and eager runs may lay memory out differently, which in fp32 moves results
    # by rounding (amplified by batch statistics over 4 samples); in fp64 they agree to ~1e-13
    # Traced by torch.compile, the module runs its composite path (the branch kernels are not
    # traced), the cpp relation op inside it; the eager reference runs that same path ("torch"
    # relation op, the same ATen GEMMs), not the eager branch kernels, whose different rounding can
    # flip a ReLU at an exact zero and move one gradient element (the kernels are compared with
    # the reference module in tests/test_rga_module.py)
    model = build_model("rga_sc", 10, height=64, width=32, fused="cpp", backbone=arch, pretrained=False).double()
    ref = build_model("rga_sc", 10, height=64, width=32, fused="torch", backbone=arch, pretrained=False).double()
    ref.load_state_dict(model.state_dict())
    return model, ref


def test_whole_fused_resnet50_rga_sc_compiles_fullgraph_train_and_eval():
    model, ref = _pair()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 64, 32, dtype=torch.float64)
    results = []
    for m in (compiled, ref):
        m.train()
        outs = m(x)
        sum(o.float().sum() for o in outs).backward()
        results.append(outs)
    for o, r in zip(*results):
        assert_close(o, r, "compiled")
    got = [p.grad for p in model.parameters() if p.grad is not None]
    want = [p.grad for p in ref.parameters() if p.grad is not None]
    assert len(got) == len(want) > 100
    for g, w in zip(got, want):
        assert_close(g, w, "compiled")
    for (name, b1), (_, b2) in zip(model.named_buffers(), ref.named_buffers()):
        assert_close(b1, b2, "compiled", msg=lambda m: f"{name}: {m}")
    model.eval(), ref.eval()
    with torch.no_grad():
        assert_close(compiled(x), ref(x), "compiled")


class _HostSyncs(TorchDispatchMode):
    """Records ops that need the host to wait for the device (.item(), data-dependent shapes)."""

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNC_OPS:
            self.seen.append(name)
        out = func(*args, **(kwargs or {}))
        return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_training_step_has_no_host_sync(fused):
    """What --cuda-graphs captures (the model's forward and backward) must not call .item(),
    .cpu() or ops with data-dependent output shapes: they break or serialize a CUDA graph."""
    torch.manual_seed(0)
    model = build_model("rga_sc", 10, height=64, width=32, fused=fused, backbone="resnet18", pretrained=False).train()
    x = torch.randn(4, 3, 64, 32)
    model(x)  # first call: one-time work (tying, imports) is not part of the captured step
    mode = _HostSyncs()
    with mode:
        outs = model(x)
        sum(o.float().sum() for o in outs).backward()
    assert mode.seen == []
