"""Which branches of an RGAModule run rga_kernels' fused branch kernels, and with what.

:func:`kernel_branches` is RGAModule's fused path planner: for each branch whose BatchNorms allow
it (plain nn.BatchNorm2d, one setting for all, affine, a fixed momentum, tied running statistics)
it returns a function running ``rga_kernels.branch.fused_branch`` on that branch's parameters and
buffers and, when every branch of the module qualifies, a "chain" running all of them as one
autograd node (``rga_kernels.branch.make_chain``; on cpp/cuda one C++ op); the module caches the
plan until its structure or mode changes (:class:`PlanCache`, which RGAModule inherits).
"""
from __future__ import annotations

import itertools
import operator

import torch
from torch import nn

from .bn_groups import _bn_uses_batch_stats, _flat_base, _momentum_factor, _plain_bn, _same_config


def kernel_branches(module) -> tuple:
    """(branch -> fn(inp, target) -> (gated target, attention) through rga_kernels' fused branch
    (its own kernels), for the branches where it applies (the others take _branch_fused); the
    num_batches_tracked counters those branches' kernels increment themselves)."""
    backend = module.backend
    if backend is None or torch.compiler.is_compiling():
        return {}, ()
    from rga_kernels.branch import FUSED_BRANCH_BACKENDS

    if backend == "auto":
        from rga_kernels.ops import _resolve_backend

        device = next(module.parameters()).device
        if device.type == "cpu":
            # On the CPU the composite path is the faster one (its BNs are ATen's vectorised
            # kernels, folded into the GEMMs in eval; measured side by side with
            # bench/bench_rga_module.py): "auto" keeps it there, and fused="cpp" runs the
            # C++ kernels (the cuda backend's code) on the CPU.
            return {}, ()
        backend = _resolve_backend("auto", device)
    if backend not in FUSED_BRANCH_BACKENDS:
        return {}, ()
    fns, counted, steps = {}, (), {}
    for branch in ("spatial", "channel"):
        if getattr(module, f"use_{branch}"):
            args = branch_args(module, branch, backend)
            if args is not None:
                fns[branch] = _make_kernel_branch(*args)
                steps[branch] = args
                counted += args[2].counters
    chain = _make_chain(module, steps)
    if chain is not None:
        fns["chain"] = chain
    return fns, counted


def _make_chain(module, steps: dict):
    """fn(x3) -> (out, {branch: attention}) running every branch of the module in one autograd
    node (rga_kernels.branch.make_chain), or None when a branch takes the composite path."""
    from rga_kernels.branch import Step, make_chain

    active = [b for b in ("spatial", "channel") if getattr(module, f"use_{b}")]
    if any(b not in steps for b in active):
        return None
    parallel = len(active) == 2 and module.order not in ("sc", "cs")
    if len(active) == 2 and module.order == "cs":
        active.reverse()
    fn = make_chain([Step(steps[b][0], steps[b][2], b == "channel") for b in active], [steps[b][1] for b in active],
                    parallel)

    def run(x3):
        out, attention = fn(x3)
        return out, dict(zip(active, attention))

    return run


def _make_kernel_branch(spec, params, running):
    from rga_kernels.branch import fused_branch

    def run(inp, target):
        return fused_branch(spec, inp, params, running, target)

    return run

def branch_args(module, branch: str, backend: str):
    """(BranchSpec, BranchParams, BranchRunning) of a branch, or None where the kernels do not
    apply (BN subclasses such as SyncBatchNorm, differing BN settings, affine=False,
    momentum=None, untied running statistics, a half or bfloat16 module): those run the composite
    path."""
    from rga_kernels.branch import BranchParams, BranchRunning, BranchSpec

    names = module._embedding_names()
    emb = [getattr(module, f"{name}_{branch}") for name in names]
    mods = emb + ([getattr(module, f"gg_{branch}")] if module.use_relation else [])
    mlp = getattr(module, f"W_{branch}")
    bns = [m[1] for m in mods] + [mlp[1], mlp[4]]
    if not (all(_plain_bn(b) and b.affine for b in bns) and _same_config(bns)) or bns[0].momentum is None:
        return None
    if any(b.weight.dtype not in (torch.float32, torch.float64) for b in bns):
        return None  # a half or bfloat16 module (not autocast): the kernels keep BN parameters in float32
    b0 = bns[0]
    track = b0.track_running_stats and b0.running_mean is not None
    emb_mean = emb_var = None
    if track and emb:
        emb_mean = _flat_base([m[1].running_mean for m in emb]) if len(emb) > 1 else emb[0][1].running_mean
        emb_var = _flat_base([m[1].running_var for m in emb]) if len(emb) > 1 else emb[0][1].running_var
        if emb_mean is None or emb_var is None:
            return None

    def idx(name):
        return names.index(name) if name in names else -1

    theta = idx("theta")
    phi = idx("phi") if module.embedding == "asymmetric" else theta
    spec = BranchSpec(
        groups=tuple(m[0].out_channels for m in emb), theta=theta, phi=phi, mean_group=idx("gx"),
        relation=module.use_relation, batch_stats=_bn_uses_batch_stats(b0), momentum=_momentum_factor(b0),
        eps=b0.eps, backend=backend)
    rel = getattr(module, f"gg_{branch}") if module.use_relation else None
    params = BranchParams(
        tuple(m[0].weight for m in emb), tuple(m[1].weight for m in emb), tuple(m[1].bias for m in emb),
        rel[0].weight if rel else None, rel[1].weight if rel else None, rel[1].bias if rel else None,
        mlp[0].weight, mlp[1].weight, mlp[1].bias, mlp[3].weight, mlp[4].weight, mlp[4].bias)

    def stats(bn):
        return (bn.running_mean, bn.running_var) if track else (None, None)

    counters = ()
    if backend in ("cpp", "cuda") and b0.training and track:  # incremented by the branch's kernels
        counters = tuple(b.num_batches_tracked for b in bns)
    running = BranchRunning(emb_mean, emb_var, *(stats(rel[1]) if rel else (None, None)), *stats(mlp[1]),
                            *stats(mlp[4]), counters)
    return spec, params, running


