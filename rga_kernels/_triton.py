"""Triton kernels for the factorized relation embedding (the identity Z = (A φᵀ) θ + (B θᵀ) φ).

Shapes: theta, phi (B, d, n); weight (M, 2n) = [A | Bw] with A = weight[:, :n], Bw = weight[:, n:].

Forward (2 launches):
    P = A φᵀ, Q = Bw θᵀ                       (B, M, d), kept in fp32 (fp64 for fp64 input)
    out = P θ + Q φ                           (B, M, n), in the input dtype
Backward, with G = ∂L/∂out (3 launches):
    U = G θᵀ, V = G φᵀ                        (B, M, d)
    dθ = Pᵀ G + Vᵀ Bw,  dφ = Qᵀ G + Uᵀ A      (B, d, n)
    dA = Σ_b U φ,  dBw = Σ_b V θ              (M, n) each, written into dweight = [dA | dBw]

No n×n (or B×n×n) buffer exists anywhere.

All five launches go through ONE kernel, `_bmm2x2_kernel`, a batched GEMM that computes up to two
outputs, each the sum of up to two products, over arbitrary strides:

    O1[b] = X11[b] @ Y11[b]  (+ X12[b] @ Y12[b])
    O2[b] = X21[b] @ Y21[b]  (+ X22[b] @ Y22[b])      (when NUM_OUT == 2)

with every operand an (R, C) matrix described by (base pointer, element offset, batch stride, row
stride, column stride). A transpose is a swap of the two strides, a batch-shared matrix (the weight)
has batch stride 0, and A / Bw are the weight with column offset 0 / n. So no input is ever copied,
non-contiguous and expanded inputs (stride 0) are read in place, and views are never passed to the
kernel (only whole tensors plus integer offsets, which keeps torch.compile's tracing simple).
With REDUCE_BATCH the kernel also sums over the batch inside each program (each program owns one
output tile and loops over batch and K), which gives dA / dBw without atomics.

Precision: the tiles of X are cast to the dtype of Y before tl.dot (the intermediates P, Q, U, V are
fp32, the inputs may be fp16/bf16: like PyTorch, the second GEMM consumes them in the input dtype);
accumulation is fp32, or fp64 for fp64 inputs. fp32 operands use tl.dot(input_precision="tf32x3")
(close to fp32 accuracy on tensor cores), or plain TF32 when torch.backends.cuda.matmul.allow_tf32 is
set; see _dot_precision.

Launch configuration: on GPU, triton.autotune over a handful of tiles (keyed on the problem sizes and
the launch kind; RGA_TRITON_AUTOTUNE=0 at import time pins one config instead). fp64 always uses one
small config. Under the interpreter there is no autotuning: block sizes follow the problem sizes.

On CPU tensors the kernels only run under TRITON_INTERPRET=1, which must be set before this module is
imported (it is read at import time and decides how the kernels are decorated).
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import NamedTuple

import torch

_TRUTHY = ("1", "true", "yes", "on")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUTHY


def autotune_enabled() -> bool:
    """RGA_TRITON_AUTOTUNE=0: one fixed config on GPU instead of benchmarking several per problem
    size (first calls get faster, e.g. in test runs; steady-state speed may be lower). Read at
    every launch, so it can be set any time before the first kernel call."""
    return os.environ.get("RGA_TRITON_AUTOTUNE", "1").strip().lower() in _TRUTHY


AUTOTUNE = autotune_enabled()  # the setting at import time, kept for callers that read it

TRITON_AVAILABLE = False
TRITON_UNAVAILABLE_REASON = ""
try:
    import triton
    import triton.language as tl
    import triton.testing

    TRITON_AVAILABLE = True
except Exception as exc:  # ImportError, or a broken install failing at import
    triton = None
    tl = None
    TRITON_UNAVAILABLE_REASON = f"triton could not be imported: {type(exc).__name__}: {exc}"

__all__ = [
    "relation_fwd",
    "relation_bwd",
    "usable_on",
    "TRITON_AVAILABLE",
    "TRITON_UNAVAILABLE_REASON",
    "INTERPRET",
    "AUTOTUNE",
]


def usable_on(device) -> tuple[bool, str]:
    """Whether relation_fwd / relation_bwd can run on tensors of `device`, and if not, why."""
    if not TRITON_AVAILABLE:
        return False, TRITON_UNAVAILABLE_REASON
    device = torch.device(device)
    if device.type == "cuda":
        if INTERPRET:
            return True, ""
        if not torch.cuda.is_available():
            return False, "no CUDA device is available to torch"
        return True, ""
    if device.type == "cpu":
        if INTERPRET:
            return True, ""
        return False, (
            "the Triton kernels need a CUDA device; on CPU they only run under the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing rga_kernels._triton; slow, for testing)"
        )
    return False, f"the Triton kernels do not support device type {device.type!r}"


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------
if TRITON_AVAILABLE:

    @triton.jit
    def _tile_ptrs(ptr, off, b, s_b, s_r, s_c, r_idx, c_idx):
        """Pointers to elements (r_idx, c_idx) of matrix b of a strided operand (64-bit offsets)."""
        base = ptr + off + tl.cast(b, tl.int64) * s_b
        return base + r_idx[:, None].to(tl.int64) * s_r + c_idx[None, :].to(tl.int64) * s_c

    @triton.jit
    def _bmm2x2_kernel(
        # output 1 and its terms: O1 = X11 @ Y11 (+ X12 @ Y12); each operand: ptr, offset, 3 strides
        o1, o1_off, o1_sb, o1_sr, o1_sc,
        x11, x11_off, x11_sb, x11_sr, x11_sc,
        y11, y11_off, y11_sb, y11_sr, y11_sc,
        x12, x12_off, x12_sb, x12_sr, x12_sc,
        y12, y12_off, y12_sb, y12_sr, y12_sc,
        # output 2 and its terms (ignored unless NUM_OUT == 2)
        o2, o2_off, o2_sb, o2_sr, o2_sc,
        x21, x21_off, x21_sb, x21_sr, x21_sc,
        y21, y21_off, y21_sb, y21_sr, y21_sc,
        x22, x22_off, x22_sb, x22_sr, x22_sc,
        y22, y22_off, y22_sb, y22_sr, y22_sc,
        # sizes: every output is (MM, NN), every product has inner size KK; NB batch entries
        MM, NN, KK, NB,
        # power-of-two buckets of MM, NN, KK: the autotuning key (not used by the body)
        MM_BUCKET, NN_BUCKET, KK_BUCKET,
        B_CHUNK,  # with REDUCE_BATCH: batch entries per program along grid axis 2
        NUM_OUT: tl.constexpr,  # 1 or 2
        NUM_TERMS: tl.constexpr,  # 1 or 2
        REDUCE_BATCH: tl.constexpr,  # sum over the batch in-kernel
        SPLIT_BATCH: tl.constexpr,  # with REDUCE_BATCH: grid axis 2 splits the batch, partial sums
        #                             are added atomically into a zeroed fp32 output
        ACC_FP64: tl.constexpr,  # fp64 accumulators (fp64 inputs)
        PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands ("ieee", "tf32x3", "tf32")
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # Helper calls are kept out of the K loop on purpose: each device-function call is expensive
        # under the interpreter. X tiles are cast to Y's dtype before tl.dot (fp32 intermediates
        # times input-dtype operands, as PyTorch would round them).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_b = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        row_ok = rows < MM
        col_ok = cols < NN

        # tl.dot's out_dtype must equal the accumulator's dtype (Triton 3.6 asserts it; its default
        # is float32, which breaks fp64 accumulation unless given explicitly)
        if ACC_FP64:
            ACC_DTYPE: tl.constexpr = tl.float64
        else:
            ACC_DTYPE: tl.constexpr = tl.float32
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)

        if REDUCE_BATCH:
            if SPLIT_BATCH:
                b_lo = pid_b * B_CHUNK
                b_hi = tl.minimum(b_lo + B_CHUNK, NB)
            else:
                b_lo = 0
                b_hi = NB
        else:
            b_lo = pid_b
            b_hi = pid_b + 1

        for b in range(b_lo, b_hi):
            # tiles at k0 = 0; X tiles are (rows, k), Y tiles are (k, cols)
            px11 = _tile_ptrs(x11, x11_off, b, x11_sb, x11_sr, x11_sc, rows, kk)
            py11 = _tile_ptrs(y11, y11_off, b, y11_sb, y11_sr, y11_sc, kk, cols)
            if NUM_TERMS == 2:
                px12 = _tile_ptrs(x12, x12_off, b, x12_sb, x12_sr, x12_sc, rows, kk)
                py12 = _tile_ptrs(y12, y12_off, b, y12_sb, y12_sr, y12_sc, kk, cols)
            if NUM_OUT == 2:
                px21 = _tile_ptrs(x21, x21_off, b, x21_sb, x21_sr, x21_sc, rows, kk)
                py21 = _tile_ptrs(y21, y21_off, b, y21_sb, y21_sr, y21_sc, kk, cols)
                if NUM_TERMS == 2:
                    px22 = _tile_ptrs(x22, x22_off, b, x22_sb, x22_sr, x22_sc, rows, kk)
                    py22 = _tile_ptrs(y22, y22_off, b, y22_sb, y22_sr, y22_sc, kk, cols)

            for k0 in range(0, KK, BLOCK_K):
                k_ok = (k0 + kk) < KK
                x_ok = row_ok[:, None] & k_ok[None, :]
                y_ok = k_ok[:, None] & col_ok[None, :]
                k64 = tl.cast(k0, tl.int64)

                x = tl.load(px11 + k64 * x11_sc, mask=x_ok, other=0.0)
                y = tl.load(py11 + k64 * y11_sr, mask=y_ok, other=0.0)
                acc1 = tl.dot(x.to(y.dtype), y, acc1, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                if NUM_TERMS == 2:
                    x = tl.load(px12 + k64 * x12_sc, mask=x_ok, other=0.0)
                    y = tl.load(py12 + k64 * y12_sr, mask=y_ok, other=0.0)
                    acc1 = tl.dot(x.to(y.dtype), y, acc1, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                if NUM_OUT == 2:
                    x = tl.load(px21 + k64 * x21_sc, mask=x_ok, other=0.0)
                    y = tl.load(py21 + k64 * y21_sr, mask=y_ok, other=0.0)
                    acc2 = tl.dot(x.to(y.dtype), y, acc2, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                    if NUM_TERMS == 2:
                        x = tl.load(px22 + k64 * x22_sc, mask=x_ok, other=0.0)
                        y = tl.load(py22 + k64 * y22_sr, mask=y_ok, other=0.0)
                        acc2 = tl.dot(x.to(y.dtype), y, acc2, input_precision=PRECISION, out_dtype=ACC_DTYPE)

        out_ok = row_ok[:, None] & col_ok[None, :]
        po1 = _tile_ptrs(o1, o1_off, pid_b, o1_sb, o1_sr, o1_sc, rows, cols)
        if SPLIT_BATCH:
            tl.atomic_add(po1, acc1.to(o1.dtype.element_ty), mask=out_ok)
        else:
            tl.store(po1, acc1.to(o1.dtype.element_ty), mask=out_ok)
        if NUM_OUT == 2:
            po2 = _tile_ptrs(o2, o2_off, pid_b, o2_sb, o2_sr, o2_sc, rows, cols)
            if SPLIT_BATCH:
                tl.atomic_add(po2, acc2.to(o2.dtype.element_ty), mask=out_ok)
            else:
                tl.store(po2, acc2.to(o2.dtype.element_ty), mask=out_ok)

    def _cfg(bm, bn, bk, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)

    if INTERPRET:
        # No autotuning under the interpreter: one config per launch, sized by _interpreter_blocks.
        _KERNEL = _KERNEL_FIXED = _KERNEL_FP64 = _bmm2x2_kernel
    else:
        # Output tiles are (M, d) / (M, n) / (d, n): d is 16-256 and M 16-256 at the ResNet-50 stage
        # shapes, n (and so K of the P/Q and U/V launches) up to 2048. Tiles of 16 serve d = 16 or
        # M = 16 without padding; BLOCK_K 64/128 shorten the long-K loops. A config that does not fit
        # a launch (shared memory: the dθ/dφ launch streams 4 X and 4 Y tiles per K step) fails to
        # launch and the autotuner skips it; (32, 64, 32) with 2 stages fits every launch in fp32.
        _CONFIGS_ALL = [
            _cfg(64, 64, 32, 4, 3),
            _cfg(64, 128, 32, 4, 3),
            _cfg(128, 64, 32, 4, 3),
            _cfg(128, 128, 32, 8, 2),
            _cfg(32, 128, 32, 4, 3),
            _cfg(64, 32, 64, 4, 3),
            _cfg(128, 32, 32, 4, 3),
            _cfg(32, 64, 32, 4, 2),
            _cfg(16, 64, 64, 4, 3),
            _cfg(64, 16, 64, 4, 3),
            _cfg(16, 128, 64, 4, 3),
            _cfg(128, 16, 64, 4, 3),
            _cfg(32, 32, 128, 4, 3),
            _cfg(64, 64, 64, 4, 3),
        ]

        def _prune(configs, named_args, **kwargs):
            """Drop tiles more than twice the problem in any dimension (they only compute padding);
            a launch is tuned over the rest, and always keeps at least one config."""
            limit = {k: max(16, 2 * triton.next_power_of_2(int(named_args[k]))) for k in ("MM", "NN", "KK")}
            kept = [c for c in configs if c.kwargs["BLOCK_M"] <= limit["MM"] and c.kwargs["BLOCK_N"] <= limit["NN"]
                    and c.kwargs["BLOCK_K"] <= limit["KK"]]
            return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

        _TUNE_KW = {}
        if "do_bench" in inspect.signature(triton.autotune).parameters:
            # shorter than the default 25 ms warm-up + 100 ms of timing per config
            _TUNE_KW["do_bench"] = functools.partial(triton.testing.do_bench, warmup=5, rep=25)
        # Keyed on size buckets, not exact sizes, and never on the batch: a new batch size or a
        # shape in the same power-of-two bucket reuses the tuned config.
        _KERNEL = triton.autotune(
            configs=_CONFIGS_ALL,
            key=["MM_BUCKET", "NN_BUCKET", "KK_BUCKET", "NUM_OUT", "NUM_TERMS", "REDUCE_BATCH", "SPLIT_BATCH",
                 "PRECISION"],
            prune_configs_by={"early_config_prune": _prune},
            **_TUNE_KW,
        )(_bmm2x2_kernel)
        _KERNEL_FIXED = triton.autotune(configs=[_cfg(64, 64, 32, 4, 2)], key=[])(_bmm2x2_kernel)
        # fp64 is for gradcheck, not speed: one small config that fits everywhere (no benchmarking).
        _KERNEL_FP64 = triton.autotune(configs=[_cfg(32, 32, 16, 4, 1)], key=[])(_bmm2x2_kernel)

# Tests only: when set to a triton.Config, every launch uses it (raw kernel, no autotuning).
_FORCED_CONFIG = None


def _launchable(kernel):
    """torch.library.wrap_triton(kernel), so torch.compile / triton_op can trace the launch.

    Older torch versions refuse the interpreter's kernel objects in wrap_triton; under the
    interpreter, nothing is traced anyway, so the kernel is then launched directly.
    """
    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:
        if INTERPRET:
            return kernel
        raise


class _Mat(NamedTuple):
    """An (R, C) matrix per batch entry: element (b, r, c) lives at t + off + b*sb + r*sr + c*sc."""

    t: torch.Tensor
    off: int
    sb: int
    sr: int
    sc: int

    def args(self):
        return (self.t, self.off, self.sb, self.sr, self.sc)


def _bat(t: torch.Tensor, transpose: bool = False) -> _Mat:
    """A (B, R, C) tensor as a batched matrix, optionally transposed to (B, C, R)."""
    s0, s1, s2 = t.stride()
    return _Mat(t, 0, s0, s2, s1) if transpose else _Mat(t, 0, s0, s1, s2)


def _shared(t: torch.Tensor, col_off: int) -> _Mat:
    """Columns [col_off, ...) of a 2-D tensor, the same matrix for every batch entry."""
    s0, s1 = t.stride()
    return _Mat(t, col_off * s1, 0, s0, s1)


def _gemm(out1, terms1, out2=None, terms2=None, *, MM, NN, KK, NB, reduce_batch=False, batch_chunk=0):
    """One launch of _bmm2x2_kernel: out_j = sum over (X, Y) in terms_j of X @ Y."""
    if not TRITON_AVAILABLE:
        raise RuntimeError(TRITON_UNAVAILABLE_REASON)
    num_out = 1 if out2 is None else 2
    num_terms = len(terms1)
    if out2 is None:  # unused slots: any valid operand, never dereferenced
        out2, terms2 = out1, terms1
    if num_terms == 1:
        terms1 = (terms1[0], terms1[0])
        terms2 = (terms2[0], terms2[0])
    args = []
    for m in (out1, *terms1[0], *terms1[1], out2, *terms2[0], *terms2[1]):
        args.extend(m.args())

    dtype = terms1[0][1].t.dtype  # the Y operands carry the input dtype
    acc_fp64 = dtype == torch.float64
    split = reduce_batch and 0 < batch_chunk < NB
    meta = dict(
        NUM_OUT=num_out,
        NUM_TERMS=num_terms,
        REDUCE_BATCH=reduce_batch,
        SPLIT_BATCH=split,
        ACC_FP64=acc_fp64,
        PRECISION=_dot_precision(dtype),
    )
    if INTERPRET:
        meta.update(_interpreter_blocks(MM, NN, KK))
    nb_grid = (triton.cdiv(NB, batch_chunk) if split else 1) if reduce_batch else NB

    def grid(m):
        return (triton.cdiv(MM, m["BLOCK_M"]), triton.cdiv(NN, m["BLOCK_N"]), nb_grid)

    # A split-batch launch accumulates atomically into its output, so it is not benchmarked (each
    # timing run would add to the result): it uses the fixed config.
    kernel = _KERNEL_FP64 if acc_fp64 else (_KERNEL if autotune_enabled() and not split else _KERNEL_FIXED)
    sizes = (MM, NN, KK, NB, triton.next_power_of_2(MM), triton.next_power_of_2(NN), triton.next_power_of_2(KK),
             max(batch_chunk, 1))
    if _FORCED_CONFIG is not None:
        kernel = _bmm2x2_kernel
        meta.update(_FORCED_CONFIG.kwargs, num_warps=_FORCED_CONFIG.num_warps, num_stages=_FORCED_CONFIG.num_stages)
    if torch.autograd.profiler._is_profiler_enabled and not torch.compiler.is_compiling():
        # a named profiler event per launch: rga_kernels.launches counts Triton launches with aten ops
        with torch.profiler.record_function("triton::_bmm2x2_kernel"):
            _launchable(kernel)[grid](*args, *sizes, **meta)
        return
    _launchable(kernel)[grid](*args, *sizes, **meta)


def _interpreter_blocks(MM, NN, KK):
    """Under the interpreter, a single config sized to the problem: its cost is (programs) x (loop
    steps) x (per-op overhead) plus the block-sized dots, so blocks cover a dimension up to 128
    (at least 16, tl.dot's minimum) and are not padded further."""

    def fit(x):
        return min(128, max(16, triton.next_power_of_2(x)))

    return dict(BLOCK_M=fit(MM), BLOCK_N=fit(NN), BLOCK_K=fit(KK))


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision. It only matters for fp32 operands; "ieee" is valid everywhere.

    fp32: "tf32" if torch.backends.cuda.matmul.allow_tf32 (the switch torch's own fp32 matmuls obey),
    else "tf32x3" (three TF32 tensor-core products, close to fp32 accuracy; IEEE fp32 dots run on
    the FMA units and spill registers at useful tile sizes). ROCm: "ieee" (no tf32x3 there).
    """
    if dtype == torch.float64 or INTERPRET or torch.version.hip is not None:
        return "ieee"
    if dtype != torch.float32:
        # fp16/bf16 launches: fp32 x fp32 dots only meet there with an fp32 weight under autocast,
        # whose precision is the autocast dtype's anyway
        return "tf32"
    if getattr(torch.backends.cuda.matmul, "allow_tf32", False):
        return "tf32"
    return "tf32x3"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# The two entry points
# ----------------------------------------------------------------------------------------------
def relation_fwd(theta, phi, weight):
    """theta, phi (B, d, n); weight (M, 2n) -> (out (B, M, n) in the input dtype, p, q (B, M, d) fp32).

    p = A φᵀ and q = Bw θᵀ are returned for the backward (fp64 for fp64 inputs).
    """
    B, d, n = theta.shape
    M = weight.shape[0]
    dev = theta.device
    p = torch.empty((B, M, d), device=dev, dtype=_acc_dtype(theta.dtype))
    q = torch.empty((B, M, d), device=dev, dtype=_acc_dtype(theta.dtype))
    # P = A @ φᵀ, Q = Bw @ θᵀ: (M, n) @ (n, d), one launch
    _gemm(
        _bat(p), [(_shared(weight, 0), _bat(phi, transpose=True))],
        _bat(q), [(_shared(weight, n), _bat(theta, transpose=True))],
        MM=M, NN=d, KK=n, NB=B,
    )
    # out = P @ θ + Q @ φ: (M, d) @ (d, n)
    out = torch.empty((B, M, n), device=dev, dtype=theta.dtype)
    _gemm(
        _bat(out), [(_bat(p), _bat(theta)), (_bat(q), _bat(phi))],
        MM=M, NN=n, KK=d, NB=B,
    )
    return out, p, q


def relation_bwd(grad_out, theta, phi, weight, p, q):
    """Gradients of relation_fwd's `out`: returns (dtheta, dphi, dweight) in the input dtypes/shapes."""
    B, d, n = theta.shape
    M = weight.shape[0]
    dev = theta.device
    acc = _acc_dtype(theta.dtype)
    g = _bat(grad_out)
    # U = G @ θᵀ, V = G @ φᵀ: (M, n) @ (n, d)
    u = torch.empty((B, M, d), device=dev, dtype=acc)
    v = torch.empty((B, M, d), device=dev, dtype=acc)
    _gemm(
        _bat(u), [(g, _bat(theta, transpose=True))],
        _bat(v), [(g, _bat(phi, transpose=True))],
        MM=M, NN=d, KK=n, NB=B,
    )
    # dθ = Pᵀ G + Vᵀ Bw, dφ = Qᵀ G + Uᵀ A: (d, M) @ (M, n)
    dtheta = torch.empty((B, d, n), device=dev, dtype=theta.dtype)
    dphi = torch.empty((B, d, n), device=dev, dtype=phi.dtype)
    _gemm(
        _bat(dtheta), [(_bat(p, transpose=True), g), (_bat(v, transpose=True), _shared(weight, n))],
        _bat(dphi), [(_bat(q, transpose=True), g), (_bat(u, transpose=True), _shared(weight, 0))],
        MM=d, NN=n, KK=M, NB=B,
    )
    # dA = Σ_b U @ φ, dBw = Σ_b V @ θ: (M, d) @ (d, n), batch reduced inside the kernel. When the
    # output has few tiles, the batch is also spread over the grid (fp32 atomics into a zeroed
    # buffer: one more launch, two when the weight is not fp32), see _batch_chunk.
    chunk = _batch_chunk(M, n, B)
    if chunk:
        dweight = torch.zeros((M, 2 * n), device=dev, dtype=torch.float64 if acc == torch.float64 else torch.float32)
    else:
        dweight = torch.empty((M, 2 * n), device=dev, dtype=weight.dtype)
    _gemm(
        _shared(dweight, 0), [(_bat(u), _bat(phi))],
        _shared(dweight, n), [(_bat(v), _bat(theta))],
        MM=M, NN=n, KK=d, NB=B, reduce_batch=True, batch_chunk=chunk,
    )
    return dtheta, dphi, dweight.to(weight.dtype)


# The dW launch owns one output tile per program; below this many tiles of 64x64 the GPU would be
# mostly idle while each program loops over the whole batch, so the batch is split over the grid.
SPLIT_BATCH_BELOW_TILES = 32
SPLIT_BATCH_MIN_CHUNK = 4


def _batch_chunk(M: int, n: int, B: int) -> int:
    """Batch entries per program of the dW launch, or 0 for no split (the whole batch in-kernel)."""
    if B < 2 * SPLIT_BATCH_MIN_CHUNK:
        return 0
    tiles = triton.cdiv(M, 64) * triton.cdiv(n, 64)
    if tiles >= SPLIT_BATCH_BELOW_TILES:
        return 0
    splits = min(triton.cdiv(SPLIT_BATCH_BELOW_TILES * 4, tiles), B // SPLIT_BATCH_MIN_CHUNK)
    return triton.cdiv(B, splits)
