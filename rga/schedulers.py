"""The paper's learning-rate schedule, per epoch: linear warm-up, then step decay.

Defaults: 8e-6 -> 8e-4 linearly over epochs 0..20, then ×0.5 at epochs 80, 120, ..., 360.
`lr_at` is the closed form; `WarmupMultiStepLR` applies it to an optimizer and checkpoints.
"""
from __future__ import annotations

import bisect
import math

DEFAULT_MILESTONES = tuple(range(80, 361, 40))  # 80, 120, ..., 360


def lr_at(epoch: int, base_lr: float, *, warmup_epochs: int = 20, warmup_start_lr: float = 8e-6,
          milestones=DEFAULT_MILESTONES, gamma: float = 0.5, schedule: str = "step",
          total_epochs: int | None = None) -> float:
    """Learning rate used during (0-based) `epoch`. schedule "cosine": after the warm-up, half a
    cosine from base_lr (first epoch after the warm-up) towards 0 (reached at `total_epochs`)."""
    if epoch < warmup_epochs:
        return warmup_start_lr + (base_lr - warmup_start_lr) * epoch / warmup_epochs
    if schedule == "cosine":
        if total_epochs is None:
            raise ValueError("the cosine schedule needs total_epochs")
        span = max(1, total_epochs - warmup_epochs)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch - warmup_epochs, span) / span))
    if schedule != "step":
        raise ValueError(f"schedule must be step or cosine, got {schedule!r}")
    return base_lr * gamma ** bisect.bisect_right(sorted(milestones), epoch)


class WarmupMultiStepLR:
    """Sets every param group's lr to lr_at(epoch, group's base lr). Call step(epoch) at the start
    of each epoch. The warm-up start is scaled per group: start_g = warmup_start_lr · base_g / base_0."""

    def __init__(self, optimizer, *, warmup_epochs: int = 20, warmup_start_lr: float = 8e-6,
                 milestones=DEFAULT_MILESTONES, gamma: float = 0.5, schedule: str = "step",
                 total_epochs: int | None = None):
        if warmup_epochs < 0:
            raise ValueError("warmup_epochs must be >= 0")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {list(milestones)}")
        self.optimizer = optimizer
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.warmup_epochs, self.warmup_start_lr = int(warmup_epochs), float(warmup_start_lr)
        self.milestones, self.gamma = [int(m) for m in milestones], float(gamma)
        self.schedule, self.total_epochs = schedule, total_epochs
        self.last_epoch = -1

    def lr_for(self, epoch: int, base_lr: float) -> float:
        start = self.warmup_start_lr * base_lr / self.base_lrs[0]
        return lr_at(epoch, base_lr, warmup_epochs=self.warmup_epochs, warmup_start_lr=start,
                     milestones=self.milestones, gamma=self.gamma, schedule=self.schedule,
                     total_epochs=self.total_epochs)

    def step(self, epoch: int) -> None:
        self.last_epoch = int(epoch)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = self.lr_for(self.last_epoch, base)

    def get_last_lr(self) -> list:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs), "warmup_epochs": self.warmup_epochs,
                "warmup_start_lr": self.warmup_start_lr, "milestones": list(self.milestones),
                "gamma": self.gamma, "last_epoch": self.last_epoch,
                **({"schedule": self.schedule, "total_epochs": self.total_epochs} if self.schedule != "step" else {})}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = list(state["base_lrs"])
        self.warmup_epochs = int(state["warmup_epochs"])
        self.warmup_start_lr = float(state["warmup_start_lr"])
        self.milestones = list(state["milestones"])
        self.gamma = float(state["gamma"])
        self.last_epoch = int(state["last_epoch"])
        self.schedule = state.get("schedule", "step")  # checkpoints of step runs do not name it
        self.total_epochs = state.get("total_epochs")
