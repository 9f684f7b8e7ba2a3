"""One small forward+backward of relation_embed and of an RGA-SC module on the GPU, for
compute-sanitizer memcheck.

Odd sizes so that every masked edge of the kernels is exercised; the module runs the fused branch's
kernels (csrc/branch_cuda.cu for `cuda`, rga_kernels/_triton_branch.py for `triton`) in training
and eval mode, float32 and bf16 autocast, against the reference module in float64.
Usage: python bench/sanitize_case.py BACKEND
"""
import os
import sys

# `python bench/sanitize_case.py` puts bench/, not the repository, on sys.path: import the
# in-place build of the repository this file belongs to
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rga_kernels  # noqa: E402


def _over(tag: str, worst: float, limit: float) -> bool:
    """Print a case's worst relative error; True (and a FAILED line) when it is over the limit."""
    print(f"{tag}: relative error {worst:.2e}")
    if worst > limit:
        print(f"FAILED: {tag}: {worst:.2e} > {limit:g}")
    return worst > limit


def main(backend: str) -> int:
    torch.manual_seed(0)
    failed = False
    for dtype in (torch.float32, torch.bfloat16):
        theta = torch.randn(3, 7, 67, device="cuda", dtype=dtype, requires_grad=True)
        phi = torch.randn(3, 7, 67, device="cuda", dtype=dtype, requires_grad=True)
        weight = torch.randn(9, 134, device="cuda", dtype=dtype, requires_grad=True)
        out = rga_kernels.relation_embed(theta, phi, weight, backend=backend)
        grad = torch.randn_like(out)
        out.backward(grad)
        leaves = [t.detach().double().requires_grad_() for t in (theta, phi, weight)]
        ref = rga_kernels.relation_embed_reference(*leaves)
        ref.backward(grad.double())
        worst = 0.0
        for name, got, want in (("out", out, ref), ("dtheta", theta.grad, leaves[0].grad),
                                ("dphi", phi.grad, leaves[1].grad), ("dweight", weight.grad, leaves[2].grad)):
            err = (got.double() - want).abs().max().item() / want.abs().max().item()
            print(f"{backend} {dtype} {name}: relative error {err:.2e}")
            worst = max(worst, err)
        # bf16 keeps 8 bits: a few 1e-3 relative is its rounding; anything near 1e-1 is a bug.
        failed |= _over(f"{backend} {dtype}", worst, 1e-4 if dtype == torch.float32 else 3e-2)
    failed |= module_case(backend)
    failed |= gate_case(backend)
    torch.cuda.synchronize()
    return 1 if failed else 0


def module_case(backend: str) -> bool:
    """RGA-SC (both branches, order "parallel" too) at an odd 7x5 map, batch 3: the fused
    module against the reference module (float64 copy); returns True on failure."""
    import copy

    from rga import RGAModule

    failed = False
    for order in ("sc", "parallel"):
        for train in (True, False):
            for bf16 in (False, True):
                torch.manual_seed(0)
                ref = RGAModule(24, (7, 5), cha_ratio=4, spa_ratio=4, down_ratio=2, order=order).cuda().double()
                fused = copy.deepcopy(ref).float()
                fused.fused = backend
                ref.train(train)
                fused.train(train)
                x = torch.randn(3, 24, 7, 5, device="cuda", requires_grad=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    out = fused(x)
                grad = torch.randn_like(out)
                out.backward(grad)
                x64 = x.detach().double().requires_grad_()
                want = ref(x64)
                want.backward(grad.double())
                worst = max((out.double() - want).abs().max().item() / want.abs().max().item(),
                            (x.grad.double() - x64.grad).abs().max().item() / x64.grad.abs().max().item())
                tag = f"{backend} module {order} {'train' if train else 'eval'} {'bf16' if bf16 else 'fp32'}"
                failed |= _over(tag, worst, 5e-2 if bf16 else 1e-3)
    return failed


def gate_case(backend: str, device: str = "cuda") -> bool:
    """The attention head's forward at a size that takes the two-launch gate_fwd in training
    (B*n*Kh over GATE_SPLIT_WORK, a short last block) and the grid one in eval, float32 and
    bfloat16, against branch_reference in float64; returns True on failure."""
    from rga_kernels import branch_reference as ref
    from rga_kernels._branch_chain import _kernels

    failed = False
    B, Kh, n = 2, 64, 2100
    for dtype in (torch.float32, torch.bfloat16):
        for train in (True, False):
            g = torch.Generator().manual_seed(1)
            h = torch.randn(B, Kh, n, generator=g, dtype=torch.float64)
            hw, hb, w2 = 1 + 0.3 * torch.randn(Kh, generator=g, dtype=torch.float64), \
                0.2 * torch.randn(Kh, generator=g, dtype=torch.float64), torch.randn(1, Kh, generator=g, dtype=torch.float64)
            lw, lb = torch.full((1,), 1.2, dtype=torch.float64), torch.full((1,), 0.1, dtype=torch.float64)
            rm, rv = torch.full((1,), 0.2, dtype=torch.float64), torch.full((1,), 1.5, dtype=torch.float64)
            hm, hi = ref.bn_stats(h, None, None, True, 0.0, 1e-5)
            args = [h.to(dtype), hw, hb, hm, hi, w2, lw, lb, rm, rv]
            dev_args = [args[0].to(device)] + [t.to(device, torch.float32) for t in args[1:]]
            got = _kernels(backend).gate_fwd(*dev_args, train, 0.1, 1e-5)
            want = ref.gate_fwd(args[0].double(), *args[1:8], rm.clone(), rv.clone(), train, 0.1, 1e-5)
            worst = max((o.double().cpu() - e.double()).abs().max().item() / max(e.double().abs().max().item(), 1e-12)
                        for o, e in zip(got, want))
            tag = f"{backend} gate_fwd {B}x{Kh}x{n} {'train' if train else 'eval'} {dtype}"
            failed |= _over(tag, worst, 1e-4 if dtype == torch.float32 else 3e-2)
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
