"""The launch budget: operator launches of one RGA-SC module forward+backward, fused vs reference.

An eager GPU step of RGA is host-bound, so the number of launches decides its speed. They are
counted with rga_kernels.launches.count_launches (top-level aten ops, views and metadata left out,
what our custom ops run inside them included, one per Triton kernel launch), which gives the same
count on the CPU as on a GPU for the same code path: the Triton kernels run under the interpreter
here (a count needs no correct bf16 values), and `cpp` runs the same C++ code as `cuda`.
The budgets are today's counts: a change that raises one fails here; lower them when a change
brings a count down.
"""
import os

import pytest
import torch

import rga_kernels
from rga import RGAModule
from rga_kernels.launches import count_launches, host_times
from rga_kernels.ops import GPU_DEFAULT_BACKEND

REFERENCE = {False: 116, True: 134}  # the reference path, fp32 / bf16 autocast (not a budget)
# (backend, bf16 autocast) -> maximum launches of one RGA-SC fwd+bwd in training mode
BUDGET = {("triton", False): 41, ("triton", True): 61, ("cpp", False): 58, ("cpp", True): 79,
          ("torch", False): 109, ("torch", True): 123}
# The targets, fp32 (the kernel issues): the GPU default (triton) at most 0.4x the reference's
# launches, the C++/CUDA path (cpp runs the code of cuda) at most 0.5x
TARGET_RATIO = {"triton": 0.4, "cpp": 0.5}


def _count(fused, bf16, C=64, size=(8, 4), batch=2):
    torch.manual_seed(0)
    m = RGAModule(C, size, fused=fused).train()
    x = torch.randn(batch, C, *size, requires_grad=True)

    def step():
        m.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(x)
        out.float().sum().backward()

    step()  # warm-up: first-call work (imports, tying) is not part of a training step
    return count_launches(step)


def _skip_unavailable(backend):
    if backend not in rga_kernels.available_backends("cpu"):
        pytest.skip(f"{backend}: {rga_kernels.backend_status('cpu')[backend][1]}")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_reference_count_is_what_the_budget_compares_to(bf16):
    assert _count(False, bf16) == REFERENCE[bf16]


@pytest.mark.parametrize("backend,bf16", list(BUDGET), ids=[f"{b}-{'bf16' if a else 'fp32'}" for b, a in BUDGET])
def test_fused_module_within_launch_budget(backend, bf16):
    _skip_unavailable(backend)
    n = _count(backend, bf16)
    assert n <= BUDGET[(backend, bf16)], f"{backend} bf16={bf16}: {n} launches > budget {BUDGET[(backend, bf16)]}"
    assert n < REFERENCE[bf16], "the fused path must launch fewer ops than the reference"


@pytest.mark.parametrize("backend", list(TARGET_RATIO))
def test_fused_backend_meets_the_target(backend):
    _skip_unavailable(backend)
    n = _count(backend, False, C=256, size=(16, 8), batch=4)  # the issues' shape (counts do not depend on it)
    assert n <= TARGET_RATIO[backend] * REFERENCE[False], (
        f"{backend}: {n} launches = {n / REFERENCE[False]:.3f}x the reference > {TARGET_RATIO[backend]}x")


# Host time of the cpp path (the cuda backend's orchestration, run on the CPU): a tiny module
# (C=64, 8x4, batch 2) fwd+bwd at one thread, where the step is all host work, against the
# reference side by side; the best of interleaved rounds, so other load on the machine does not
# decide it. The kernel issue's goal is 0.5x; the figure measured is in docs/results.md.
HOST_TIME_RATIO = 0.5


def tiny_module_steps(backends=(False, "cpp")) -> dict:
    """fwd+bwd of the tiny RGA-SC module per path (False: the reference), for host_times."""
    steps = {}
    for fused in backends:
        torch.manual_seed(0)
        m = RGAModule(64, (8, 4), fused=fused).train()
        x = torch.randn(2, 64, 8, 4, requires_grad=True)

        def step(m=m, x=x):
            m.zero_grad(set_to_none=True)
            x.grad = None
            m(x).sum().backward()

        steps[fused] = step
    return steps


def test_cpp_host_time_against_reference():
    _skip_unavailable("cpp")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = host_times(tiny_module_steps())
    finally:
        torch.set_num_threads(old)
    ratio = best["cpp"] / best[False]
    assert ratio <= HOST_TIME_RATIO, f"cpp host time {ratio:.2f}x the reference's > {HOST_TIME_RATIO}x ({best})"


def test_gpu_default_is_the_triton_backend():
    assert GPU_DEFAULT_BACKEND == "triton"


def test_counter_sees_backward_and_copies():
    """The counter is not blind: a backward adds its ops, a real copy counts, a view does not."""
    x = torch.randn(4, 5, requires_grad=True)
    assert count_launches(lambda: x.t().contiguous()) == 1  # the copy of contiguous() on a transposed view
    assert count_launches(lambda: x.view(20).reshape(4, 5).t()) == 0
    assert count_launches(lambda: (x * 2).sum().backward()) >= 4  # mul, sum, and their backward


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter on CPU")
def test_counter_counts_one_per_triton_launch():
    _skip_unavailable("triton")
    from rga_kernels import relation_embed

    theta, phi = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    weight = torch.randn(4, 10)
    counts = count_launches(lambda: relation_embed(theta, phi, weight, backend="triton"), by_op=True)
    assert counts["triton::_bmm2x2_kernel"] == 2 and sum(counts.values()) == 2
