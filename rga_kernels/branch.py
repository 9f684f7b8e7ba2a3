"""RGA's branches (spatial, channel), from the input to the gated output, in a handful of launches.

The branch of RGA (paper Sec. 3.2/3.3) on a node-major input ``inp`` (B, D, n) — n nodes of D
features; the spatial branch's nodes are positions, the channel branch's are channels — is

    E  = W_e · inp                          θ, φ, g embeddings in one GEMM (K = their channels)
    Ê  = ReLU(BN(E))                        kernel bn_act_fwd (also mean over g's channels)
    Z  = W_rel · [R(i,:), R(:,i)]           the relation embedding without R (relation_fwd)
    y  = [mean(ĝ), ReLU(BN(Z))]             kernel bn_act_fwd, written behind the mean: no cat
    H  = W_1 · y                            GEMM
    a  = σ(BN(W_2 · ReLU(BN(H))))           kernels bn_stats + gate_fwd (the whole head)
    out = target · a                        a broadcast over target's channels

and its backward is the mirror image: gate_bwd, head_bwd, two convolution backwards, bn_act_bwd
twice and the relation op's backward. The GEMMs are those of the backend (cuBLAS / the CPU BLAS
through ATen for ``cpp`` and ``cuda``, Triton for ``triton``); the five kernels between them are
hand-written per backend (``csrc/branch.h``: one formula file for the C++ CPU and CUDA kernels;
``rga_kernels/_triton_branch.py``) with the semantics of ``branch_reference.py``.

BatchNorm semantics are nn.BatchNorm2d's: batch statistics in training (biased variance to
normalise, unbiased into the running variance, ``momentum``), running statistics in eval. The
caller (rga.modules.RGAModule) increments ``num_batches_tracked`` and falls back to its composite
path where this one does not apply (SyncBatchNorm and other BN subclasses, BNs with different
settings, ``affine=False``, ``momentum=None``, torch.compile / torch.export tracing).

A module's branches run as one chain (make_chain): one after the other, or two in parallel, as
one autograd node. On ``cpp`` and ``cuda`` the chain is one C++ op with its autograd in C++
(``csrc/chain_op.cpp`` over ``csrc/branch_op.cpp``): an eager step is host-bound. On ``triton``
it is a Python autograd.Function launching each kernel (``_branch_chain.py``, the commented
sequence). ``branch_spec.py`` holds the description of a branch.

Backward with ``create_graph=True`` (double backward, gradient penalties) recomputes the chain
with differentiable ops (the same math, batch statistics recomputed, the forward's running
statistics in eval mode) and differentiates that: exact, and slower.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .branch_spec import FUSED_BRANCH_BACKENDS, BranchParams, BranchRunning, BranchSpec, Step, flatten

__all__ = ["FUSED_BRANCH_BACKENDS", "BranchParams", "BranchRunning", "BranchSpec", "Step", "fused_branch",
           "fused_chain", "make_chain"]


def make_chain(steps: Sequence[Step], params: Sequence[BranchParams], parallel: bool = False):
    """A function ``run(x, target=None) -> (output, attention per step)`` running the branches on
    ``x`` (B, C, n) as one autograd node: one after the other, each gating the previous one's
    output (the first gates ``target``, default ``x``), or with ``parallel`` two from the same
    input, the second gating the first one's output. A step with ``transposed`` runs on the
    (B, n, C) view (the channel branch). The attentions are (B, 1, n) for a plain step and
    (B, C, 1) for a transposed one, detached.

    What does not change between calls (the parameter list, the description the C++ op reads)
    is prepared here once: RGAModule keeps the function in its plan. On ``cpp`` and ``cuda`` the
    whole chain, forward and backward, is one C++ op (rga_kernels::chain, csrc/chain_op.cpp);
    on ``triton`` it is _branch_chain._Chain. Under torch.autocast the GEMMs run in the autocast dtype
    (each step's input and weights cast once); the kernels accumulate statistics in float32.
    """
    steps, params = tuple(steps), tuple(params)
    if not steps or len(steps) > 2 or len(params) != len(steps):
        raise ValueError(f"a chain runs 1 or 2 steps with one BranchParams each, got {len(steps)} and {len(params)}")
    if parallel and len(steps) != 2:
        raise ValueError("a parallel chain runs exactly two steps")
    if all(st.spec.backend in ("cpp", "cuda") for st in steps):
        return _cpp_chain(steps, params, parallel)
    from ._branch_chain import _Chain

    flat, counts = [], []
    for p in params:
        f = flatten(p)
        flat += f
        counts.append(len(f))
    counts = tuple(counts)

    def run(x, target=None):
        if parallel and target is not None:
            raise ValueError("a parallel chain gates its own input: no target")
        cdt = _autocast_dtype(x)
        if cdt is None:
            res = _Chain.apply(steps, parallel, None, x, target, counts, *flat)
        else:
            with torch.autocast(x.device.type, enabled=False):
                res = _Chain.apply(steps, parallel, cdt, x, target, counts, *flat)
        return res[0], res[1:]

    return run


def _autocast_dtype(x: Tensor):
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) else None


def _cpp_chain(steps, params, parallel):
    """make_chain for cpp/cuda: one call of rga_kernels::chain with the arguments prepared."""
    meta, bn, flat, running, counters = [], [], [], [], []
    none = params[0].w1.new_empty(0)  # absent running statistics
    for st, p in zip(steps, params):
        s = st.spec
        meta += [int(st.transposed), int(s.relation), int(s.batch_stats), s.theta, s.phi, s.mean_group,
                 len(st.running.counters), len(s.groups), *s.groups]
        bn += [float(s.momentum), float(s.eps)]
        flat += [t for t in flatten(p) if t is not None]
        running += [none if r is None else r for r in st.running[:8]]
        counters += list(st.running.counters)
    op = torch.ops.rga_kernels.chain.default

    def run(x, target=None):
        if parallel and target is not None:
            raise ValueError("a parallel chain gates its own input: no target")
        cdt = _autocast_dtype(x)
        if cdt is None:
            out, attention = op(x, target, flat, running, counters, meta, bn, parallel, None)
        else:
            with torch.autocast(x.device.type, enabled=False):
                out, attention = op(x, target, flat, running, counters, meta, bn, parallel, cdt)
        return out, tuple(attention)

    return run


def fused_chain(steps: Sequence[Step], x: Tensor, params: Sequence[BranchParams], target: Optional[Tensor] = None,
                parallel: bool = False):
    """``make_chain(steps, params, parallel)(x, target)``: (output, attention per step)."""
    return make_chain(steps, params, parallel)(x, target)


def fused_branch(spec: BranchSpec, inp: Tensor, params: BranchParams, running: BranchRunning,
                 target: Optional[Tensor] = None):
    """Run one RGA branch on ``inp`` (B, D, n) and gate ``target`` (B, D', n; default ``inp``) with
    it: returns (target * a, a) with a (B, 1, n) the attention (detached). See fused_chain."""
    out, (a,) = fused_chain((Step(spec, running, False),), inp, (params,), target)
    return out, a
