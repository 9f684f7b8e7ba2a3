"""Query-to-gallery distances (cosine: 1 - cos; euclidean: squared), computed in fixed GEMM blocks
so that a query's row never depends on how the queries are chunked."""
from __future__ import annotations

import math

import numpy as np
import torch

#: rows of queries per matrix product; chunk sizes are rounded up to a multiple of it
GEMM_BLOCK = 64
METRICS = ("cosine", "euclidean")


def _as_tensor(x, device) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    if t.dim() != 2:
        raise ValueError(f"features must be 2-D (num_items, dim), got shape {tuple(t.shape)}")
    return t.to(device)


class _DistanceBlocks:
    """Distances from query rows to the whole gallery, computed in fixed GEMM blocks.

    cosine: 1 - <q, g> / (|q| |g|), in [0, 2].
    euclidean: squared Euclidean distance |q|^2 + |g|^2 - 2 <q, g>, clamped at 0 (monotone in the
    Euclidean distance, so every ranking metric is the same as with the plain distance).
    """

    def __init__(self, qf, gf, metric: str, device=None):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if device is None:
            device = qf.device if isinstance(qf, torch.Tensor) else torch.device("cpu")
        self.device = torch.device(device)
        self.q = _as_tensor(qf, self.device)
        self.g = _as_tensor(gf, self.device)
        if self.q.shape[1] != self.g.shape[1]:
            raise ValueError(f"query dim {self.q.shape[1]} != gallery dim {self.g.shape[1]}")
        if self.q.dtype != self.g.dtype:
            self.q = self.q.to(self.g.dtype)
        self.metric = metric
        # (G,) squared norms, in slices: never a temporary the size of the gallery
        self.g_sq = torch.cat([(gs * gs).sum(1) for gs in self.g.split(4096)]) if len(self.g) \
            else self.g.new_zeros(0)
        self.g_norm = self.g_sq.sqrt().clamp_min(1e-12)

    @property
    def num_query(self) -> int:
        return self.q.shape[0]

    @property
    def num_gallery(self) -> int:
        return self.g.shape[0]

    def block(self, start: int) -> torch.Tensor:
        """Distances of queries [start, start + GEMM_BLOCK) (zero-padded to the full block)."""
        assert start % GEMM_BLOCK == 0
        qb = self.q[start:start + GEMM_BLOCK]
        n = qb.shape[0]
        if n < GEMM_BLOCK:  # pad so that every product has the same shape
            qb = torch.cat([qb, qb.new_zeros(GEMM_BLOCK - n, qb.shape[1])])
        d = qb @ self.g.T  # in-place from here on: one (GEMM_BLOCK, G) buffer
        q_sq = (qb * qb).sum(1)
        if self.metric == "cosine":
            d.div_(q_sq.sqrt().clamp_min(1e-12)[:, None]).div_(self.g_norm[None, :])
            d.neg_().add_(1.0)
        else:
            d.mul_(-2.0).add_(q_sq[:, None]).add_(self.g_sq[None, :]).clamp_min_(0.0)
        return d[:n]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """float32 numpy distances of queries [start, stop); start a multiple of GEMM_BLOCK."""
        out = np.empty((stop - start, self.num_gallery), np.float32)
        out_t = torch.from_numpy(out)
        for s in range(start, stop, GEMM_BLOCK):
            b = self.block(s)
            out_t[s - start:s - start + b.shape[0]].copy_(b[: stop - s])
        return out


def pairwise_distance(qf, gf, metric: str = "cosine", device=None) -> np.ndarray:
    """Full (Q, G) float32 distance matrix, computed exactly as ``evaluate_features`` does.

    Memory is Q x G x 4 bytes; use ``evaluate_features`` for large sets.
    """
    db = _DistanceBlocks(qf, gf, metric, device)
    return db.rows(0, db.num_query) if db.num_query else np.zeros((0, db.num_gallery), np.float32)


def _round_chunk(chunk_size: int) -> int:
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    return int(math.ceil(chunk_size / GEMM_BLOCK) * GEMM_BLOCK)
