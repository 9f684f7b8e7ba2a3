"""Divergence checks for training: a run that has diverged stops with an error naming the epoch,
and never writes a checkpoint with non-finite values over a good one.

Two rules, both cheap:

* ``check_finite_state(model, epoch)``: every floating-point parameter and buffer (the batch-norm
  running statistics included) must be finite. Run once per epoch and before every save: one
  ``isfinite`` pass over the weights, nothing per batch. Adam bounds its step, so with a far too
  high learning rate the loss can stay finite (about 1e17) while batch-norm variances overflow to
  Inf; this is the check that catches that run.
* ``LossWatch``: per batch, the loss must be finite and at most ``EXPLOSION_FACTOR`` times the
  first loss this process saw (at least ``EXPLOSION_FACTOR`` itself: the first loss counts as 1
  when it is smaller). A re-id loss (label-smoothed cross-entropy + triplet) starts near
  log(classes) and falls; a thousandfold rise is divergence, not noise.
"""
from __future__ import annotations

import itertools
import math

import torch

from .errors import TrainingDivergedError

EXPLOSION_FACTOR = 1e3
SHOWN = 4  # names of non-finite tensors in the message


def non_finite_tensors(model: torch.nn.Module) -> list:
    """Names of the floating-point parameters and buffers of `model` that hold NaN or Inf, and of
    the batch-norm running variances that hold a negative value (no variance is below 0)."""
    return [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t is not None and t.is_floating_point() and (not bool(torch.isfinite(t).all()) or (
                name.rsplit(".", 1)[-1] == "running_var" and bool((t < 0).any())))]


def _any_rank(flag: bool) -> bool:
    """`flag` or-ed over the ranks of a running torch.distributed job (so that every rank stops
    together rather than leaving the others waiting in a collective); `flag` alone otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def check_finite_state(model: torch.nn.Module, epoch: int, *, kept=None, all_ranks: bool = True) -> None:
    """Raise TrainingDivergedError naming `epoch` (1-based, the epoch just trained) when a
    parameter or buffer of `model` is not finite. all_ranks: on any rank of a distributed job
    (a collective: call it on every rank); False: this process's model only (e.g. in rank 0's
    save). `kept`: the checkpoint that stays as it is."""
    bad = non_finite_tensors(model)
    if not (_any_rank(bool(bad)) if all_ranks else bad):
        return
    if not bad:
        raise TrainingDivergedError(f"epoch {epoch}: training diverged on another process (weights or statistics "
                                    "hold NaN or Inf there)")
    names = ", ".join(bad[:SHOWN]) + (f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
    raise TrainingDivergedError(
        f"epoch {epoch}: training diverged: {len(bad)} weight/statistic tensor(s) hold NaN or Inf, or a negative "
        f"variance ({names}); "
        "lower --lr (or try --amp off); "
        + (f"{kept} is kept" if kept else "no checkpoint was written"))


class LossWatch:
    """The per-batch loss rule (module docstring); `check` raises FloatingPointError, which the
    training loop turns into a TrainingDivergedError naming the epoch. In a distributed job the
    rule is applied to the loss averaged over the ranks (one scalar all-reduce per batch), so all
    ranks stop at the same batch."""

    def __init__(self, factor: float | None = None):
        self.factor = float(EXPLOSION_FACTOR if factor is None else factor)
        self.first: float | None = None

    def check(self, loss) -> None:
        """`loss`: a float, or a (detached) scalar tensor."""
        import torch.distributed as dist

        if isinstance(loss, torch.Tensor):
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                loss = loss.detach().float().reshape(1).clone()
                if dist.get_backend() != "nccl":
                    loss = loss.cpu()
                dist.all_reduce(loss)
                loss = loss / dist.get_world_size()
            loss = float(loss)
        self._check(loss)

    def _check(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} (lower --lr, or try --amp off)")
        if self.first is None:
            self.first = loss
            return
        limit = self.factor * max(abs(self.first), 1.0)
        if loss > limit:
            raise FloatingPointError(f"loss exploded to {loss:.3g}, more than {self.factor:g} times its first "
                                     f"value {self.first:.3g} (lower --lr)")
