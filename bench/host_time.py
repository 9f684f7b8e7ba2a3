"""Host time of a tiny RGA-SC module forward+backward (C=64, 8x4, batch 2, one thread), where a
step is all host work, for each path side by side (rga_kernels.launches.host_times: the best of
interleaved rounds), as ratios to the reference. The measurement of
tests/test_launches.py::test_cpp_host_time_against_reference, printed.

    python bench/host_time.py [--rounds 60] [--backends cpp torch]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=60, help="interleaved rounds (default 60)")
    p.add_argument("--backends", nargs="+", default=["cpp"], help="fused= values beside the reference (default cpp)")
    args = p.parse_args(argv)
    import rga_kernels
    from rga_kernels.launches import host_times
    from test_launches import tiny_module_steps

    missing = [b for b in args.backends if b not in rga_kernels.available_backends("cpu")]
    if missing:
        p.error(f"not available on this machine: {missing} ({rga_kernels.backend_status('cpu')})")
    torch.set_num_threads(1)
    best = host_times(tiny_module_steps((False, *args.backends)), rounds=args.rounds)
    ref = best.pop(False)
    print(f"reference {ref * 1e6:.0f} us")
    for name, sec in best.items():
        print(f"{name} {sec * 1e6:.0f} us  {sec / ref:.3f}x the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
