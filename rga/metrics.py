"""Re-id evaluation: CMC, mAP and mINP by the Market-1501 protocol, chunked over queries.

Protocol (the one every Market-1501 / CUHK03 / MSMT17 number is reported with):

* For each query, the gallery items with the *same identity and the same camera* as the query are
  removed from its ranking (they would be trivial matches).
* A query with no remaining true match (same identity, other camera) is skipped; the number of
  queries kept is returned as ``num_valid_queries``.
* The remaining gallery is ranked by increasing distance. Ties are ranked pessimistically: within
  a group of equal distances the true matches come after the other items (a tie is never a
  success), so the numbers depend on the distances alone, never on the gallery's order or the
  sorting algorithm. ``num_tied_queries`` counts the queries where a true match ties with
  another item (a warning says so when there are any).
* Features that cannot be ranked are an error (DegenerateFeaturesError), not a number: NaN or
  infinite values, or all features identical (every distance ties; a collapsed or diverged
  model). A distance matrix whose entries are all equal is refused the same way.
* CMC[k] = fraction of valid queries whose first true match is at rank <= k + 1.
* AP is non-interpolated: the mean, over the query's true matches, of the precision at the rank of
  each true match. mAP is the mean AP over valid queries.
* INP = (number of true matches) / (rank of the hardest, i.e. last, true match); mINP is its mean
  over valid queries (Ye et al., "Deep Learning for Person Re-identification: A Survey", 2021).

Memory: nothing of size queries x gallery is ever held. Distances are produced for ``chunk_size``
queries at a time (from the features, or sliced from a given matrix), each row is sorted, and the
rank of each same-identity gallery item is found by binary search in its sorted row. Per-query
results do not depend on the chunking: distances are computed in GEMM blocks of a fixed
``GEMM_BLOCK`` rows at fixed offsets (so every block is the same matrix product whatever the
chunk size), and the per-query arithmetic only ever sees that query's row.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import DegenerateFeaturesError, NoValidQueryError

__all__ = [
    "check_features",
    "evaluate_rank",
    "evaluate_features",
    "pairwise_distance",
    "k_reciprocal_rerank",
    "rerank_distance",
    "GEMM_BLOCK",
]

#: rows of queries per matrix product; chunk sizes are rounded up to a multiple of it
GEMM_BLOCK = 64
_METRICS = ("cosine", "euclidean")


# --------------------------------------------------------------------------------------------
# distances
# --------------------------------------------------------------------------------------------
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
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
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


def _max_row_deviation(x: torch.Tensor, ref: torch.Tensor, unit: bool) -> float:
    """max |row - ref| over the rows of x (rows scaled to unit length first when `unit`), in slices."""
    worst = 0.0
    for xs in x.split(4096):
        if unit:
            xs = xs / xs.norm(dim=1, keepdim=True).clamp_min(1e-12)
        worst = max(worst, float((xs - ref).abs().max())) if len(xs) else worst
    return worst


def check_features(qf, gf, metric: str = "cosine") -> None:
    """Raise DegenerateFeaturesError when query / gallery features cannot be ranked: NaN or
    infinite values, or all of them the same (the same direction, for cosine), so that every
    distance ties and any score would only reflect the gallery's order."""
    q = _as_tensor(qf, qf.device if isinstance(qf, torch.Tensor) else "cpu")
    g = _as_tensor(gf, q.device)
    for name, t in (("query", q), ("gallery", g)):
        bad = (~torch.isfinite(t)).any(1) if len(t) else torch.zeros(0, dtype=torch.bool)
        if bool(bad.any()):
            raise DegenerateFeaturesError(f"{int(bad.sum())} of {len(t)} {name} features hold NaN or Inf; "
                                          "the model's output is not finite (diverged training?)")
    n = len(q) + len(g)
    if n < 2:
        return
    unit = metric == "cosine"
    first = (g if len(g) else q)[:1].to(torch.float64)
    ref = first / first.norm().clamp_min(1e-12) if unit else first
    scale = float(ref.abs().max())
    spread = max(_max_row_deviation(t.to(torch.float64), ref, unit) for t in (q, g))
    if spread <= 1e-6 * max(scale, 1e-30):
        what = "point the same way" if unit and scale > 0 else "are identical"
        raise DegenerateFeaturesError(f"all {n} features ({len(q)} query, {len(g)} gallery) {what}: every "
                                      f"{metric} distance ties, so the ranking would only reflect the gallery's "
                                      "order; the model has collapsed (diverged training?)")


