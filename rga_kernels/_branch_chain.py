"""The fused branch's Python orchestration: each kernel launched from Python, the chain of a
module's branches as one autograd.Function (_Chain). The triton backend runs this (its kernels
are Python launches anyway); the cpp and cuda backends run the same sequence in C++
(csrc/branch_op.cpp, csrc/chain_op.cpp). ``reference`` runs it on branch_reference's functions
(tests). The public entry point is rga_kernels.branch.make_chain.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import branch_reference
from .branch_spec import FUSED_BRANCH_BACKENDS, BranchParams, BranchRunning, BranchSpec, Step
from .branch_spec import flatten as _flatten
from .branch_spec import unflatten as _unflatten


class _CppKernels:
    """The C++ extension's kernels (CPU and CUDA), registered as rga_kernels:: ops."""

    @staticmethod
    def bn_act_fwd(y, weight, bias, rm, rv, batch_stats, momentum, eps, groups, mean_group, prefix):
        return torch.ops.rga_kernels.bn_act_fwd(y, weight, bias, rm, rv, batch_stats, momentum, eps, list(groups),
                                                mean_group, prefix, False)

    @staticmethod
    def bn_stats(y, rm, rv, batch_stats, momentum, eps):
        return torch.ops.rga_kernels.bn_stats(y, rm, rv, [], batch_stats, momentum, eps)

    @staticmethod
    def bn_act_bwd(grad_outs, y, weight, bias, mean, invstd, batch_stats, grad_chmean, mean_group, groups):
        return torch.ops.rga_kernels.bn_act_bwd(list(grad_outs), y, weight, bias, mean, invstd, batch_stats,
                                                grad_chmean, mean_group, list(groups))

    @staticmethod
    def gate_fwd(*args):
        return torch.ops.rga_kernels.gate_fwd(*args)

    @staticmethod
    def gate_bwd(grad_out, target, a):
        return torch.ops.rga_kernels.gate_bwd(grad_out, target, a)

    @staticmethod
    def head_bwd(*args):
        return torch.ops.rga_kernels.head_bwd(*args)

    @staticmethod
    def relation_fwd(theta, phi, weight):
        return torch.ops.rga_kernels.relation_fwd(theta, phi, weight)

    @staticmethod
    def relation_bwd(grad, theta, phi, weight, p, q):
        return torch.ops.rga_kernels.relation_bwd(grad, theta, phi, weight, p, q)


class _ReferenceKernels:
    """branch_reference's functions with the relation op of the ``torch`` backend (tests only)."""

    bn_act_fwd = staticmethod(branch_reference.bn_act_fwd)
    bn_stats = staticmethod(branch_reference.bn_stats)
    bn_act_bwd = staticmethod(branch_reference.bn_act_bwd)
    gate_fwd = staticmethod(branch_reference.gate_fwd)
    gate_bwd = staticmethod(branch_reference.gate_bwd)
    head_bwd = staticmethod(branch_reference.head_bwd)

    @staticmethod
    def relation_fwd(theta, phi, weight):
        from .reference import relation_embed_factorized

        return relation_embed_factorized(theta, phi, weight), None, None

    @staticmethod
    def relation_bwd(grad, theta, phi, weight, p, q):
        from .reference import relation_embed_backward_factorized

        return relation_embed_backward_factorized(grad, theta, phi, weight)


def _kernels(backend: str):
    if backend in ("cpp", "cuda"):
        return _CppKernels
    if backend == "triton":
        from . import _triton_branch

        return _triton_branch.TritonKernels
    if backend == "reference":
        return _ReferenceKernels
    raise ValueError(f"no fused branch for backend {backend!r}; expected one of {FUSED_BRANCH_BACKENDS}")


