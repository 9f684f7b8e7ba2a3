"""CMC, mAP and mINP by the Market-1501 protocol (see rga.metrics), over query chunks; and the
ranked gallery list of a query under the same protocol (what figures and searches show)."""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from .distance import _DistanceBlocks, _round_chunk
from .rerank import rerank_distance


def _as_int_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


class _Ranker:
    """Per-query CMC / AP / INP from one distance row at a time."""

    def __init__(self, q_pids, g_pids, q_camids, g_camids, max_rank: int):
        self.q_pids = _as_int_array(q_pids, "q_pids")
        self.g_pids = _as_int_array(g_pids, "g_pids")
        self.q_camids = _as_int_array(q_camids, "q_camids")
        self.g_camids = _as_int_array(g_camids, "g_camids")
        if len(self.q_pids) != len(self.q_camids):
            raise ValueError("q_pids and q_camids differ in length")
        if len(self.g_pids) != len(self.g_camids):
            raise ValueError("g_pids and g_camids differ in length")
        if max_rank < 1:
            raise ValueError("max_rank must be >= 1")
        self.max_rank = int(max_rank)
        nq = len(self.q_pids)
        self.ap = np.full(nq, np.nan)
        self.inp = np.full(nq, np.nan)
        self.first = np.zeros(nq, np.int64)  # 1-based rank of the first true match, 0 = invalid
        # gallery indices of each identity, ascending
        order = np.argsort(self.g_pids, kind="stable")
        pids, starts, counts = np.unique(self.g_pids[order], return_index=True, return_counts=True)
        self.by_pid = {int(p): order[s:s + c] for p, s, c in zip(pids, starts, counts)}

    def add_rows(self, start: int, dist: np.ndarray) -> None:
        if dist.ndim != 2 or dist.shape[1] != len(self.g_pids):
            raise ValueError(f"distance rows have shape {dist.shape}, expected (*, {len(self.g_pids)})")
        srt = np.sort(dist, axis=1)  # NaN sorts last
        if dist.shape[1] and np.isnan(srt[:, -1]).any():
            raise ValueError("distance matrix contains NaN")
        for r in range(dist.shape[0]):
            self._one(start + r, dist[r], srt[r])

    def _one(self, qi: int, row: np.ndarray, srow: np.ndarray) -> None:
        idx = self.by_pid.get(int(self.q_pids[qi]))
        if idx is None:
            return
        d = row[idx]
        left = np.searchsorted(srow, d, side="left")
        right = np.searchsorted(srow, d, side="right")
        pos = left.astype(np.int64)  # 0-based position in the full ranking (stable tie-break)
        for t in np.nonzero(right - left > 1)[0]:
            pos[t] += np.count_nonzero(row[: idx[t]] == d[t])
        removed = self.g_camids[idx] == self.q_camids[qi]
        pos_true = np.sort(pos[~removed])
        n = len(pos_true)
        if n == 0:
            return
        pos_removed = np.sort(pos[removed])
        # 1-based rank once the same-camera items are taken out of the list
        rank = pos_true - np.searchsorted(pos_removed, pos_true) + 1
        hits = np.arange(1, n + 1, dtype=np.float64)
        self.ap[qi] = float(np.sum(hits / rank)) / n
        self.inp[qi] = n / float(rank[-1])
        self.first[qi] = rank[0]

    def result(self) -> Dict[str, object]:
        valid = self.first > 0
        nv = int(valid.sum())
        if nv == 0:
            raise ValueError("no query has a true match (same id, other camera) in the gallery")
        first = self.first[valid]
        counts = np.bincount(np.minimum(first, self.max_rank + 1), minlength=self.max_rank + 2)
        cmc = np.cumsum(counts[1:self.max_rank + 1]) / nv
        return {
            "cmc": cmc.astype(np.float64),
            "mAP": float(np.mean(self.ap[valid])),
            "mINP": float(np.mean(self.inp[valid])),
            "num_valid_queries": nv,
            "num_queries": len(self.first),
            "AP": self.ap.copy(),  # per query, NaN for skipped queries
        }


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  chunk_size: int = 256) -> Dict[str, object]:
    """CMC / mAP / mINP from a (num_query, num_gallery) distance matrix (numpy or torch).

    Returns a dict: "cmc" (float64 array of length max_rank), "mAP", "mINP" (fractions in [0, 1]),
    "num_valid_queries", "num_queries", "AP" (per query; NaN for skipped queries).
    Raises ValueError if no query has a true match.
    """
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach().cpu().numpy()
    distmat = np.asarray(distmat)
    ranker = _Ranker(q_pids, g_pids, q_camids, g_camids, max_rank)
    if distmat.shape != (len(ranker.q_pids), len(ranker.g_pids)):
        raise ValueError(f"distmat has shape {distmat.shape}, expected "
                         f"({len(ranker.q_pids)}, {len(ranker.g_pids)})")
    step = max(1, int(chunk_size))
    for s in range(0, distmat.shape[0], step):
        ranker.add_rows(s, distmat[s:s + step])
    return ranker.result()


def evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, metric: str = "cosine",
                      chunk_size: int = 256, rerank: bool = False, device=None,
                      max_rank: int = 50, k1: int = 20, k2: int = 6,
                      lambda_value: float = 0.3) -> Dict[str, object]:
    """Evaluate query features against gallery features without a full distance matrix.

    qf, gf: (Q, D) and (G, D) float arrays or tensors (pooled or BN feature: the caller's choice;
    not normalised here: "cosine" normalises inside the distance). metric: "cosine" (1 - cos) or
    "euclidean" (squared Euclidean). chunk_size: queries per chunk (rounded up to a multiple of
    GEMM_BLOCK); memory is about chunk_size x G x 9 bytes on top of the features. device: where
    the matrix products run (default: the device of qf if it is a tensor, else CPU); ranking is
    on the CPU. rerank: k-reciprocal re-ranking (needs (Q+G)^2 memory; see rerank_distance).
    The numbers do not depend on chunk_size.
    """
    if rerank:
        dist = rerank_distance(qf, gf, metric=metric, k1=k1, k2=k2, lambda_value=lambda_value,
                               device=device, chunk_size=chunk_size)
        return evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, max_rank, chunk_size)
    db = _DistanceBlocks(qf, gf, metric, device)
    ranker = _Ranker(q_pids, g_pids, q_camids, g_camids, max_rank)
    if len(ranker.q_pids) != db.num_query or len(ranker.g_pids) != db.num_gallery:
        raise ValueError(f"{db.num_query} query / {db.num_gallery} gallery features but "
                         f"{len(ranker.q_pids)} / {len(ranker.g_pids)} labels")
    step = _round_chunk(chunk_size)
    with torch.no_grad():
        for s in range(0, db.num_query, step):
            ranker.add_rows(s, db.rows(s, min(s + step, db.num_query)))
    return ranker.result()


# --------------------------------------------------------------------------------------------
# the ranked list of a query (figures, searches)
# --------------------------------------------------------------------------------------------
def same_camera_matches(gallery_idx, q_pid: int, q_camid: int, g_pids, g_camids) -> np.ndarray:
    """A mask over ``gallery_idx``: the gallery items of the query's identity seen by the query's
    camera, which the protocol removes from the query's ranking. A query of unknown identity (a
    negative pid) or camera has none."""
    gallery_idx = np.asarray(gallery_idx, dtype=np.int64)
    if q_pid < 0 or q_camid < 0:
        return np.zeros(len(gallery_idx), dtype=bool)
    return (np.asarray(g_pids)[gallery_idx] == q_pid) & (np.asarray(g_camids)[gallery_idx] == q_camid)


def ranked_gallery(qf, gf, q_pids, g_pids, q_camids, g_camids, top: int) -> list:
    """Per query, the indices of its `top` nearest gallery items by cosine distance, best first
    (ties by gallery index), without the same-identity same-camera items (same_camera_matches)."""
    qf = torch.nn.functional.normalize(torch.as_tensor(qf).float(), dim=1)
    gf = torch.nn.functional.normalize(torch.as_tensor(gf).float(), dim=1)
    dist = 1 - qf @ gf.T
    out = []
    for i in range(dist.shape[0]):
        order = torch.argsort(dist[i], stable=True).numpy()
        keep = ~same_camera_matches(order, int(q_pids[i]), int(q_camids[i]), g_pids, g_camids)
        out.append(order[keep][:top])
    return out
