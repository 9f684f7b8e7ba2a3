"""Re-id evaluation: CMC, mAP and mINP by the Market-1501 protocol, chunked over queries.

Protocol (the one every Market-1501 / CUHK03 / MSMT17 number is reported with):

* For each query, the gallery items with the *same identity and the same camera* as the query are
  removed from its ranking (they would be trivial matches).
* A query with no remaining true match (same identity, other camera) is skipped; the number of
  queries kept is returned as ``num_valid_queries``.
* The remaining gallery is ranked by increasing distance. Ties are broken by gallery index (the
  order of a stable sort), so results never depend on the sorting algorithm.
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

One file per job: ``distance.py`` (query-to-gallery distances in fixed GEMM blocks), ``rank.py``
(CMC / mAP / mINP, and ``ranked_gallery``: a query's ranked list under the protocol, used by
rga.visualize and rga.search), ``rerank.py`` (k-reciprocal re-ranking). ``python -m rga.metrics``
times an MSMT17-sized evaluation.
"""
from .distance import GEMM_BLOCK, pairwise_distance
from .rank import evaluate_features, evaluate_rank, ranked_gallery, same_camera_matches
from .rerank import k_reciprocal_rerank, rerank_distance

__all__ = [
    "evaluate_rank",
    "evaluate_features",
    "pairwise_distance",
    "k_reciprocal_rerank",
    "rerank_distance",
    "ranked_gallery",
    "same_camera_matches",
    "GEMM_BLOCK",
]
