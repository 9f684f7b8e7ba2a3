"""One small forward+backward of relation_embed on the GPU, for compute-sanitizer memcheck.

Odd sizes so that every masked edge of the kernels is exercised. Usage: python bench/sanitize_case.py BACKEND
"""
import sys

import torch

import rga_kernels


def main(backend: str) -> int:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        theta = torch.randn(3, 7, 67, device="cuda", dtype=dtype, requires_grad=True)
        phi = torch.randn(3, 7, 67, device="cuda", dtype=dtype, requires_grad=True)
        weight = torch.randn(9, 134, device="cuda", dtype=dtype, requires_grad=True)
        out = rga_kernels.relation_embed(theta, phi, weight, backend=backend)
        out.backward(torch.randn_like(out))
        ref = rga_kernels.relation_embed_reference(theta.double(), phi.double(), weight.double())
        err = (out.double() - ref).abs().max().item() / ref.abs().max().item()
        print(f"{backend} {dtype}: relative error {err:.2e}")
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
