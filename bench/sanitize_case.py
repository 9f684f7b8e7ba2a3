"""One small forward+backward of relation_embed on the GPU, for compute-sanitizer memcheck.

Odd sizes so that every masked edge of the kernels is exercised. Usage: python bench/sanitize_case.py BACKEND
"""
import os
import sys

# `python bench/sanitize_case.py` puts bench/, not the repository, on sys.path: import the
# in-place build of the repository this file belongs to
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rga_kernels  # noqa: E402


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
        limit = 1e-4 if dtype == torch.float32 else 3e-2
        if worst > limit:
            print(f"FAILED: {backend} {dtype}: relative error {worst:.2e} > {limit:g}")
            failed = True
    torch.cuda.synchronize()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
