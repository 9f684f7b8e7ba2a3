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
    """Names of the floating-point parameters and buffers of `model` that hold NaN or Inf."""
    return [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_state(model: torch.nn.Module, epoch: int, *, kept=None) -> None:
    """Raise TrainingDivergedError naming `epoch` (1-based, the epoch just trained) when a
    parameter or buffer of `model` is not finite. `kept`: the checkpoint that stays as it is."""
    bad = non_finite_tensors(model)
    if not bad:
        return
    names = ", ".join(bad[:SHOWN]) + (f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
    raise TrainingDivergedError(
        f"epoch {epoch}: training diverged: {len(bad)} weight/statistic tensor(s) hold NaN or Inf ({names}); "
        "lower --lr (or try --amp off); "
        + (f"{kept} is kept" if kept else "no checkpoint was written"))


class LossWatch:
    """The per-batch loss rule (module docstring); `check` raises FloatingPointError, which the
    training loop turns into a TrainingDivergedError naming the epoch."""

    def __init__(self, factor: float | None = None):
        self.factor = float(EXPLOSION_FACTOR if factor is None else factor)
        self.first: float | None = None

    def check(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} (lower --lr, or try --amp off)")
        if self.first is None:
            self.first = loss
            return
        limit = self.factor * max(abs(self.first), 1.0)
        if loss > limit:
            raise FloatingPointError(f"loss exploded to {loss:.3g}, more than {self.factor:g} times its first "
                                     f"value {self.first:.3g} (lower --lr)")
