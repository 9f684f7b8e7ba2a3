"""Build of the rga_kernels C++/CUDA extension (rga_kernels._C).

Switches (environment variables; all documented in README.md, "Build"):
  RGA_KERNELS_BUILD_EXT=0     skip the extension entirely (pure Python: reference/torch/triton).
  RGA_KERNELS_BUILD_CUDA=auto build the CUDA part when torch has CUDA and nvcc is found (default);
                         1    require it (fail if it cannot be built); 0: CPU part only.
  CUDA_HOME                   the CUDA toolkit; otherwise found from `nvcc` on PATH.
  TORCH_CUDA_ARCH_LIST        GPU architectures; default: the visible GPUs', or
                              DEFAULT_ARCH_LIST when no GPU is visible.
  MAX_JOBS                    parallel compile jobs (ninja).
"""
import os
import shutil
import subprocess
import sys

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100/H200, and PTX for newer GPUs
HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[rga_kernels setup] {msg}", file=sys.stderr)


def _switch(name, default):
    value = os.environ.get(name, default).strip().lower()
    if value in ("1", "true", "yes", "on", "force"):
        return "1"
    if value in ("0", "false", "no", "off", "skip"):
        return "0"
    if value == "auto":
        return "auto"
    raise SystemExit(f"{name}={os.environ[name]!r}: expected auto, 1 or 0")


def _find_cuda_home():
    """CUDA_HOME/CUDA_PATH, else the toolkit that `nvcc` on PATH belongs to (following wrappers)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    root = os.path.dirname(os.path.dirname(nvcc))
    if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
        return root
    # A wrapper script (e.g. /usr/local/bin/nvcc that execs the real one): look for the
    # toolkit path written inside it, then the conventional location.
    try:
        with open(nvcc, "r", errors="ignore") as f:
            text = f.read(4096)
        for token in text.split():
            if token.endswith("/bin/nvcc"):
                cand = os.path.dirname(os.path.dirname(token))
                if os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")):
                    return cand
    except OSError:
        pass
    if os.path.exists("/usr/local/cuda/include/cuda_runtime.h"):
        return "/usr/local/cuda"
    return None


def _nvidia_wheel_includes():
    """Include folders of NVIDIA's pip wheels (torch's CUDA headers such as cusparse.h live there)."""
    try:
        import nvidia  # namespace package installed with CUDA builds of torch
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        for sub in sorted(os.listdir(base)):
            inc = os.path.join(base, sub, "include")
            if os.path.isdir(inc):
                dirs.append(inc)
    return dirs


def _extensions():
    if _switch("RGA_KERNELS_BUILD_EXT", "1") == "0":
        _log("RGA_KERNELS_BUILD_EXT=0: not building the C++ extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _log("torch is not importable at build time: not building the C++ extension "
             "(install torch first and use --no-build-isolation)")
        return [], {}

    want_cuda = _switch("RGA_KERNELS_BUILD_CUDA", "auto")
    sources = ["csrc/relation.cpp", "csrc/branch.cpp", "csrc/branch_op.cpp", "csrc/chain_op.cpp"]
    # (the C++ standard is left to torch: its recent headers need C++20.) -fopenmp-simd honours
    # the CPU kernels' `omp simd` loops and links no OpenMP runtime; -fno-trapping-math lets the
    # ReLU masks (float compares) become vector selects. Neither changes a computed value.
    cxx_flags = ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
    define_macros = []
    build_cuda, why_not = False, ""
    if want_cuda != "0":
        cuda_home = _find_cuda_home()
        if torch.version.cuda is None:
            why_not = f"torch {torch.__version__} is a CPU-only build"
        elif cuda_home is None:
            why_not = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
        else:
            build_cuda = True
            os.environ["CUDA_HOME"] = cuda_home
    if want_cuda == "1" and not build_cuda:
        raise SystemExit(f"RGA_KERNELS_BUILD_CUDA=1 but the CUDA part cannot be built: {why_not}")

    if not build_cuda:
        if want_cuda == "0":
            why_not = "RGA_KERNELS_BUILD_CUDA=0"
        _log(f"building the CPU part only ({why_not})")
        ext = CppExtension("rga_kernels._C", sources, extra_compile_args={"cxx": cxx_flags},
                           define_macros=define_macros)
    else:
        import torch.utils.cpp_extension as cpp_ext
        from torch.utils.cpp_extension import CUDAExtension

        cpp_ext.CUDA_HOME = os.environ["CUDA_HOME"]  # the module caches it at import
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        _log(f"building the CPU and CUDA parts (CUDA_HOME={os.environ['CUDA_HOME']}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPUs>')})")
        sources += ["csrc/relation_cuda.cu", "csrc/branch_cuda.cu"]
        ext = CUDAExtension(
            "rga_kernels._C",
            sources,
            include_dirs=_nvidia_wheel_includes(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            define_macros=define_macros,
        )
    ext.depends = [os.path.join("csrc", f) for f in ("relation.h", "branch.h", "branch_ops.h", "branch_op.h")]
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
