"""Triton kernels of the fused RGA branch: branch_reference's five kernels, one launch each (the
@triton.jit bodies are in _triton_branch_kernels.py; their launches and this interface here).

Same signatures and semantics as ``rga_kernels.branch_reference`` (the oracle; read it first).
Each entry point of :class:`TritonKernels` is exactly one launch (one ``triton::<kernel>`` profiler
event, see rga_kernels.launches); tensors are only allocated with ``torch.empty`` (no launch), every
dtype conversion and stride happens inside the kernels.

Layout of the work:
* per-channel statistics (bn_act_fwd, bn_stats, bn_act_bwd): one program per channel, looping over
  the channel's B*n values; mean and variance by two passes (the mean, then the mean squared
  deviation), never E[x^2] - E[x]^2. The program then updates the running statistics (unbiased
  variance) and runs the apply pass.
* bn_act_fwd's mean group (whose values are not written, only their mean over channels): one more
  program handles all of its channels, with (channels x nodes) tiles: statistics per channel chunk,
  then the channel mean per node block (a reduction across channels that a per-channel grid cannot
  do without atomics and a zeroed buffer).
* gate_fwd: the logit's BatchNorm needs all B*n logits before the sigmoid. In training below
  GATE_SPLIT_WORK multiply-adds, a single program does it all (one launch); from there on a program
  per node block writes its logits and their partial statistics, and a second launch merges those
  (in the same order in every program) and applies the sigmoid. In evaluation (running
  statistics) the first launch applies the sigmoid itself.
* gate_bwd: a program per block of nodes; head_bwd: a program per hidden channel, each one
  recomputing the logit BatchNorm's two backward sums (cheap: 2*B*n values).

A program that re-reads what it wrote itself (gate_fwd's logits, the mean group's statistics)
does so after ``tl.debug_barrier()``: threads of one program see each other's global writes.

Precision: statistics and sums in float32 (float64 for float64 inputs); Python floats reach a
Triton kernel as float32, so eps and momentum travel as two float32 halves (hi + lo) summed in
the accumulation dtype.
"""
from __future__ import annotations

import struct

import torch

from . import _triton
from ._triton import TRITON_AVAILABLE, TRITON_UNAVAILABLE_REASON, tl, triton
from .branch_reference import acc_dtype

from ._triton_branch_kernels import BLOCK, GATE_SPLIT_WORK, TILE  # noqa: E402

if TRITON_AVAILABLE:
    from ._triton_branch_kernels import (  # noqa: E402
        _bn_act_bwd_kernel, _bn_act_fwd_kernel, _bn_stats_kernel, _gate_bwd_kernel, _gate_fwd_kernel,
        _gate_logits_kernel, _gate_norm_kernel, _head_bwd_kernel,
    )

    _TL = {torch.float32: tl.float32, torch.float64: tl.float64}  # the accumulation dtype, a constexpr

# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _launch(kernel, name, grid, *args, **meta):
    """One launch, as one ``triton::<name>`` profiler event (what rga_kernels.launches counts).

    The kernel is launched directly, not through torch.library.wrap_triton: the fused branch never
    runs under torch.compile / export tracing (RGAModule takes its composite path there), and the
    higher-order-op dispatch would only add host time to every launch."""
    if not TRITON_AVAILABLE:
        raise RuntimeError(TRITON_UNAVAILABLE_REASON)
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function("triton::" + name):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def _f32_pair(x: float):
    """x as two float32 values whose sum (in float64) is x to ~1e-14 relative."""
    hi = struct.unpack("f", struct.pack("f", float(x)))[0]
    return hi, float(x) - hi


def _vec(t):
    """A flat, unit-stride view of a per-channel parameter (a copy only if it is not one already)."""
    t = t.reshape(-1)
    return t if t.stride(0) == 1 or t.numel() <= 1 else t.contiguous()


def _tile(k: int):
    """(channels, nodes) block sizes of a (channels x nodes) tile of TILE elements."""
    kc = min(triton.next_power_of_2(max(k, 1)), 64)
    return kc, TILE // kc


