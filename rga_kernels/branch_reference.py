"""The fused RGA branch's primitive kernels written in plain PyTorch: the oracle of every backend.

The fused branch (``rga_kernels.branch``) is a few GEMMs (cuBLAS / the CPU BLAS / Triton) and
five hand-written kernels between them. Each backend implements the five with exactly these
signatures and semantics (``csrc/branch.h`` for cpp and cuda, ``rga_kernels/_triton_branch.py`` for
triton); the tests compare each backend's kernels with these functions in float64.

Shapes: ``y`` is (B, K, n) — K channels, n nodes; statistics are over (B, n) per channel, as
nn.BatchNorm2d computes them on (B, K, H, W). Statistics (``mean``, ``invstd``) are in the
accumulation dtype: float32 for float16/bfloat16/float32 inputs, float64 for float64.

* ``bn_act_fwd(y, weight, bias, running_mean, running_var, batch_stats, momentum, eps, groups,
  mean_group, prefix) -> (outs, mean, invstd, chmean)``
  BatchNorm (batch statistics when ``batch_stats``, else the running ones) + ReLU. ``groups``
  splits the K channels into consecutive groups; ``outs[i]`` is group i's activation as its own
  contiguous (B, k_i, n) tensor, except group ``mean_group`` (>= 0), whose values are not written:
  only their mean over its channels, ``chmean`` (B, 1, n), is returned (``outs[i]`` is empty).
  With ``prefix`` (B, P, n) and a single group, ``outs[0]`` is (B, P + K, n) with ``prefix`` in its
  first P channels (the [mean(g), z] concatenation without a cat). With batch statistics and
  running buffers, the buffers are updated in place: ``(1 - momentum) * r + momentum * stat`` with
  the unbiased variance (nn.BatchNorm's rule).
* ``bn_stats(y, running_mean, running_var, batch_stats, momentum, eps) -> (mean, invstd)``: the
  statistics alone (and the running update).
* ``bn_act_bwd(grad_outs, y, weight, bias, mean, invstd, batch_stats, grad_chmean, mean_group,
  groups) -> (grad_y, grad_weight, grad_bias)``: the backward of ``bn_act_fwd``. ``grad_outs`` are
  the gradients of the written groups, in order (a missing trailing group, or the mean group, has
  no direct gradient); ``grad_chmean`` (B, 1, n) is the gradient of ``chmean``.
  ``grad_y`` has ``y``'s layout (strides), so a transposed ``y`` gets a transposed gradient.
* ``gate_fwd(h, h_weight, h_bias, h_mean, h_invstd, w2, l_weight, l_bias, l_running_mean,
  l_running_var, batch_stats, momentum, eps) -> (a, l, l_mean, l_invstd)``: the head of the
  attention MLP: ĥ = ReLU(BN_h(h)) (statistics given), the logit l = w2 · ĥ (B, 1, n), its
  BatchNorm (one channel, statistics computed here, running update) and the gate a = sigmoid(·).
* ``gate_bwd(grad_out, target, a) -> (grad_target, grad_s)``: the gating multiply
  ``out = target * a`` (a broadcast over target's channels) backward, through the sigmoid:
  ``grad_target = grad_out * a``, ``grad_s = sum_c(grad_out * target) * a * (1 - a)`` (B, 1, n).
* ``head_bwd(grad_s, l, l_weight, l_mean, l_invstd, h, h_weight, h_bias, h_mean, h_invstd, w2,
  batch_stats) -> (grad_h, grad_w2, grad_h_weight, grad_h_bias, grad_l_weight, grad_l_bias)``: the
  backward of ``gate_fwd`` from the gradient of the gate's pre-sigmoid value; ``grad_h`` has
  ``h``'s layout, ``grad_w2`` is (h,).
"""
from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats(y: Tensor, running_mean, running_var, batch_stats: bool, momentum: float, eps: float):
    acc = acc_dtype(y.dtype)
    if not batch_stats:
        return running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)
    yf = y.to(acc)
    var, mean = torch.var_mean(yf, dim=(0, 2), unbiased=False)
    if running_mean is not None:
        count = y.shape[0] * y.shape[2]
        unbiased = var * (count / max(count - 1, 1))
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
            running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
    return mean, torch.rsqrt(var + eps)


def _normalize(y, weight, bias, mean, invstd):
    acc = mean.dtype
    return ((y.to(acc) - mean[:, None]) * invstd[:, None]) * weight.to(acc)[:, None] + bias.to(acc)[:, None]


def bn_stats(y, running_mean, running_var, batch_stats, momentum, eps):
    return _stats(y, running_mean, running_var, batch_stats, momentum, eps)


