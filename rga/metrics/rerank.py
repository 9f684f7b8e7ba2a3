"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017): from a full distance matrix, or from features in chunks."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch

from .distance import _DistanceBlocks, _as_tensor, _round_chunk


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
