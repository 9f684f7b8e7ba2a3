"""The one interface module: custom-op registrations, fake kernels, autograd, dispatch.

Ops in the ``rga_kernels`` torch.library namespace:

* ``rga_kernels::relation_fwd(theta, phi, weight) -> (out, p, q)`` and
  ``rga_kernels::relation_bwd(grad_out, theta, phi, weight, p, q) -> (dtheta, dphi, dweight)``:
  the C++ extension (``csrc/``), CPU and CUDA implementations. Fake kernels and the autograd
  formula are registered here.
* ``rga_kernels::relation_fwd_triton`` / ``rga_kernels::relation_bwd_triton``: the Triton kernels
  (``rga_kernels/_triton.py``) as ``torch.library.triton_op``.

``p = A·phiᵀ`` and ``q = B·thetaᵀ`` are the small products the backward reuses (the gradient
formulas in csrc/relation.h); they are returned by the forward ops, each op in the layout its own
backward reads (the Triton ops as (B, M, d), the C++ ops transposed, (B, d, M)), and hidden by
:func:`relation_embed`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

import torch
from torch import Tensor

from .reference import relation_embed_backward_factorized, relation_embed_factorized, relation_embed_reference

BACKENDS = ("reference", "torch", "cpp", "cuda", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# ---------------------------------------------------------------------------------------------
# The C++ extension, loaded in a guarded way: a missing or broken build is reported, not raised.
# ---------------------------------------------------------------------------------------------


def _load_extension() -> tuple[bool, str]:
    try:
        importlib.import_module("rga_kernels._C")
    except ImportError as exc:
        if "No module named" in str(exc):
            return False, ("the C++ extension rga_kernels._C is not built; `pip install -e .` "
                           "builds it (it was skipped if RGA_KERNELS_BUILD_EXT=0)")
        return False, (f"the C++ extension failed to load ({exc}); it was probably built "
                       f"against another torch than {torch.__version__}: rebuild with "
                       "`pip install -e . --no-build-isolation`")
    except OSError as exc:
        return False, f"the C++ extension failed to load: {exc}"
    return True, ""


_EXT_OK, _EXT_REASON = _load_extension()


def _ext_has_cuda() -> bool:
    if not _EXT_OK:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("rga_kernels::relation_fwd", "CUDA"))
    except Exception:  # private API: be conservative if it ever moves
        return False


def _fake_fwd(theta: Tensor, phi: Tensor, weight: Tensor, acc_dtype: bool = False):
    """Shapes of (out, p, q). p and q are in the input dtype (C++ ops), or with ``acc_dtype`` in the
    accumulation dtype, float32 for fp16/bf16 inputs (the Triton kernels)."""
    torch._check(theta.dim() == 3 and theta.shape == phi.shape, lambda: "theta and phi must be (B, d, n)")
    torch._check(weight.dim() == 2 and weight.shape[1] == 2 * theta.shape[2], lambda: "weight must be (M, 2n)")
    dtype = theta.dtype
    if acc_dtype and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    B, d, n = theta.shape
    M = weight.shape[0]
    out = theta.new_empty((B, M, n))
    if acc_dtype:  # Triton: p, q (B, M, d)
        return out, theta.new_empty((B, M, d), dtype=dtype), theta.new_empty((B, M, d), dtype=dtype)
    # C++: their transposes p^T, q^T (B, d, M)
    return out, theta.new_empty((B, d, M), dtype=dtype), theta.new_empty((B, d, M), dtype=dtype)


def _fake_fwd_triton(theta: Tensor, phi: Tensor, weight: Tensor):
    return _fake_fwd(theta, phi, weight, acc_dtype=True)


def _fake_bwd(grad_out, theta, phi, weight, p, q):
    return (torch.empty_like(theta, memory_format=torch.contiguous_format),
            torch.empty_like(phi, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    theta, phi, weight = inputs
    _, p, q = output
    ctx.save_for_backward(theta, phi, weight, p, q)
    ctx.mark_non_differentiable(p, q)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the unused p, q outputs


def _make_backward(bwd_op: Callable):
    def backward(ctx, grad_out, _grad_p, _grad_q):
        theta, phi, weight, p, q = ctx.saved_tensors
        if grad_out is None:
            return None, None, None
        if torch.is_grad_enabled():
            # backward(create_graph=True): the kernels' backward has no derivative of its own, so
            # the gradients are built from differentiable ops (same formulas, exact double backward)
            dtheta, dphi, dweight = relation_embed_backward_factorized(
                grad_out.to(theta.dtype), theta, phi, weight)
        else:
            dtheta, dphi, dweight = bwd_op(grad_out, theta, phi, weight, p, q)
        need = ctx.needs_input_grad
        return (dtheta if need[0] else None, dphi if need[1] else None,
                dweight if need[2] else None)

    return backward


if _EXT_OK:
    torch.library.register_fake("rga_kernels::relation_fwd")(_fake_fwd)
    torch.library.register_fake("rga_kernels::relation_bwd")(_fake_bwd)
    torch.library.register_autograd(
        "rga_kernels::relation_fwd",
        _make_backward(torch.ops.rga_kernels.relation_bwd.default),
        setup_context=_setup_context,
    )

# ---------------------------------------------------------------------------------------------
# Triton: the kernels module is imported lazily, on first use, so that TRITON_INTERPRET set by
# the user (or the tests) after `import rga_kernels` still takes effect.
# ---------------------------------------------------------------------------------------------

_TRITON_SPEC = importlib.util.find_spec("triton") is not None


def _triton_module():
    from . import _triton

    return _triton


def _triton_status(device: torch.device | None = None) -> tuple[bool, str]:
    if not _TRITON_SPEC:
        return False, "triton is not installed (it comes with CUDA builds of torch on Linux)"
    try:
        mod = _triton_module()
    except Exception as exc:  # a broken triton install must not break the package
        return False, f"the Triton kernels failed to import: {exc}"
    if not getattr(mod, "TRITON_AVAILABLE", False):
        return False, getattr(mod, "TRITON_UNAVAILABLE_REASON", "triton is unavailable")
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return mod.usable_on(device)


_TRITON_REGISTERED = False
if _TRITON_SPEC and hasattr(torch.library, "triton_op"):

    @torch.library.triton_op("rga_kernels::relation_fwd_triton", mutates_args=())
    def _relation_fwd_triton(theta: Tensor, phi: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return _triton_module().relation_fwd(theta, phi, weight)

    @torch.library.triton_op("rga_kernels::relation_bwd_triton", mutates_args=())
    def _relation_bwd_triton(grad_out: Tensor, theta: Tensor, phi: Tensor, weight: Tensor,
                             p: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return _triton_module().relation_bwd(grad_out, theta, phi, weight, p, q)

    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        # Under the interpreter, tracing the op's body on fake tensors would execute the kernels
        # on them: give shape propagation explicit fake kernels instead. On GPUs triton_op's own
        # fake (the body, with wrap_triton recording the launches) is kept.
        _relation_fwd_triton.register_fake(_fake_fwd_triton)
        _relation_bwd_triton.register_fake(_fake_bwd)
    _relation_fwd_triton.register_autograd(_make_backward(_relation_bwd_triton), setup_context=_setup_context)
    _TRITON_REGISTERED = True

# ---------------------------------------------------------------------------------------------
# Backend table and the public function.
# ---------------------------------------------------------------------------------------------


def backend_status(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """For each backend: (available, why not). ``device`` narrows it to one device type."""
    dev = None if device is None else torch.device(device)
    cuda_ok = torch.cuda.is_available()
    status: dict[str, tuple[bool, str]] = {"reference": (True, ""), "torch": (True, "")}
    if dev is not None and dev.type not in ("cpu", "cuda"):
        return {**status, **{b: (False, f"no {b} kernel for device {dev.type}") for b in ("cpp", "cuda", "triton")}}
    if not _EXT_OK:
        status["cpp"] = (False, _EXT_REASON)
    elif dev is not None and dev.type != "cpu":
        status["cpp"] = (False, "the cpp backend runs on CPU tensors; use 'cuda' or 'triton' for CUDA tensors")
    else:
        status["cpp"] = (True, "")
    if not _EXT_OK:
        status["cuda"] = (False, _EXT_REASON)
    elif not _ext_has_cuda():
        status["cuda"] = (False, "the C++ extension was built without its CUDA part (CPU-only torch, no nvcc, "
                                 "or RGA_KERNELS_BUILD_CUDA=0)")
    elif not cuda_ok:
        status["cuda"] = (False, "the CUDA part is built, but no CUDA device is visible")
    elif dev is not None and dev.type != "cuda":
        status["cuda"] = (False, "the cuda backend runs on CUDA tensors; use 'cpp' for CPU tensors")
    else:
        status["cuda"] = (True, "")
    if not _TRITON_REGISTERED and _TRITON_SPEC:
        status["triton"] = (False, f"torch {torch.__version__} has no torch.library.triton_op")
    else:
        status["triton"] = _triton_status(dev)
    return status


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends this machine can run (for ``device``'s type, if given), in BACKENDS order."""
    status = backend_status(device)
    return [b for b in BACKENDS if status[b][0]]