def _flat(tensors: Sequence[Tensor], rows: int) -> Tensor:
    """The tensors (each contiguous, ``numel = k_i * cols``) as one (sum k_i, cols) matrix, or
    (sum k_i,) vector when rows == 0: a view when they are adjacent in one storage, else a cat."""
    t0 = tensors[0]
    total = sum(t.numel() for t in tensors)
    cols = t0.numel() // max(1, t0.shape[0]) if rows else 1
    shape = (total // cols, cols) if rows else (total,)
    stride = (cols, 1) if rows else (1,)
    if len(tensors) == 1:
        return t0.reshape(shape)
    adjacent = all(t.is_contiguous() and t.dtype == t0.dtype and t.device == t0.device for t in tensors)
    if adjacent:
        ptr = t0.data_ptr()
        size = t0.element_size()
        for t in tensors:
            if t.data_ptr() != ptr or t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr():
                adjacent = False
                break
            ptr += t.numel() * size
    if adjacent and t0.storage_offset() * size + total * size <= t0.untyped_storage().nbytes():
        return t0.as_strided(shape, stride)
    return torch.cat([t.reshape(-1, cols) if rows else t.reshape(-1) for t in tensors])


def _split_like(flat: Tensor, like: Sequence[Tensor]):
    out, start = [], 0
    for t in like:
        k = t.shape[0]
        out.append(flat[start:start + k].reshape(t.shape))
        start += k
    return out


def _gemm_weight(w: Tensor) -> Tensor:
    """(k, D, 1, 1) conv weight -> (k, D, 1) conv1d weight (a view)."""
    return w.reshape(w.shape[0], w.shape[1], 1)


def _cast(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _forward(spec: BranchSpec, k, inp, target, p: BranchParams, run: BranchRunning, cdt):
    """The branch's forward; returns (out, a, saved dict)."""
    bs, mom, eps = spec.batch_stats, spec.momentum, spec.eps
    saved = {}
    outs, chmean = [], None
    if spec.groups:
        we = _cast(_flat([w.detach() for w in p.emb_weight], rows=1), cdt)
        ew = _flat([w.detach() for w in p.emb_bn_weight], rows=0)
        eb = _flat([b.detach() for b in p.emb_bn_bias], rows=0)
        e = F.conv1d(inp, we.unsqueeze(-1))
        outs, e_mean, e_invstd, chmean = k.bn_act_fwd(e, ew, eb, run.emb_mean, run.emb_var, bs, mom, eps,
                                                      spec.groups, spec.mean_group, None)
        saved.update(we=we, ew=ew, eb=eb, e=e, e_mean=e_mean, e_invstd=e_invstd)
    theta = phi = None
    if spec.relation:
        theta = inp if spec.theta < 0 else outs[spec.theta]
        phi = inp if spec.phi < 0 else outs[spec.phi]
        wrel = _cast(p.rel_weight.detach().flatten(1), cdt)
        z, rp, rq = k.relation_fwd(theta, phi, wrel)
        prefix = chmean if spec.mean_group >= 0 else None
        (y,), z_mean, z_invstd, _ = k.bn_act_fwd(z, p.rel_bn_weight.detach(), p.rel_bn_bias.detach(), run.rel_mean,
                                                 run.rel_var, bs, mom, eps, (z.shape[1],), -1, prefix)
        saved.update(theta=theta, phi=phi, wrel=wrel, z=z, rp=rp, rq=rq, z_mean=z_mean, z_invstd=z_invstd)
    else:
        y = chmean
    w1 = _cast(p.w1.detach().flatten(1), cdt)
    h = F.conv1d(y, w1.unsqueeze(-1))
    h_mean, h_invstd = k.bn_stats(h, run.h_mean, run.h_var, bs, mom, eps)
    a, l, l_mean, l_invstd = k.gate_fwd(h, p.h_bn_weight.detach(), p.h_bn_bias.detach(), h_mean, h_invstd,
                                        p.w2.detach().flatten(1), p.l_bn_weight.detach(), p.l_bn_bias.detach(),
                                        run.l_mean, run.l_var, bs, mom, eps)
    if run.counters:
        torch._foreach_add_(list(run.counters), 1)
    out = target * a
    saved.update(y=y, w1=w1, h=h, h_mean=h_mean, h_invstd=h_invstd, l=l, l_mean=l_mean, l_invstd=l_invstd, a=a)
    return out, a, saved


def _backward(spec, k, inp, target, p: BranchParams, s, grad_out, own_target):
    bs = spec.batch_stats
    grad_target, grad_s = k.gate_bwd(grad_out, target, s["a"])
    w2 = p.w2.detach()
    (grad_h, grad_w2, grad_hw, grad_hb, grad_lw, grad_lb) = k.head_bwd(
        grad_s, s["l"], p.l_bn_weight.detach(), s["l_mean"], s["l_invstd"], s["h"], p.h_bn_weight.detach(),
        p.h_bn_bias.detach(), s["h_mean"], s["h_invstd"], w2.flatten(1), bs)
    w1 = s["w1"]
    grad_y, grad_w1, _ = torch.ops.aten.convolution_backward(
        grad_h, s["y"], w1.unsqueeze(-1), None, [1], [0], [1], False, [0], 1, [True, True, False])
    grad_y_mean = grad_y[:, :1] if spec.mean_group >= 0 else None
    d_inp_extra = []
    grad_emb_outs = []
    grad_rel = grad_rel_w = grad_rel_b = None
    if spec.relation:
        grad_z_in = grad_y[:, 1:] if spec.mean_group >= 0 else grad_y
        grad_z, grad_rel_w, grad_rel_b = k.bn_act_bwd(
            [grad_z_in], s["z"], p.rel_bn_weight.detach(), p.rel_bn_bias.detach(), s["z_mean"], s["z_invstd"], bs,
            None, -1, (s["z"].shape[1],))
        d_theta, d_phi, grad_rel = k.relation_bwd(grad_z, s["theta"], s["phi"], s["wrel"], s.get("rp"), s.get("rq"))
        if spec.theta < 0:
            d_inp_extra += [d_theta, d_phi]
        elif spec.theta == spec.phi:
            grad_emb_outs = [d_theta + d_phi]
        else:
            grad_emb_outs = [d_theta, d_phi]  # θ, φ are groups 0 and 1
    d_params_emb = ((), (), ())
    d_inp = None
    if spec.groups:
        grad_e, grad_ew, grad_eb = k.bn_act_bwd(grad_emb_outs, s["e"], s["ew"], s["eb"], s["e_mean"], s["e_invstd"],
                                                bs, grad_y_mean, spec.mean_group, spec.groups)
        d_inp, grad_we, _ = torch.ops.aten.convolution_backward(
            grad_e, inp, s["we"].unsqueeze(-1), None, [1], [0], [1], False, [0], 1, [True, True, False])
        d_params_emb = (
            tuple(g.to(w.dtype) for g, w in zip(_split_like(grad_we.squeeze(-1), p.emb_weight), p.emb_weight)),
            tuple(_split_like(grad_ew, p.emb_bn_weight)), tuple(_split_like(grad_eb, p.emb_bn_bias)))
    for extra in d_inp_extra:
        d_inp = extra if d_inp is None else d_inp + extra
    if own_target:
        d_target = grad_target
    else:
        d_inp = grad_target if d_inp is None else d_inp + grad_target
        d_target = None
    d_params = BranchParams(
        *d_params_emb,
        None if grad_rel is None else grad_rel.reshape(p.rel_weight.shape).to(p.rel_weight.dtype),
        grad_rel_w, grad_rel_b,
        grad_w1.reshape(p.w1.shape).to(p.w1.dtype), grad_hw, grad_hb,
        grad_w2.reshape(p.w2.shape).to(p.w2.dtype), grad_lw, grad_lb)
    return d_inp, d_target, _flatten(d_params)


def _t(x: Optional[Tensor], transposed: bool) -> Optional[Tensor]:
    return x.transpose(1, 2) if transposed and x is not None else x


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


class _Record(NamedTuple):
    """What one step's backward needs."""

    inp: Tensor  # the input as the kernels read it (cast under autocast)
    target: Optional[Tensor]  # the gated tensor when it is not inp (None: inp is gated)
    saved: dict  # the intermediates, by name
    dtype: torch.dtype  # the dtype of the input the step was given (its gradient's)
    own_target: bool  # target came from the caller (else it is inp, uncast, under autocast)


def _step_forward(step: Step, inp, target, p: BranchParams, cdt) -> tuple:
    """One branch on (inp, target; None: inp is gated). Under autocast (cdt) the GEMMs read inp
    cast once and the gate multiplies the uncast tensor. Returns (out, a, _Record)."""
    spec, dtype, own = step.spec, inp.dtype, target is not None
    if cdt is not None and inp.dtype != cdt:
        target = inp if target is None else target
        inp = inp.to(cdt)
    out, a, d = _forward(spec, _kernels(spec.backend), inp, inp if target is None else target, p, step.running,
                         inp.dtype)
    return out, a, _Record(inp, target, {k_: v for k_, v in d.items() if v is not None}, dtype, own)


def _step_backward(step: Step, r: _Record, p: BranchParams, flat_params, grad_out) -> tuple:
    """(d_inp in the dtype the step was given, d_target (a caller's target) or None, flat
    parameter gradients)."""
    spec = step.spec
    d_inp, d_target, d_params = _backward(spec, _kernels(spec.backend), r.inp, r.inp if r.target is None else r.target,
                                          p, r.saved, grad_out, r.target is not None)
    if d_inp is not None and d_inp.dtype != r.dtype:
        d_inp = d_inp.to(r.dtype)
    if not r.own_target:  # autocast: the gated tensor is the uncast input
        d_inp, d_target = _add(d_inp, d_target), None
    return d_inp, d_target, d_params


def _split_params(counts, flat) -> list:
    out, start = [], 0
    for n in counts:
        out.append(flat[start:start + n])
        start += n
    return out


class _Chain(torch.autograd.Function):
    """Branches one after the other (each gating the previous one's output), or two in parallel
    (the second gates the first one's output with its attention of the chain's input), as one
    autograd node: an eager step is host-bound, and each node, view and transpose between the
    branches costs host time."""

    @staticmethod
    def forward(ctx, steps, parallel, cdt, x, target, counts, *flat):
        flats = _split_params(counts, flat)
        ps = [_unflatten(st.spec, f) for st, f in zip(steps, flats)]
        if parallel:  # out = C(x, target=S(x))
            s0, s1 = steps
            out0, a0, r0 = _step_forward(s0, _t(x, s0.transposed), None, ps[0], cdt)
            out1, a1, r1 = _step_forward(s1, _t(x, s1.transposed), _t(_t(out0, s0.transposed), s1.transposed),
                                         ps[1], cdt)
            records, attention, out = [r0, r1], [a0, a1], _t(out1, s1.transposed)
        else:
            records, attention, t = [], [], x
            for i, st in enumerate(steps):
                out, a, r = _step_forward(st, _t(t, st.transposed), _t(target, st.transposed) if i == 0 else None,
                                          ps[i], cdt)
                records.append(r)
                attention.append(a)
                t = _t(out, st.transposed)
            out = t
        ctx.steps, ctx.parallel, ctx.cdt, ctx.counts = steps, parallel, cdt, counts
        # every tensor the backward reads through save_for_backward, the intermediates too: an
        # in-place modification before backward is an error, and saved-tensor hooks see them all
        # (non-reentrant checkpointing drops and recomputes them); ctx.shells holds no tensor
        tensors, ctx.shells = [], []
        for r in records:
            ctx.shells.append((tuple(r.saved), r.dtype, r.own_target))
            tensors += [r.inp, r.target, *r.saved.values()]
        ctx.save_for_backward(x, target, *flat, *tensors)
        attention = [_t(a, st.transposed) for a, st in zip(attention, steps)]
        ctx.mark_non_differentiable(*attention)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the attention outputs
        return (out, *attention)

    @staticmethod
    def backward(ctx, grad_out, *_grad_attention):
        steps = ctx.steps
        tensors = ctx.saved_tensors  # first: a second backward fails here, clearly
        if grad_out is None:
            return (None,) * (6 + sum(ctx.counts))
        k = 2 + sum(ctx.counts)
        x, target, flat = tensors[0], tensors[1], tensors[2:k]
        records = []
        for keys, dtype, own_target in ctx.shells:
            records.append(_Record(tensors[k], tensors[k + 1], dict(zip(keys, tensors[k + 2:k + 2 + len(keys)])),
                                   dtype, own_target))
            k += 2 + len(keys)
        flats = _split_params(ctx.counts, flat)
        ps = [_unflatten(st.spec, f) for st, f in zip(steps, flats)]
        if torch.is_grad_enabled():  # create_graph=True: differentiate a differentiable recompute
            d_x, d_target, d_flat = _chain_double_backward(ctx, records, x, target, flat, ps, grad_out)
            return (None, None, None, d_x, d_target, None, *d_flat)
        d_params = [None] * len(steps)
        if ctx.parallel:
            s0, s1 = steps
            d1, d_gated, d_params[1] = _step_backward(s1, records[1], ps[1], flats[1], _t(grad_out, s1.transposed))
            d_gated = _t(_t(d_gated, s1.transposed), s0.transposed)
            d0, _, d_params[0] = _step_backward(s0, records[0], ps[0], flats[0], d_gated)
            d_x, d_target = _add(_t(d0, s0.transposed), _t(d1, s1.transposed)), None
        else:
            g, d_target = grad_out, None
            for i in reversed(range(len(steps))):
                st = steps[i]
                d_inp, d_tgt, d_params[i] = _step_backward(st, records[i], ps[i], flats[i], _t(g, st.transposed))
                g = _t(d_inp, st.transposed)
                if i == 0:
                    d_target = _t(d_tgt, st.transposed)
            d_x = g
        return (None, None, None, d_x, d_target, None, *(g_ for d in d_params for g_ in d))


def _chain_double_backward(ctx, records, x, target, flat, ps, grad_out):
    """Gradients as a differentiable function of the inputs (for create_graph=True): the chain
    recomputed in differentiable PyTorch ops (the forward's statistics in eval mode) and
    differentiated. Exact, and slower."""
    steps, cdt = ctx.steps, ctx.cdt
    saved = [r.saved for r in records]
    inputs = [x, target, *flat]
    wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]

    def step(i, inp, tgt):
        st = steps[i]
        inp, tgt = _t(inp, st.transposed), _t(tgt, st.transposed)
        if cdt is not None and inp.dtype != cdt:
            tgt = inp if tgt is None else tgt
            inp = inp.to(cdt)
        return _t(composite_forward(st.spec, inp, inp if tgt is None else tgt, ps[i], saved[i]), st.transposed)

    with torch.enable_grad():
        if ctx.parallel:
            out = step(1, x, step(0, x, None))
        else:
            out = x
            for i in range(len(steps)):
                out = step(i, out, target if i == 0 else None)
        got = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out, create_graph=True, allow_unused=True)
    grads = [None] * len(inputs)
    for i, g in zip(wanted, got):
        grads[i] = g
    return grads[0], grads[1], grads[2:]