# --------------------------------------------------------------------------------------------
# ranking
# --------------------------------------------------------------------------------------------
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
        self.tied = np.zeros(nq, bool)  # a true match ties with another item
        self.lo, self.hi = np.inf, -np.inf  # the smallest and largest distance seen
        # gallery indices of each identity, ascending
        order = np.argsort(self.g_pids, kind="stable")
        pids, starts, counts = np.unique(self.g_pids[order], return_index=True, return_counts=True)
        self.by_pid = {int(p): order[s:s + c] for p, s, c in zip(pids, starts, counts)}

    def add_rows(self, start: int, dist: np.ndarray) -> None:
        if dist.ndim != 2 or dist.shape[1] != len(self.g_pids):
            raise ValueError(f"distance rows have shape {dist.shape}, expected (*, {len(self.g_pids)})")
        srt = np.sort(dist, axis=1)  # NaN sorts last
        if dist.shape[1] and np.isnan(srt[:, -1]).any():
            raise DegenerateFeaturesError(f"the distance matrix contains NaN ({int(np.isnan(srt[:, -1]).sum())} of "
                                          f"{dist.shape[0]} rows): non-finite features?")
        if dist.size:
            self.lo, self.hi = min(self.lo, float(srt[:, 0].min())), max(self.hi, float(srt[:, -1].max()))
        for r in range(dist.shape[0]):
            self._one(start + r, dist[r], srt[r])

    def _one(self, qi: int, row: np.ndarray, srow: np.ndarray) -> None:
        idx = self.by_pid.get(int(self.q_pids[qi]))
        if idx is None:
            return
        d = row[idx]
        removed = self.g_camids[idx] == self.q_camids[qi]
        d_true = np.sort(d[~removed])  # the true matches' distances
        n = len(d_true)
        if n == 0:
            return
        d_removed = np.sort(d[removed])  # same identity and camera: not in the ranking

        def kept(side):  # per true match: ranked items (removed ones left out) at distance < or <= it
            return (np.searchsorted(srow, d_true, side=side) - np.searchsorted(d_removed, d_true, side=side))

        at_most, below = kept("right"), kept("left")
        # true matches tied with each other, counted from each one's position in d_true
        true_right = np.searchsorted(d_true, d_true, side="right")
        true_left = np.searchsorted(d_true, d_true, side="left")
        # pessimistic ties: the true matches of a tie group take its last places
        rank = at_most - (true_right - 1 - np.arange(n))
        self.tied[qi] = bool(np.any(at_most - below > true_right - true_left))
        hits = np.arange(1, n + 1, dtype=np.float64)
        self.ap[qi] = float(np.sum(hits / rank)) / n
        self.inp[qi] = n / float(rank[-1])
        self.first[qi] = rank[0]

    def result(self) -> Dict[str, object]:
        valid = self.first > 0
        nv = int(valid.sum())
        if nv == 0:
            raise NoValidQueryError(f"no query has a true match (same identity, another camera) in the gallery "
                                    f"({len(self.first)} queries, {len(self.g_pids)} gallery images), so nothing "
                                    "can be scored")
        if self.hi <= self.lo:
            raise DegenerateFeaturesError(f"every distance in the {len(self.first)} x {len(self.g_pids)} matrix is "
                                          f"the same ({self.hi:g}): the ranking would only reflect the gallery's "
                                          "order (collapsed features?)")
        tied = int(self.tied[valid].sum())
        if tied:
            warnings.warn(f"{tied} of {nv} queries have a true match tied with another gallery item at the same "
                          "distance; ties are ranked pessimistically (true matches last)", RuntimeWarning,
                          stacklevel=3)
        first = self.first[valid]
        counts = np.bincount(np.minimum(first, self.max_rank + 1), minlength=self.max_rank + 2)
        cmc = np.cumsum(counts[1:self.max_rank + 1]) / nv
        return {
            "cmc": cmc.astype(np.float64),
            "mAP": float(np.mean(self.ap[valid])),
            "mINP": float(np.mean(self.inp[valid])),
            "num_valid_queries": nv,
            "num_queries": len(self.first),
            "num_tied_queries": tied,
            "AP": self.ap.copy(),  # per query, NaN for skipped queries
        }


