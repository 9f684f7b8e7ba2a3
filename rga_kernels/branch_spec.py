"""The description of an RGA branch for rga_kernels' fused kernels: its static shape, its
tensors, its running statistics, and a step of a chain of branches (see rga_kernels.branch)."""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

#: backends with a fused branch (the others run RGAModule's composite path)
FUSED_BRANCH_BACKENDS = ("cpp", "cuda", "triton")


class BranchSpec(NamedTuple):
    """The static shape of a branch (hashable; no tensors)."""

    groups: tuple  # channel counts of the embeddings in E, in order (θ, φ, g as present)
    theta: int  # index of θ in groups, or -1: θ is the raw input (embedding "none"); unused without relation
    phi: int  # likewise φ (== theta for the symmetric embedding)
    mean_group: int  # index of g (its channel mean is y's first channel), or -1 (w/o original)
    relation: bool
    batch_stats: bool  # BN with batch statistics (training, or track_running_stats=False)
    momentum: float  # 0.0 when the running statistics are not updated
    eps: float
    backend: str


class BranchParams(NamedTuple):
    """Tensors of one branch. ``emb_*`` are per embedding (θ, φ, g as present); BN tuples are
    (weight, bias); running statistics travel separately (BranchRunning)."""

    emb_weight: tuple  # conv weights (k_i, D, 1, 1)
    emb_bn_weight: tuple
    emb_bn_bias: tuple
    rel_weight: Optional[Tensor]  # conv weight of the relation embedding (M, 2n, 1, 1)
    rel_bn_weight: Optional[Tensor]
    rel_bn_bias: Optional[Tensor]
    w1: Tensor  # (h, width, 1, 1)
    h_bn_weight: Tensor
    h_bn_bias: Tensor
    w2: Tensor  # (1, h, 1, 1)
    l_bn_weight: Tensor
    l_bn_bias: Tensor


class BranchRunning(NamedTuple):
    """Running statistics (flat tensors updated in place), or None each when not tracked."""

    emb_mean: Optional[Tensor]
    emb_var: Optional[Tensor]
    rel_mean: Optional[Tensor]
    rel_var: Optional[Tensor]
    h_mean: Optional[Tensor]
    h_var: Optional[Tensor]
    l_mean: Optional[Tensor]
    l_var: Optional[Tensor]
    counters: tuple = ()  # num_batches_tracked tensors the branch's kernels increment (cpp/cuda)


class Step(NamedTuple):
    """One branch in a chain: its spec, its running statistics, and whether it runs on the
    transposed view of the chain's (B, C, n) tensor (the channel branch, whose nodes are channels)."""

    spec: BranchSpec
    running: BranchRunning
    transposed: bool


def flatten(p: BranchParams) -> tuple:
    """The tensors of p in one tuple (None where the branch has no relation embedding)."""
    return (*p.emb_weight, *p.emb_bn_weight, *p.emb_bn_bias, p.rel_weight, p.rel_bn_weight, p.rel_bn_bias,
            p.w1, p.h_bn_weight, p.h_bn_bias, p.w2, p.l_bn_weight, p.l_bn_bias)


def unflatten(spec: BranchSpec, flat) -> BranchParams:
    """The inverse of flatten."""
    g = len(spec.groups)
    return BranchParams(tuple(flat[:g]), tuple(flat[g:2 * g]), tuple(flat[2 * g:3 * g]), *flat[3 * g:])