class PlanCache:
    """RGAModule's fused-path plan, cached (a mixin before nn.Module; the module provides
    ``_fused``, ``_tie_buffers`` and ``_kernel_branches``).

    What the fused path runs (which branches go through rga_kernels' kernels, with which
    parameters and buffers) depends on the module's structure, its mode and its BNs' settings; it
    is worked out once and reused while those stay the same (an eager step is host-bound)."""

    def _count_batches(self) -> None:
        """num_batches_tracked += 1 for every plain BN of the module that tracks statistics, in one op."""
        counters = self._plan()[2]
        if counters:
            torch._foreach_add_(counters, 1)

    def _plan_key(self):
        return (self._fused, self.training, tuple((b.training, b.momentum, b.eps, b.track_running_stats, b.affine)
                                                  for b in self.__dict__.get("_plan_bns", ())))

    def _plan(self):
        if torch.compiler.is_compiling():  # traced: the composite path, nothing cached
            counters = [m.num_batches_tracked for m in self.modules() if _plain_bn(m) and m.training
                        and m.track_running_stats and m.num_batches_tracked is not None]
            return None, {}, counters
        plan = self.__dict__.get("_plan_cache")
        if plan is not None and plan[0] == self._plan_key():
            members = self._plan_members()
            if len(members) == len(plan[3]) and all(map(operator.is_, members, plan[3])):
                return plan
        self._tie_buffers()  # a deepcopy or a reassignment may have separated them
        mods = list(self.modules())
        self.__dict__["_plan_dicts"] = [d for m in mods for d in (m._parameters, m._buffers, m._modules) if d]
        self.__dict__["_plan_bns"] = [m for m in mods if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        kernels, counted = self._kernel_branches()
        counters = [m.num_batches_tracked for m in self._plan_bns
                    if _plain_bn(m) and m.training and m.track_running_stats and m.num_batches_tracked is not None
                    and not any(m.num_batches_tracked is c for c in counted)]
        plan = (self._plan_key(), kernels, counters, self._plan_members())
        self.__dict__["_plan_cache"] = plan
        return plan

    def _plan_members(self) -> list:
        """Every parameter, buffer and submodule in the tree the plan was made for, as the modules
        hold them now. The plan holds tensors: one replaced below this module, where __setattr__
        does not see it (torch.func.functional_call, a submodule's parameter or buffer reassigned,
        convert_sync_batchnorm after a forward), makes it stale."""
        return list(itertools.chain.from_iterable(map(dict.values, self.__dict__.get("_plan_dicts", ()))))

    def _forget_plan(self) -> None:
        self.__dict__.pop("_plan_cache", None)

    def __getstate__(self):
        # a copy or a pickle plans again: the cached plan holds this module's own tensors
        state = self.__dict__.copy()
        state.pop("_plan_cache", None)
        state.pop("_plan_bns", None)
        state.pop("_plan_dicts", None)
        return state

    def __setattr__(self, name, value):
        # a replaced submodule, parameter or buffer (e.g. convert_sync_batchnorm) changes the plan
        if isinstance(value, (nn.Module, torch.Tensor)):
            self.__dict__.pop("_plan_cache", None)
        super().__setattr__(name, value)

    def train(self, mode: bool = True):
        self._forget_plan()
        return super().train(mode)