def _round_chunk(chunk_size: int) -> int:
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    return int(math.ceil(chunk_size / GEMM_BLOCK) * GEMM_BLOCK)


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
    check_features(qf, gf, metric)
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
# k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with
# k-reciprocal Encoding", CVPR 2017)
# --------------------------------------------------------------------------------------------
def _topk_stable(d: np.ndarray, kk: int) -> np.ndarray:
    """Indices of the kk smallest entries of each row, by distance then index."""
    n = d.shape[1]
    if kk >= n:
        part = np.tile(np.arange(n), (d.shape[0], 1))
    else:
        part = np.argpartition(d, kk - 1, axis=1)[:, :kk]
    part_d = np.take_along_axis(d, part, 1)
    return np.take_along_axis(part, np.lexsort((part, part_d), axis=1), 1)


def _expanded_neighbours(nn: np.ndarray, k1: int, kh: int) -> List[np.ndarray]:
    """R*(p) for every item p from the (N, >= k1 + 1) nearest-neighbour table (self first)."""

    def reciprocal(i: int, k: int) -> np.ndarray:
        fwd = nn[i, :k + 1]
        back = nn[fwd, :k + 1]
        return fwd[np.any(back == i, axis=1)]

    out = []
    for i in range(nn.shape[0]):
        r = reciprocal(i, k1)
        expanded = [r]
        rset = set(r.tolist())
        for j in r:
            rj = reciprocal(int(j), kh)
            if len(rj) and sum(int(x) in rset for x in rj) >= (2.0 / 3.0) * len(rj):
                expanded.append(rj)
        out.append(np.unique(np.concatenate(expanded)))
    return out


def _rerank_params(n: int, k1: int, k2: int) -> Tuple[int, int, int, int]:
    k1 = int(max(1, min(k1, n - 1)))
    kh = int(max(1, round(k1 / 2)))
    k2 = int(max(1, min(k2, n)))
    return k1, kh, k2, min(n, max(k1, kh, k2) + 1)


