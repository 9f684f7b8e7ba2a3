"""RGAModule forward+backward, fused against reference, and (GPU only) a full ResNet-50 training step.

Module shapes are the four ResNet-50 stage outputs of a 256x128 input with last stride 1.
CPU: batch 8, fp32, one timed round after a warm-up (RGA_BENCH_ROUNDS overrides), one intra-op
thread (RGA_BENCH_THREADS overrides): on a small shared machine two threads spend most of the time
of every small op waiting for each other, which makes timings noise; both paths run with the same
setting. To keep the file near a minute, RGA-S and RGA-C run at stage 1 only and RGA-SC (both
branches) at every stage; RGA_BENCH_FULL=1 runs all three variants at all four stages.
GPU: batch 64, bf16 autocast, the full matrix. Run: ``pytest bench/bench_rga_module.py --benchmark-only``.
"""
import os

import pytest
import torch

from rga import RGAModule, build_model
from train_step import _step_fn as train_step_fn  # bench/ is on sys.path under pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 64 if DEVICE == "cuda" else 8
ROUNDS = int(os.environ.get("RGA_BENCH_ROUNDS", "3" if DEVICE == "cuda" else "1"))
FULL = DEVICE == "cuda" or os.environ.get("RGA_BENCH_FULL") == "1"
STAGES = {1: (256, 64, 32), 2: (512, 32, 16), 3: (1024, 16, 8), 4: (2048, 16, 8)}
VARIANTS = {"rga_s": dict(use_channel=False), "rga_c": dict(use_spatial=False), "rga_sc": dict(order="sc")}
# Issue target on the CPU: the fused RGA-SC module at stage 1 at least 5x the reference, fwd+bwd.
TARGETS = {("rga_sc", 1): 5.0} if DEVICE == "cpu" else {}


THREADS = int(os.environ.get("RGA_BENCH_THREADS", "1"))


@pytest.fixture(autouse=True)
def _cpu_threads():
    if DEVICE != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


def _cases():
    for stage in STAGES:
        for variant in VARIANTS:
            if FULL or variant == "rga_sc" or stage == 1:
                yield pytest.param(variant, stage, id=f"{variant}-stage{stage}")


def _autocast():
    if DEVICE == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# reference: the public op order; unfused: the composite path (relation op without R, every BN,
# ReLU, sigmoid a PyTorch op: backend "torch"); fused: the default ("auto": the Triton branch
# kernels on a GPU, the composite path with the C++ relation op on the CPU); kernels: the C++
# branch kernels (cuda on a GPU, their CPU build on the CPU).
IMPLS = {"reference": False, "unfused": "torch", "fused": True, "kernels": "cuda" if DEVICE == "cuda" else "cpp"}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("variant, stage", list(_cases()))
def test_module_fwd_bwd(bench_record, variant, stage, impl):
    C, H, W = STAGES[stage]
    torch.manual_seed(0)
    module = RGAModule(C, (H, W), fused=IMPLS[impl], **VARIANTS[variant]).to(DEVICE).train()
    x = torch.randn(BATCH, C, H, W, device=DEVICE, requires_grad=True)
    grad = torch.randn(BATCH, C, H, W, device=DEVICE)

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        with _autocast():
            out = module(x)
        out.backward(grad)

    group = f"module {variant} stage{stage} {C}x{H}x{W} b{BATCH}" + (f" {THREADS}thr" if DEVICE == "cpu" else "")
    target = TARGETS.get((variant, stage)) if impl == "fused" else None
    bench_record(group, impl, step, DEVICE, rounds=ROUNDS, target=target)


LAUNCH_BACKENDS = ["reference", "torch", "cpp", "cuda", "triton"]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("backend", LAUNCH_BACKENDS)
def test_module_launches(launch_record, backend, stage, bf16):
    """Launches of one RGA-SC forward+backward per backend (training, batch statistics). The count
    does not depend on the batch or the device (one exception: on a GPU an attention head's forward
    takes a second launch from B*n*Kh >= 2**18 multiply-adds, which batch 2 stays under at every
    stage), so it is taken at batch 2 on the device at hand;
    on the CPU, `cpp` runs the same C++ code as `cuda` and counts for it, and `triton` runs
    under the interpreter (each kernel launch is one event)."""
    import rga_kernels

    fused = False if backend == "reference" else backend
    if fused and backend not in rga_kernels.available_backends(DEVICE):
        pytest.skip(f"{backend}: {rga_kernels.backend_status(DEVICE)[backend][1]}")
    if DEVICE == "cpu" and stage != 3 and not FULL:
        pytest.skip("on the CPU one stage is counted (the count does not depend on the shape: "
                    "RGA_BENCH_FULL=1 counts all four)")
    if backend == "triton" and DEVICE == "cpu" and bf16:
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter")
    C, H, W = STAGES[stage]
    torch.manual_seed(0)
    module = RGAModule(C, (H, W), fused=fused).to(DEVICE).train()
    x = torch.randn(2, C, H, W, device=DEVICE, requires_grad=True)
    dtype = torch.bfloat16 if bf16 else torch.float32

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=dtype, enabled=bf16):
            out = module(x)
        out.float().sum().backward()

    launch_record(f"rga_sc stage{stage} {'bf16' if bf16 else 'fp32'}", backend, step)


@pytest.mark.skipif(DEVICE != "cuda", reason="the full ResNet-50 training step (batch 64, bf16) is a GPU benchmark")
@pytest.mark.parametrize("impl", ["resnet50", "reference", "fused"])
def test_train_step_resnet50_rga_sc(bench_record, impl):
    torch.manual_seed(0)
    name = "baseline" if impl == "resnet50" else "rga_sc"
    model = build_model(name, 751, pretrained=False, fused=impl == "fused").to(DEVICE).train()
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
    x = torch.randn(64, 3, 256, 128, device=DEVICE)
    y = torch.randint(0, 751, (64,), device=DEVICE)
    step = train_step_fn(model, opt, x, y)  # the same step as bench/train_step.py
    bench_record("train step ResNet-50 + RGA-SC b64 256x128 bf16", impl, step, DEVICE, rounds=ROUNDS)
