"""PK identity sampling: every batch holds P identities with K images each, split across ranks.

Two ways to fill an epoch (``mode``):

* ``"one_group"`` (the public RGA code's ``RandomIdentitySampler``, the paper's recipe): every
  identity contributes one group of K images per epoch, so an epoch is floor(#ids / (P·W))
  batches (Market-1501, 751 ids, P = 16: 46 batches).
* ``"all_groups"`` (torchreid's ``RandomIdentitySampler``): every identity is cut into as many
  groups of K as its images allow and all groups are used, so an epoch sees (about) every
  training image once: 2-4x more batches on the re-id sets (Market-1501: about 183), and an
  epoch-based schedule (warm-up, step decay) then lands 2-4x later in iterations.

The batches of an epoch are a pure function of (seed, epoch), so every rank computes the same
global list without communicating, and a resumed run replays exactly the batches it would have
seen. With world_size W, each global step takes P·W distinct identities; rank r gets the r-th
block of P of them, so ranks see disjoint identities within a step and all ranks run the same
number of batches.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterator, Sequence

from torch.utils.data import Sampler

MODES = ("one_group", "all_groups")


class RandomIdentityBatchSampler(Sampler[list]):
    """Yields lists of dataset indices, `num_ids` identities × `num_instances` images each.

    pids: the identity label of every dataset item (len == len(dataset)).
    mode: "one_group" (one group of K per identity per epoch, the paper's) or "all_groups" (see
    the module docstring).
    An identity with fewer than K images is topped up by sampling its images with replacement;
    with "all_groups", images left over after cutting an identity into groups of K are dropped
    for that epoch (a different subset next epoch). Use as DataLoader(dataset, batch_sampler=...).
    Call set_epoch(e) before iterating each epoch, as with DistributedSampler.
    """

    def __init__(self, pids: Sequence[int], num_ids: int = 16, num_instances: int = 4, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, mode: str = "one_group"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if num_ids < 1 or num_instances < 1:
            raise ValueError(f"need num_ids >= 1 and num_instances >= 1, got {num_ids} and {num_instances}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank/world_size: {rank}/{world_size}")
        self.mode = mode
        self.num_ids, self.num_instances = int(num_ids), int(num_instances)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        index = defaultdict(list)
        for i, pid in enumerate(pids):
            index[int(pid)].append(i)
        self.index_by_pid = dict(sorted(index.items()))
        needed = self.num_ids * self.world_size
        if len(self.index_by_pid) < needed:
            raise ValueError(
                f"PK sampling needs at least {needed} training identities "
                f"({self.num_ids} per batch x {self.world_size} process(es)); the dataset has "
                f"{len(self.index_by_pid)}. Lower --batch-ids.")
        self._cache = None  # (epoch, batches)

    @property
    def batch_size(self) -> int:
        return self.num_ids * self.num_instances

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        mode = state.get("mode", "all_groups")  # states written before the modes existed: all groups
        if mode != self.mode:
            raise ValueError(f"the saved sampler state is for mode {mode!r}, this sampler is {self.mode!r}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._cache = None

    def global_batches(self, epoch: int | None = None) -> list:
        """The epoch's global batches, each P·W identities × K indices, rank blocks in order."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == (self.seed, epoch):
            return self._cache[1]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        k = self.num_instances
        groups = {}
        for pid, idxs in self.index_by_pid.items():
            idxs = list(idxs)
            if len(idxs) < k:
                idxs += rng.choices(idxs, k=k - len(idxs))
            rng.shuffle(idxs)
            usable = k if self.mode == "one_group" else len(idxs) - len(idxs) % k
            groups[pid] = [idxs[i:i + k] for i in range(0, usable, k)]
        available = [pid for pid in groups if groups[pid]]
        per_step = self.num_ids * self.world_size
        batches = []
        while len(available) >= per_step:
            chosen = rng.sample(available, per_step)
            batch = []
            for pid in chosen:
                batch.extend(groups[pid].pop())
                if not groups[pid]:
                    available.remove(pid)
            batches.append(batch)
        self._cache = ((self.seed, epoch), batches)
        return batches

    def __iter__(self) -> Iterator[list]:
        size = self.batch_size
        lo, hi = self.rank * size, (self.rank + 1) * size
        for batch in self.global_batches():
            yield batch[lo:hi]

    def __len__(self) -> int:
        return len(self.global_batches())