def k_reciprocal_rerank(dist_all: np.ndarray, num_query: int, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked (num_query, N - num_query) distances from the (N, N) distance matrix of all
    items, queries first. Dense, O(N^2) memory: the plain statement of the method, used as the
    reference for ``rerank_distance``.

    Steps: (1) the distance to itself is set to 0 and each row is divided by its maximum (ranking
    within a row is unchanged; exp(-d) then lies in [1/e, 1]); (2) k-reciprocal neighbours
    R(p, k) = {g in N(p, k) : p in N(g, k)}, with N(p, k) the k + 1 nearest items including p
    (ties by index); (3) expansion: R*(p) = R(p, k1) united with every R(q, round(k1/2)),
    q in R(p, k1), that has at least 2/3 of its members in R(p, k1); (4) V_p[g] = exp(-d(p, g))
    on R*(p), normalised to sum 1; (5) local query expansion: V_p = mean of V over the k2 nearest
    items of p (k2 > 1); (6) Jaccard distance d_J(p, g) = 1 - sum min(V_p, V_g) / sum max(V_p,
    V_g); (7) d* = (1 - lambda) d_J + lambda d.
    """
    d = np.array(dist_all, dtype=np.float32)  # a copy: modified below
    n = d.shape[0]
    if d.shape != (n, n) or not 0 < num_query < n:
        raise ValueError(f"dist_all must be square (N, N) with 0 < num_query < N; got {d.shape}, "
                         f"num_query={num_query}")
    np.fill_diagonal(d, 0.0)  # an item is its own nearest neighbour
    d = d / np.maximum(d.max(axis=1, keepdims=True), 1e-12)
    k1, kh, k2, kk = _rerank_params(n, k1, k2)
    nn = _topk_stable(d, kk)
    V = np.zeros((n, n), dtype=np.float32)
    for i, idx in enumerate(_expanded_neighbours(nn, k1, kh)):
        w = np.exp(-d[i, idx])
        V[i, idx] = w / w.sum()
    if k2 > 1:
        V = np.stack([V[nn[i, :k2]].mean(0) for i in range(n)])
    jac = np.empty((num_query, n - num_query), dtype=np.float32)
    for q in range(num_query):
        smin = np.minimum(V[q][None, :], V[num_query:]).sum(1)
        smax = np.maximum(V[q][None, :], V[num_query:]).sum(1)
        jac[q] = 1.0 - smin / np.maximum(smax, 1e-12)
    return (1.0 - lambda_value) * jac + lambda_value * d[:num_query, num_query:]


def rerank_distance(qf, gf, metric: str = "cosine", k1: int = 20, k2: int = 6,
                    lambda_value: float = 0.3, device=None, chunk_size: int = 256,
                    max_bytes: int = 2 * 1024 ** 3) -> np.ndarray:
    """k-reciprocal re-ranked (Q, G) distances from features, without any (Q+G)^2 matrix.

    Same method as ``k_reciprocal_rerank``; the neighbour lists come from chunked distance rows,
    V is a sparse matrix (about (Q+G) x 2 k1 k2 entries) and the Jaccard distance uses V's
    columns. Memory: the (Q, G) output and two more arrays of that size, plus chunk_size x (Q+G)
    per chunk; above ``max_bytes`` for 3 Q G x 4 bytes it raises MemoryError (MSMT17: 11.5 GB).
    """
    import scipy.sparse as sp

    q = _as_tensor(qf, "cpu" if device is None and not isinstance(qf, torch.Tensor)
                   else (device or qf.device))
    g = _as_tensor(gf, q.device).to(q.dtype)
    nq, ng = q.shape[0], g.shape[0]
    n = nq + ng
    need = 3 * nq * ng * 4 + 4 * _round_chunk(chunk_size) * n * 4
    if need > max_bytes:
        raise MemoryError(f"re-ranking {nq} x {ng} needs about {need / 2**30:.1f} GiB "
                          f"(> max_bytes={max_bytes / 2**30:.1f} GiB)")
    if nq == 0 or ng == 0:
        raise ValueError("re-ranking needs at least one query and one gallery item")
    k1, kh, k2, kk = _rerank_params(n, k1, k2)
    allf = torch.cat([q, g])
    db = _DistanceBlocks(allf, allf, metric, q.device)
    nn = np.empty((n, kk), np.int64)
    rowmax = np.empty(n, np.float32)
    orig = np.empty((nq, ng), np.float32)
    step = _round_chunk(chunk_size)
    with torch.no_grad():
        for s in range(0, n, step):
            e = min(s + step, n)
            d = db.rows(s, e)
            d[np.arange(e - s), np.arange(s, e)] = 0.0
            rowmax[s:e] = np.maximum(d.max(1), 1e-12)
            d /= rowmax[s:e, None]
            nn[s:e] = _topk_stable(d, kk)
            if s < nq:
                orig[s:min(e, nq)] = d[:min(e, nq) - s, nq:]
    # V: exp(-d) on R*(p), rows normalised; distances recomputed (on the CPU, in float32) for the
    # few pairs needed
    feats = allf.float().cpu().numpy()
    sq = db.g_sq.float().cpu().numpy()
    norm = db.g_norm.float().cpu().numpy()
    indptr, indices, data = [0], [], []
    for i, idx in enumerate(_expanded_neighbours(nn, k1, kh)):
        dot = feats[idx] @ feats[i]
        if metric == "cosine":
            di = 1.0 - dot / norm[i] / norm[idx]
        else:
            di = np.maximum(sq[i] + sq[idx] - 2.0 * dot, 0.0)
        di[idx == i] = 0.0
        w = np.exp(-di / rowmax[i])
        indices.append(idx)
        data.append((w / w.sum()).astype(np.float32))
        indptr.append(indptr[-1] + len(idx))
    V = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.array(indptr)),
                      shape=(n, n))
    if k2 > 1:
        A = sp.csr_matrix((np.full(n * k2, 1.0 / k2, np.float32), nn[:, :k2].ravel(),
                           np.arange(0, n * k2 + 1, k2)), shape=(n, n))
        V = (A @ V).tocsr()
    V.sort_indices()
    Vc = V[nq:].tocsc()  # gallery rows, column access
    vsum = np.asarray(V.sum(1)).ravel().astype(np.float32)
    jac = np.empty((nq, ng), np.float32)
    for p in range(nq):
        cols = V.indices[V.indptr[p]:V.indptr[p + 1]]
        vq = V.data[V.indptr[p]:V.indptr[p + 1]]
        starts, stops = Vc.indptr[cols], Vc.indptr[cols + 1]
        lens = stops - starts
        pos = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + \
            np.arange(lens.sum())
        smin = np.bincount(Vc.indices[pos], np.minimum(np.repeat(vq, lens), Vc.data[pos]),
                           minlength=ng).astype(np.float32)
        smax = vsum[p] + vsum[nq:] - smin
        jac[p] = 1.0 - smin / np.maximum(smax, 1e-12)
    jac *= (1.0 - lambda_value)
    orig *= lambda_value
    jac += orig
    return jac


def _bench(argv=None) -> None:
    """Time a random-feature evaluation and report peak RSS:
    python -m rga.metrics --num-query 11659 --num-gallery 82161 --dim 2048"""
    import argparse
    import resource
    import time

    p = argparse.ArgumentParser(description=_bench.__doc__)
    p.add_argument("--num-query", type=int, default=11659)
    p.add_argument("--num-gallery", type=int, default=82161)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--num-ids", type=int, default=3060)
    p.add_argument("--num-cams", type=int, default=15)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--metric", default="cosine", choices=_METRICS)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)

    def status_mib(key):  # VmRSS (now) or VmHWM (peak since the last reset), Linux only
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    rng = np.random.default_rng(0)
    # features built in slices so that generating them never doubles their memory
    gf = np.empty((a.num_gallery, a.dim), np.float32)
    for s in range(0, a.num_gallery, 4096):
        gf[s:s + 4096] = rng.standard_normal((min(4096, a.num_gallery - s), a.dim), np.float32)
    qf = rng.standard_normal((a.num_query, a.dim), np.float32)
    g_pids = rng.integers(0, a.num_ids, a.num_gallery)
    q_pids = rng.integers(0, a.num_ids, a.num_query)
    g_cams = rng.integers(0, a.num_cams, a.num_gallery)
    q_cams = rng.integers(0, a.num_cams, a.num_query)
    reset_peak()
    base = status_mib("VmRSS")
    feat_mib = (gf.nbytes + qf.nbytes) / 2 ** 20
    t0 = time.perf_counter()
    r = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=a.metric,
                          chunk_size=a.chunk_size, device=a.device)
    dt = time.perf_counter() - t0
    print(f"Q={a.num_query} G={a.num_gallery} D={a.dim} chunk={a.chunk_size} "
          f"device={a.device or 'cpu'} threads={torch.get_num_threads()}")
    print(f"features {feat_mib:.0f} MiB; RSS before eval {base:.0f} MiB, peak during eval "
          f"{status_mib('VmHWM'):.0f} MiB, process peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; eval time {dt:.1f} s")
    print(f"mAP={r['mAP']:.4f} R1={r['cmc'][0]:.4f} valid={r['num_valid_queries']}")


if __name__ == "__main__":
    _bench()
