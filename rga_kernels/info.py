"""``python -m rga_kernels.info``: which backends this machine has and, for each missing one, why."""
import os
import platform
import sys

import torch

from .ops import BACKENDS, backend_status


def main() -> int:
    print(f"rga_kernels on Python {platform.python_version()}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not importable ({type(exc).__name__})"
    interp = os.environ.get("TRITON_INTERPRET", "0")
    print(f"triton {triton_version}; TRITON_INTERPRET={interp}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        print("GPU: none visible")
    width = max(map(len, BACKENDS))
    for device in ("cpu", "cuda"):
        print(f"\nbackends for {device} tensors:")
        for name, (ok, why) in backend_status(device).items():
            print(f"  {name:<{width}}  {'available' if ok else 'missing: ' + why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