class TritonKernels:
    """The fused branch's kernels for backend ``triton`` (the interface of branch._CppKernels)."""

    @staticmethod
    def bn_act_fwd(y, weight, bias, rm, rv, batch_stats, momentum, eps, groups, mean_group=-1, prefix=None):
        B, K, n = y.shape
        acc = acc_dtype(y.dtype)
        groups = [int(k) for k in groups]
        if len(groups) > 3 or sum(groups) != K or (prefix is not None and len(groups) != 1):
            raise ValueError(f"bn_act_fwd: groups {groups} for {K} channels (at most 3; a prefix needs one group)")
        P = 0 if prefix is None else prefix.shape[1]
        outs, slots = [], []
        for i, k in enumerate(groups):
            if i == mean_group:
                outs.append(y.new_empty(0))
                slots.append((y, 1))
            else:
                o = torch.empty((B, k + (P if i == 0 else 0), n), dtype=y.dtype, device=y.device)
                outs.append(o)
                slots.append((o, o.shape[1]))
        slots += [(y, 1)] * (3 - len(slots))
        bounds = [sum(groups[:i]) for i in (1, 2)]
        m_start, m_k = (sum(groups[:mean_group]), groups[mean_group]) if mean_group >= 0 else (K, 0)
        chmean = torch.empty((B, 1, n), dtype=y.dtype, device=y.device) if mean_group >= 0 else y.new_empty(0)
        mean = torch.empty(K, dtype=acc, device=y.device)
        invstd = torch.empty(K, dtype=acc, device=y.device)
        has_running = batch_stats and rm is not None
        pre = prefix if prefix is not None else y
        mc, mn = _tile(m_k)
        _launch(_bn_act_fwd_kernel, "_bn_act_fwd_kernel", (K - m_k + (mean_group >= 0),),
                y, *y.stride(), _vec(weight), _vec(bias), *((rm, rv) if rm is not None else (mean, invstd)),
                mean, invstd, slots[0][0], slots[1][0], slots[2][0], slots[0][1], slots[1][1], slots[2][1],
                *bounds, pre, *pre.stride(), P, chmean if mean_group >= 0 else y, m_start, m_k,
                n, B * n, *_f32_pair(eps), *_f32_pair(momentum),
                BATCH_STATS=bool(batch_stats), HAS_RUNNING=has_running, HAS_MEAN=int(mean_group >= 0),
                ACC=_TL[acc], BLOCK=BLOCK, MC=mc, MN=mn)
        return outs, mean, invstd, chmean

    @staticmethod
    def bn_stats(y, rm, rv, batch_stats, momentum, eps):
        B, K, n = y.shape
        acc = acc_dtype(y.dtype)
        mean = torch.empty(K, dtype=acc, device=y.device)
        invstd = torch.empty(K, dtype=acc, device=y.device)
        _launch(_bn_stats_kernel, "_bn_stats_kernel", (K,), y, *y.stride(),
                *((rm, rv) if rm is not None else (mean, invstd)), mean, invstd, n, B * n,
                *_f32_pair(eps), *_f32_pair(momentum), BATCH_STATS=bool(batch_stats),
                HAS_RUNNING=bool(batch_stats) and rm is not None, ACC=_TL[acc], BLOCK=BLOCK)
        return mean, invstd

    @staticmethod
    def bn_act_bwd(grad_outs, y, weight, bias, mean, invstd, batch_stats, grad_chmean, mean_group, groups):
        B, K, n = y.shape
        groups = [int(k) for k in groups]
        if len(groups) > 3 or sum(groups) != K:
            raise ValueError(f"bn_act_bwd: groups {groups} for {K} channels (at most 3)")
        slots, gi = [], 0
        for i, k in enumerate(groups):
            g, div = None, 1
            if i == mean_group:
                g, div = grad_chmean, k  # (B, 1, n): every channel of the group reads channel 0
            elif gi < len(grad_outs):
                g = grad_outs[gi]
                gi += 1
            if g is None:
                slots.append((y, 0, 0, 0, 1, 0))
            else:
                g = g if g.dtype == y.dtype else g.to(y.dtype)  # one pointer type for the three slots
                slots.append((g, g.stride(0), 0 if i == mean_group else g.stride(1), g.stride(2), div, 1))
        slots += [(y, 0, 0, 0, 1, 0)] * (3 - len(slots))
        bounds = [sum(groups[:i]) for i in (1, 2)]
        grad_y = torch.empty_like(y)  # y's layout (strides), as branch_reference
        grad_w = torch.empty(K, dtype=weight.dtype, device=y.device)
        grad_b = torch.empty(K, dtype=bias.dtype, device=y.device)
        _launch(_bn_act_bwd_kernel, "_bn_act_bwd_kernel", (K,), y, *y.stride(), _vec(weight), _vec(bias), mean,
                invstd, grad_y, *grad_y.stride(), grad_w, grad_b, *slots[0], *slots[1], *slots[2], *bounds, n, B * n,
                BATCH_STATS=bool(batch_stats), ACC=_TL[mean.dtype], BLOCK=BLOCK)
        return grad_y, grad_w, grad_b

    @staticmethod
    def gate_fwd(h, h_weight, h_bias, h_mean, h_invstd, w2, l_weight, l_bias, l_rm, l_rv, batch_stats, momentum,
                 eps):
        B, H, n = h.shape
        N = B * n
        acc = h_mean.dtype
        l_out = torch.empty((B, 1, n), dtype=h.dtype, device=h.device)
        l_acc = l_out if h.dtype == acc else torch.empty((B, 1, n), dtype=acc, device=h.device)
        l_mean = torch.empty(1, dtype=acc, device=h.device)
        l_invstd = torch.empty(1, dtype=acc, device=h.device)
        a = torch.empty((B, 1, n), dtype=h.dtype, device=h.device)
        w2 = w2.reshape(-1)
        hc, bn = _tile(H)
        head = (h, *h.stride(), _vec(h_weight), _vec(h_bias), h_mean, h_invstd, w2, w2.stride(0), _vec(l_weight),
                _vec(l_bias), *((l_rm, l_rv) if l_rm is not None else (l_mean, l_invstd)))
        has_running = bool(batch_stats) and l_rm is not None
        if N == 0 or (batch_stats and N * H < GATE_SPLIT_WORK):  # small (or empty): one program, one launch
            _launch(_gate_fwd_kernel, "_gate_fwd_kernel", (1,), *head, l_out, l_acc, l_mean, l_invstd, a,
                    H, n, N, *_f32_pair(eps), *_f32_pair(momentum), BATCH_STATS=bool(batch_stats),
                    HAS_RUNNING=has_running,
                    ACC=_TL[acc], L_ACC=l_acc is not l_out, HC=hc, BN=bn)
            return a, l_out, l_mean, l_invstd
        # a program per block of nodes; in training a second launch merges the blocks' statistics
        bn = min(bn, max(16, triton.next_power_of_2(N)))
        P = triton.cdiv(N, bn)
        part = torch.empty(2 * P, dtype=acc, device=h.device) if batch_stats else l_mean  # (unused in eval)
        _launch(_gate_logits_kernel, "_gate_logits_kernel", (P,), *head, l_out, l_acc, part, P, l_mean, l_invstd,
                a, H, n, N, *_f32_pair(eps), BATCH_STATS=bool(batch_stats), ACC=_TL[acc],
                L_ACC=l_acc is not l_out, HC=hc, BN=bn)
        if batch_stats:
            _launch(_gate_norm_kernel, "_gate_norm_kernel", (triton.cdiv(N, BLOCK),), part, P, bn, l_acc,
                    *head[10:14], l_mean, l_invstd, a, N, *_f32_pair(eps),
                    *_f32_pair(momentum), HAS_RUNNING=has_running, ACC=_TL[acc], BP=BLOCK, BN=BLOCK)
        return a, l_out, l_mean, l_invstd

    @staticmethod
    def gate_bwd(grad_out, target, a):
        B, C, n = target.shape
        grad_target = torch.empty_like(target)
        grad_s = torch.empty((B, 1, n), dtype=a.dtype, device=a.device)
        cc, bn = _tile(C)
        bn = min(bn, max(16, triton.next_power_of_2(B * n)))
        _launch(_gate_bwd_kernel, "_gate_bwd_kernel", (triton.cdiv(B * n, bn),), grad_out, *grad_out.stride(),
                target, *target.stride(), a, a.stride(0), a.stride(2), grad_target, *grad_target.stride(), grad_s,
                C, n, B * n, ACC=_TL[acc_dtype(a.dtype)], CC=cc, BN=bn)
        return grad_target, grad_s

    @staticmethod
    def head_bwd(grad_s, l, l_weight, l_mean, l_invstd, h, h_weight, h_bias, h_mean, h_invstd, w2, batch_stats):
        B, H, n = h.shape
        dev = h.device
        grad_h = torch.empty_like(h)  # h's layout, as branch_reference
        grad_w2 = torch.empty(H, dtype=w2.dtype, device=dev)
        grad_hw = torch.empty(H, dtype=h_weight.dtype, device=dev)
        grad_hb = torch.empty(H, dtype=h_weight.dtype, device=dev)
        grad_lw = torch.empty(1, dtype=l_weight.dtype, device=dev)
        grad_lb = torch.empty(1, dtype=l_weight.dtype, device=dev)
        w2f = w2.reshape(-1)
        _launch(_head_bwd_kernel, "_head_bwd_kernel", (H,), grad_s, grad_s.stride(0), grad_s.stride(2), l,
                l.stride(0), l.stride(2), _vec(l_weight), l_mean, l_invstd, h, *h.stride(), _vec(h_weight),
                _vec(h_bias), h_mean, h_invstd, w2f, w2f.stride(0), grad_h, *grad_h.stride(), grad_w2, grad_hw,
                grad_hb, grad_lw, grad_lb, n, B * n, BATCH_STATS=bool(batch_stats), ACC=_TL[h_mean.dtype],
                BLOCK=BLOCK)
        return grad_h, grad_w2, grad_hw, grad_hb, grad_lw, grad_lb

    @staticmethod
    def relation_fwd(theta, phi, weight):
        return _triton.relation_fwd(theta, phi, weight)

    @staticmethod
    def relation_bwd(grad, theta, phi, weight, p, q):
        return _triton.relation_bwd(grad, theta, phi, weight, p, q)