def _bn(y, weight, bias, batch_stats, mean, invstd, eps):
    """Differentiable BN of (B, K, n): batch statistics recomputed, or the given (eval) ones."""
    if batch_stats:
        return F.batch_norm(y, None, None, weight, bias, True, 0.0, eps)
    scale = weight * invstd.to(weight.dtype)
    return y * scale[:, None].to(y.dtype) + (bias - mean.to(bias.dtype) * scale)[:, None].to(y.dtype)


def composite_forward(spec, inp, target, p: BranchParams, saved):
    """The branch in differentiable PyTorch ops (no running-statistics update): the double backward."""
    eps, bs = spec.eps, spec.batch_stats
    outs = []
    chmean = None
    if spec.groups:
        we = torch.cat([w.flatten(1) for w in p.emb_weight]).to(inp.dtype)
        e = F.conv1d(inp, we.unsqueeze(-1))
        act = torch.relu(_bn(e, torch.cat(p.emb_bn_weight), torch.cat(p.emb_bn_bias), bs, saved.get("e_mean"),
                             saved.get("e_invstd"), eps))
        outs = list(act.split(list(spec.groups), 1))
        if spec.mean_group >= 0:
            chmean = outs[spec.mean_group].mean(1, keepdim=True)
    parts = [chmean] if chmean is not None else []
    if spec.relation:
        from .reference import relation_embed_factorized

        theta = inp if spec.theta < 0 else outs[spec.theta]
        phi = inp if spec.phi < 0 else outs[spec.phi]
        z = relation_embed_factorized(theta, phi, p.rel_weight.flatten(1).to(inp.dtype))
        parts.append(torch.relu(_bn(z, p.rel_bn_weight, p.rel_bn_bias, bs, saved.get("z_mean"),
                                    saved.get("z_invstd"), eps)))
    y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    h = F.conv1d(y, p.w1.flatten(1).to(y.dtype).unsqueeze(-1))
    hh = torch.relu(_bn(h, p.h_bn_weight, p.h_bn_bias, bs, saved["h_mean"], saved["h_invstd"], eps))
    l = F.conv1d(hh, p.w2.flatten(1).to(hh.dtype).unsqueeze(-1))
    a = torch.sigmoid(_bn(l, p.l_bn_weight, p.l_bn_bias, bs, saved["l_mean"], saved["l_invstd"], eps))
    return target * a
