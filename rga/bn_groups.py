"""BatchNorm helpers of RGAModule's composite fused path (rga.modules).

On a GPU an eager RGA step is bound by the number of operator launches, so the composite path
(and the parameters the fused kernels read) keeps bookkeeping ops out of the step: the running
statistics of the BNs that are normalised together (θ, φ and g of a branch) are views into one
flat buffer ("tied"), which one batch_norm call updates in place; the embedding weights and BN
affine parameters live side by side in one storage, which the kernels read as one matrix; in
eval mode a BN is folded into the weight of the GEMM that produces its input.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

def _bn_uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


def _plain_bn(bn) -> bool:
    """A BatchNorm2d whose forward the fused path may replace by F.batch_norm (not a subclass such
    as SyncBatchNorm, which must run its own forward)."""
    return type(bn) is nn.BatchNorm2d


def _same_config(bns: Sequence[nn.BatchNorm2d]) -> bool:
    b0 = bns[0]
    return all(
        (b.training, b.momentum, b.eps, b.affine, b.track_running_stats)
        == (b0.training, b0.momentum, b0.eps, b0.affine, b0.track_running_stats)
        for b in bns
    )


def _momentum_factor(bn: nn.BatchNorm2d) -> float:
    """exponential_average_factor of nn.BatchNorm (num_batches_tracked already incremented)."""
    if not (bn.training and bn.track_running_stats):
        return 0.0
    if bn.momentum is None:  # cumulative moving average
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def _flat_base(tensors: Sequence[torch.Tensor]):
    """The 1-D tensor of which ``tensors`` are consecutive whole pieces, in order, or None."""
    base = tensors[0]._base
    if base is None or base.dim() != 1:
        return None
    offset = base.storage_offset()
    for t in tensors:
        if t._base is not base or t.dim() != 1 or t.storage_offset() != offset or t.stride(0) != 1:
            return None
        offset += t.numel()
    return base if offset == base.storage_offset() + base.numel() else None


def _tie_running_stats(bns: Sequence[nn.BatchNorm2d]) -> None:
    """Make the running_mean / running_var buffers of ``bns`` views of one flat buffer each."""
    if len(bns) < 2 or not all(_plain_bn(b) and b.track_running_stats and b.running_mean is not None
                               for b in bns):
        return
    for name in ("running_mean", "running_var"):
        parts = [getattr(b, name) for b in bns]
        if _flat_base(parts) is not None:
            continue
        if len({(p.device, p.dtype) for p in parts}) != 1:
            return
        flat = torch.cat([p.detach() for p in parts])
        for b, piece in zip(bns, flat.split([p.numel() for p in parts])):
            b._buffers[name] = piece


def _tie_parameters(params: Sequence[torch.Tensor]) -> None:
    """Put the parameters side by side in one storage (their .data become views of it), so the
    fused kernels read them as one matrix without a concatenation per step. Each stays its own
    Parameter (own gradient, own optimizer state); a copy or reassignment that separates them
    again only costs the kernels one concatenation."""
    params = [p for p in params if p is not None]
    if len(params) < 2 or len({(p.device, p.dtype) for p in params}) != 1:
        return
    if not all(type(p) is nn.Parameter for p in params):
        return  # someone else's tensors (torch.func.functional_call, a DataParallel replica): leave them be
    ptr, size = params[0].data_ptr(), params[0].element_size()
    adjacent = True
    for p in params:
        if not p.is_contiguous() or p.data_ptr() != ptr:
            adjacent = False
            break
        ptr += p.numel() * size
    if adjacent:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()


def _batch_norm(y: torch.Tensor, bn: nn.BatchNorm2d, counted: bool = False) -> torch.Tensor:
    """nn.BatchNorm's forward on a (B, k, L) tensor (same statistics as BatchNorm2d on (B, k, H, W)).

    counted: num_batches_tracked was already incremented for this call (see RGAModule._count_batches).
    """
    if not _plain_bn(bn):  # e.g. SyncBatchNorm after convert_sync_batchnorm: its own forward
        return bn(y.unsqueeze(-1)).squeeze(-1)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None and not counted:
        bn.num_batches_tracked.add_(1)
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(
        y, bn.running_mean if track else None, bn.running_var if track else None,
        bn.weight, bn.bias, _bn_uses_batch_stats(bn), _momentum_factor(bn), bn.eps,
    )


def _batch_norm_group(y: torch.Tensor, bns: Sequence[nn.BatchNorm2d], counted: bool = False) -> torch.Tensor:
    """Batch norm of (B, sum k_i, L) by the modules ``bns`` (channel blocks in order), one pass."""
    if len(bns) == 1:
        return _batch_norm(y, bns[0], counted)
    b0 = bns[0]
    if not (all(_plain_bn(b) for b in bns) and _same_config(bns) and b0.affine and b0.track_running_stats):
        sizes = [b.num_features for b in bns]
        return torch.cat([_batch_norm(part, b, counted) for part, b in zip(y.split(sizes, 1), bns)], 1)
    if b0.training and not counted:
        for b in bns:
            b.num_batches_tracked.add_(1)
    running_mean = None if torch.compiler.is_compiling() else _flat_base([b.running_mean for b in bns])
    running_var = None if running_mean is None else _flat_base([b.running_var for b in bns])
    gamma_beta = torch.cat([b.weight for b in bns] + [b.bias for b in bns])
    gamma, beta = gamma_beta.chunk(2)
    if running_var is not None:  # tied buffers: batch_norm updates every module's statistics in place
        return F.batch_norm(y, running_mean, running_var, gamma, beta, b0.training, _momentum_factor(b0), b0.eps)
    # untied (buffers replaced from outside, or under torch.compile): concatenate and write back
    sizes = [b.num_features for b in bns]
    running_mean = torch.cat([b.running_mean for b in bns])
    running_var = torch.cat([b.running_var for b in bns])
    out = F.batch_norm(y, running_mean, running_var, gamma, beta, b0.training, _momentum_factor(b0), b0.eps)
    if b0.training:
        with torch.no_grad():
            for b, m, v in zip(bns, running_mean.split(sizes), running_var.split(sizes)):
                b.running_mean.copy_(m)
                b.running_var.copy_(v)
    return out


def _gemm(weight: torch.Tensor, inp: torch.Tensor, training: bool) -> torch.Tensor:
    """weight (k, D) applied to every sample of inp (B, D, n) -> (B, k, n).

    In training (a backward ahead): a 1x1 convolution, one op forward and one (convolution_backward, both
    gradients) backward, where a matmul with a broadcast weight costs a GEMM per gradient plus a
    batch reduction. In eval mode (inference): a GEMM, which the CPU runs about 1.5-3x faster
    than the equivalent convolution (torch.matmul folds the batch into one GEMM when inp's
    transpose is contiguous, the channel branch's view; otherwise a batched GEMM with a
    broadcast weight reads inp without copying it).
    """
    if training:  # by the module's mode, not by grad mode: eager and compiled runs take one path
        return F.conv1d(inp, weight.unsqueeze(-1))
    if inp.mT.is_contiguous():
        return torch.matmul(weight, inp)
    return torch.bmm(weight.expand(inp.shape[0], *weight.shape), inp)


def _linear_bn(weight: torch.Tensor, bns: Sequence[nn.BatchNorm2d], apply, counted: bool = False) -> torch.Tensor:
    """BN(apply(weight)) where ``apply`` is linear in ``weight`` (rows = output channels).

    With batch statistics: one batch_norm call over the group. With running statistics (eval): the
    affine BN is folded into the weight rows and a bias, so no separate normalisation pass.
    """
    if any(_bn_uses_batch_stats(b) or not _plain_bn(b) for b in bns) or not all(b.affine for b in bns):
        return _batch_norm_group(apply(weight), bns, counted)
    scale = torch.cat([b.weight * torch.rsqrt(b.running_var + b.eps) for b in bns])
    shift = torch.cat([b.bias for b in bns]) - torch.cat([b.running_mean for b in bns]) * scale
    return apply(weight * scale.unsqueeze(1)) + shift.unsqueeze(1)


def _untie_state_dict(module, state_dict, prefix, local_metadata):
    """state_dict() hands out independent tensors: the tied running statistics are views of one
    buffer, which some savers (safetensors) refuse."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and value._base is not None:
            state_dict[key] = value.clone()
    return state_dict