# "auto" tries these in order; override with RGA_KERNELS_BACKEND. On CUDA, Triton comes first: an
# eager GPU step is launch-bound, and the Triton path runs the relation op in 2 launches forward and
# 3 backward where the cuBLAS-backed `cuda` op needs 14 ATen calls (tests/test_launches.py). Both
# are compiled and tested on the CPU; bench/gpu_check.sh measures them side by side on a GPU.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
GPU_DEFAULT_BACKEND = _AUTO_ORDER["cuda"][0]
_status_cache: dict[str, dict[str, tuple[bool, str]]] = {}


def _cached_status(device_type: str) -> dict[str, tuple[bool, str]]:
    if device_type not in _status_cache:
        _status_cache[device_type] = backend_status(torch.device(device_type))
    return _status_cache[device_type]


@torch.compiler.assume_constant_result
def _why_unavailable(device_type: str, backend: str) -> str:
    """"" when ``backend`` runs on ``device_type`` tensors, else the reason. A constant for
    torch.compile (evaluated once while tracing, never traced into)."""
    ok, why = _cached_status(device_type)[backend]
    return "" if ok else why


@torch.compiler.assume_constant_result
def _auto_backend(device_type: str) -> str:
    status = _cached_status(device_type)
    for name in _AUTO_ORDER.get(device_type, ("torch",)):
        if status[name][0]:
            return name
    return "torch"


