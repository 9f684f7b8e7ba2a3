"""Counting the operator launches of a piece of eager PyTorch code.

On a GPU an eager training step of RGA is host-bound: its speed follows the number of operator
launches more than their arithmetic. :func:`count_launches` counts them on any device, the CPU
included, from ``torch.profiler``: every ``aten::`` op whose nearest profiled ancestor is not an
``aten::`` op (it was called from Python, from an autograd node, or from one of our custom
``rga_kernels::`` ops, whose inner ATen calls are counted too), leaving out ops that launch no
kernel: views, metadata, allocations without a fill, and ``to``/``contiguous`` calls that return
their input. Each Triton kernel launch of rga_kernels._triton is one profiler event
(``triton::...``) and counts as one launch (under the Triton interpreter, the host copies it makes
inside are not counted: a GPU launch makes none); likewise each hand-written C++/CUDA kernel of
``csrc/`` records one ``kernel::NAME`` event per launch (on the CPU the same events as on the GPU),
counted as one launch with nothing inside it counted.

The count is the same on the CPU and the GPU for the same code path, so it can be measured and
enforced where no GPU is available (tests/test_launches.py, bench/bench_rga_module.py).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

# Ops that never launch a kernel: views and metadata, allocation without a fill, no-op casts are
# handled by child inspection below.
NO_KERNEL_OPS = frozenset(
    "aten::" + name for name in (
        "view", "_unsafe_view", "reshape", "view_as", "as_strided", "expand", "expand_as", "t", "transpose",
        "permute", "squeeze", "unsqueeze", "slice", "select", "narrow", "split", "split_with_sizes", "chunk",
        "unbind", "alias", "detach", "detach_", "lift_fresh", "numpy_T", "mT", "mH", "adjoint", "unflatten",
        "flatten", "movedim", "swapaxes", "resolve_conj", "resolve_neg", "_reshape_alias", "empty", "empty_like",
        "empty_strided", "new_empty", "new_empty_strided", "set_", "resize_", "result_type", "is_nonzero",
        "size", "stride", "is_same_size", "_has_same_storage_numel", "contiguous", "to", "type_as",
        "_local_scalar_dense", "item", "_to_copy_noop", "requires_grad_", "retain_grad", "output_nr",
        "_version", "_make_subclass", "promote_types", "can_cast",
    )
)
# These are no-ops when they return their input, and a copy (one launch) otherwise: they count
# exactly when a copy op ran under them.
_MAYBE_COPY = frozenset({"aten::to", "aten::contiguous", "aten::reshape", "aten::type_as", "aten::flatten"})
_COPY_CHILDREN = frozenset({"aten::_to_copy", "aten::copy_", "aten::clone"})


def _is_counted(evt, children) -> bool:
    name = evt.name
    if name in _MAYBE_COPY:
        return any(c.name in _COPY_CHILDREN for c in children.get(id(evt), ()))
    return name not in NO_KERNEL_OPS


def count_launches(fn: Callable[[], object], *, by_op: bool = False):
    """Run ``fn()`` once under torch.profiler and count its top-level kernel-launching aten ops.

    Returns the total, or with ``by_op=True`` a Counter from op name to count (the total is its
    ``sum(values())``). Autograd backward ops are counted when ``fn`` runs the backward.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = list(prof.events())
    children: dict[int, list] = {}
    for e in events:
        parent = e.cpu_parent
        if parent is not None:
            children.setdefault(id(parent), []).append(e)
    counts: Counter = Counter()
    for e in events:
        if e.name.startswith(("triton::", "kernel::")):  # a Triton launch / a hand-written C++/CUDA kernel
            counts[e.name] += 1
            continue
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        # climb to the nearest aten:: ancestor, if any (record_function scopes are not ops)
        while parent is not None and not parent.name.startswith(("aten::", "rga_kernels::", "triton::", "kernel::")):
            if parent.name.startswith("autograd::") or "Backward" in parent.name:
                break
            parent = parent.cpu_parent
        # inside an aten op: part of it; inside a Triton launch: the interpreter's host copies;
        # inside a hand-written kernel's scope: work of that one launch
        if parent is not None and parent.name.startswith(("aten::", "triton::", "kernel::")):
            continue
        if _is_counted(e, children):
            counts[e.name] += 1
    return counts if by_op else sum(counts.values())


def host_times(steps: dict, rounds: int = 25, reps: int = 5, warmup: int = 10) -> dict:
    """Host time of each ``steps[name]()``, side by side: after ``warmup`` calls each, ``rounds``
    interleaved rounds of ``reps`` calls per step; returns the best round's mean seconds per call
    for each name. Interleaving and taking the best keep other load on a shared machine from
    deciding a ratio. (Wall time on the host: on a GPU it measures launch overhead only when the
    step is host-bound; synchronize inside the step to include the device.)"""
    import time

    for step in steps.values():
        for _ in range(warmup):
            step()
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            best[name] = min(best[name], (time.perf_counter() - t0) / reps)
    return best