def bn_act_fwd(y, weight, bias, running_mean, running_var, batch_stats, momentum, eps, groups, mean_group=-1,
               prefix=None):
    mean, invstd = _stats(y, running_mean, running_var, batch_stats, momentum, eps)
    act = torch.relu(_normalize(y, weight, bias, mean, invstd))
    outs, chmean, start = [], y.new_empty(0), 0
    for i, k in enumerate(groups):
        part = act[:, start:start + k]
        if i == mean_group:
            chmean = part.mean(1, keepdim=True).to(y.dtype)
            outs.append(y.new_empty(0))
        else:
            part = part.to(y.dtype)
            if prefix is not None:
                part = torch.cat([prefix.to(y.dtype), part], 1)
            outs.append(part.contiguous())
        start += k
    return outs, mean, invstd, chmean


def bn_act_bwd(grad_outs, y, weight, bias, mean, invstd, batch_stats, grad_chmean, mean_group, groups):
    acc = mean.dtype
    B, K, n = y.shape
    xhat = (y.to(acc) - mean[:, None]) * invstd[:, None]
    mask = (xhat * weight.to(acc)[:, None] + bias.to(acc)[:, None]) > 0
    g = torch.zeros(B, K, n, dtype=acc, device=y.device)
    start, gi = 0, 0
    for i, k in enumerate(groups):
        if i == mean_group:
            if grad_chmean is not None:
                g[:, start:start + k] += grad_chmean.to(acc) / k
        elif gi < len(grad_outs):
            g[:, start:start + k] += grad_outs[gi].to(acc)
            gi += 1
        start += k
    g = g * mask
    grad_bias = g.sum((0, 2))
    grad_weight = (g * xhat).sum((0, 2))
    scale = (weight.to(acc) * invstd)[:, None]
    if batch_stats:
        N = B * n
        grad_y = scale * (g - grad_bias[:, None] / N - xhat * grad_weight[:, None] / N)
    else:
        grad_y = scale * g
    out = torch.empty_like(y)
    out.copy_(grad_y)
    return out, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


def gate_fwd(h, h_weight, h_bias, h_mean, h_invstd, w2, l_weight, l_bias, l_running_mean, l_running_var,
             batch_stats, momentum, eps):
    acc = h_mean.dtype
    hh = torch.relu(_normalize(h, h_weight, h_bias, h_mean, h_invstd))
    l = torch.einsum("k,bkn->bn", w2.reshape(-1).to(acc), hh).unsqueeze(1)  # (B, 1, n)
    l_mean, l_invstd = _stats(l, l_running_mean, l_running_var, batch_stats, momentum, eps)
    a = torch.sigmoid(_normalize(l, l_weight, l_bias, l_mean, l_invstd))
    return a.to(h.dtype), l.to(h.dtype), l_mean, l_invstd


def gate_bwd(grad_out, target, a):
    acc = acc_dtype(a.dtype)
    af = a.to(acc)
    grad_target = (grad_out.to(acc) * af).to(target.dtype)
    da = (grad_out.to(acc) * target.to(acc)).sum(1, keepdim=True)
    return grad_target, (da * af * (1 - af)).to(a.dtype)


def head_bwd(grad_s, l, l_weight, l_mean, l_invstd, h, h_weight, h_bias, h_mean, h_invstd, w2, batch_stats):
    acc = h_mean.dtype
    B, _, n = l.shape
    N = B * n
    # the logit's BatchNorm (one channel)
    gs = grad_s.to(acc)
    lhat = (l.to(acc) - l_mean[:, None]) * l_invstd[:, None]
    grad_l_bias = gs.sum((0, 2))
    grad_l_weight = (gs * lhat).sum((0, 2))
    scale = (l_weight.to(acc) * l_invstd)[:, None]
    if batch_stats:
        dl = scale * (gs - grad_l_bias / N - lhat * grad_l_weight / N)
    else:
        dl = scale * gs
    # l = w2 · ĥ
    hhat_in = (h.to(acc) - h_mean[:, None]) * h_invstd[:, None]
    pre = hhat_in * h_weight.to(acc)[:, None] + h_bias.to(acc)[:, None]
    hh = torch.relu(pre)
    grad_w2 = (dl * hh).sum((0, 2))
    g = w2.reshape(-1).to(acc)[:, None] * dl * (pre > 0)
    grad_h_bias = g.sum((0, 2))
    grad_h_weight = (g * hhat_in).sum((0, 2))
    hscale = (h_weight.to(acc) * h_invstd)[:, None]
    if batch_stats:
        grad_h = hscale * (g - grad_h_bias[:, None] / N - hhat_in * grad_h_weight[:, None] / N)
    else:
        grad_h = hscale * g
    out = torch.empty_like(h)  # h's layout
    out.copy_(grad_h)
    return (out, grad_w2.to(w2.dtype), grad_h_weight.to(h_weight.dtype),
            grad_h_bias.to(h_weight.dtype), grad_l_weight.to(l_weight.dtype), grad_l_bias.to(l_weight.dtype))