def _is_exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def _resolve_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + BACKENDS}; got {type(backend).__name__}")
    source = f"backend {backend!r}"
    transformed = not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()
    if backend == "auto" and transformed:
        # torch.func transforms (vmap, grad, jacrev...): plain PyTorch ops, which they can transform
        # (RGA_KERNELS_BACKEND is a preference for the kernels: it does not apply here)
        return "torch"
    if backend == "auto" and os.environ.get("RGA_KERNELS_BACKEND", "auto") != "auto":
        backend = os.environ["RGA_KERNELS_BACKEND"]
        source = f"RGA_KERNELS_BACKEND={backend!r} (environment variable)"
    if backend == "auto" and _is_exporting():
        # torch.export: plain aten ops, so the exported program runs without this package.
        return "torch"
    if backend == "auto":
        return _auto_backend(device.type)
    if backend not in BACKENDS:
        raise ValueError(f"unknown {source}; expected 'auto' or one of {BACKENDS}")
    if transformed and backend not in ("reference", "torch"):
        raise ValueError(f"{source} cannot run under torch.func transforms (vmap, grad, jacrev, ...): its kernels "
                         "have no batching or functional autograd rule; use backend 'auto' or 'torch' there (plain "
                         "PyTorch ops, the same result)")
    why = _why_unavailable(device.type, backend)
    if why:
        raise ValueError(f"{source} is not available for {device.type} tensors on this machine: {why}. "
                         f"Available here: {available_backends(device)}")
    return backend


