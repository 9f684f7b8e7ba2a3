"""Memory an RGA module's forward keeps for its backward, on the CPU (resident set size).

    MALLOC_MMAP_THRESHOLD_=65536 python bench/memory_held.py [--checkpoint] [BACKEND ...]

For each path (``reference``: fused=False; a backend name: that fused path) one RGA-SC module
(C=256 on a 32x16 map, batch 16, float32, one thread) runs forward + backward three times; the
third round prints what the process holds above its level before the forward: after the forward,
after the backward with the output still referenced, and after the output is dropped.
``--checkpoint`` wraps the module in torch.utils.checkpoint (non-reentrant), which should bring
the first figure down to about the input's size. The fixed mmap threshold makes glibc return large
frees to the system, so the resident set follows the tensors alive.
"""
import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from rga import RGAModule  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def held(path: str, use_checkpoint: bool) -> tuple[float, float, float]:
    torch.manual_seed(0)
    m = RGAModule(256, (32, 16), fused=False if path == "reference" else path)
    x = torch.randn(16, 256, 32, 16, requires_grad=True)
    for _ in range(3):
        gc.collect()
        base = _rss_mib()
        out = checkpoint(m, x, use_reentrant=False) if use_checkpoint else m(x)
        after_forward = _rss_mib() - base
        out.pow(2).mean().backward()
        after_backward = _rss_mib() - base
        del out
        gc.collect()
        after_del = _rss_mib() - base
        x.grad = None
        m.zero_grad(set_to_none=True)
    return after_forward, after_backward, after_del


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="*", default=["reference", "cpp"])
    p.add_argument("--checkpoint", action="store_true", help="torch.utils.checkpoint(use_reentrant=False)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for path in args.paths:
        f, b, d = held(path, args.checkpoint)
        print(f"{path:9s} checkpoint={args.checkpoint}: held after forward +{f:.1f} MiB, after backward "
              f"(output alive) +{b:.1f}, after del +{d:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