def _check_inputs(theta, phi, weight) -> None:
    for name, t in (("theta", theta), ("phi", phi), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"relation_embed: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"relation_embed: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if theta.dim() != 3:
        raise ValueError(f"relation_embed: theta must be (B, d, n), got shape {tuple(theta.shape)}")
    if phi.dim() != 3:
        raise ValueError(f"relation_embed: phi must be (B, d, n), got shape {tuple(phi.shape)}")
    if theta.shape != phi.shape:
        parts = [f"{ax} {a} vs {b}" for ax, a, b in zip("Bdn", theta.shape, phi.shape) if a != b]
        raise ValueError(f"relation_embed: theta {tuple(theta.shape)} and phi {tuple(phi.shape)} must have the same "
                         f"(B, d, n); mismatched: {', '.join(parts)}")
    B, d, n = theta.shape
    if weight.dim() != 2 or weight.shape[1] != 2 * n:
        raise ValueError(f"relation_embed: weight must be (M, 2n) = (M, {2 * n}) for n = {n} nodes, "
                         f"got shape {tuple(weight.shape)}")
    # (under torch.compile / export the batch stays symbolic: no Python comparison on it)
    if not torch.compiler.is_compiling() and min(B, d, n, weight.shape[0]) < 1:
        raise ValueError(f"relation_embed: empty input: theta/phi {tuple(theta.shape)}, weight {tuple(weight.shape)}; "
                         "B, d, n and M must all be >= 1")
    if not (theta.device == phi.device == weight.device):
        raise ValueError(f"relation_embed: tensors on different devices: theta {theta.device}, phi {phi.device}, "
                         f"weight {weight.device}")


def _impl_reference(theta, phi, weight):
    return relation_embed_reference(theta, phi, weight)


def _impl_torch(theta, phi, weight):
    return relation_embed_factorized(theta, phi, weight)


def _impl_cpp(theta, phi, weight):
    return torch.ops.rga_kernels.relation_fwd(theta, phi, weight)[0]


def _impl_triton(theta, phi, weight):
    return torch.ops.rga_kernels.relation_fwd_triton(theta, phi, weight)[0]


_IMPLS = {"reference": _impl_reference, "torch": _impl_torch, "cpp": _impl_cpp, "cuda": _impl_cpp,
          "triton": _impl_triton}


def relation_embed(theta: Tensor, phi: Tensor, weight: Tensor, backend: str = "auto") -> Tensor:
    """The RGA relation embedding without the n×n affinity matrix.

    Args:
        theta, phi: (B, d, n) embeddings of the n nodes (spatial positions or channels).
        weight: (M, 2n) weight of the 1x1 relation embedding; its first n columns act on the row
            R(i, :) of the affinity R = thetaᵀ·phi, the last n on the column R(:, i).
        backend: "auto" (the fastest available for the tensors' device; the RGA_KERNELS_BACKEND
            environment variable overrides it; under torch.export, "torch"), or one of "reference", "torch", "cpp", "cuda",
            "triton".

    Returns:
        (B, M, n): ``out[b, :, i] = weight @ [R_b(i, :), R_b(:, i)]``, in the inputs' dtype
        (or the autocast dtype inside an autocast region), with fp32 accumulation.
    """
    _check_inputs(theta, phi, weight)
    device_type = theta.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        name = _resolve_backend(backend, theta.device)
        theta, phi = theta.to(dtype), phi.to(dtype)
        if name != "triton":
            weight = weight.to(dtype)
        # else: the Triton kernels read an fp32 weight as it is (its tiles are rounded to the
        # autocast dtype in registers where they meet theta/phi), and its gradient comes out in
        # fp32: no cast launches forward or backward
        # The backends accumulate in fp32 themselves: autocast must not recast their inner GEMMs.
        with torch.autocast(device_type, enabled=False):
            return _IMPLS[name](theta, phi, weight)
    if not (theta.dtype == phi.dtype == weight.dtype):
        raise TypeError(f"relation_embed: dtypes differ: theta {theta.dtype}, phi {phi.dtype}, weight {weight.dtype} "
                        "(cast them to one dtype, or call inside torch.autocast)")
    name = _resolve_backend(backend, theta.device)
    return _IMPLS[name](theta, phi, weight)
