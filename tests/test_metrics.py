"""Evaluation protocol: hand-computed cases, a naive reference, chunking, re-ranking."""
import numpy as np
import pytest
import torch

from rga.metrics import (GEMM_BLOCK, evaluate_features, evaluate_rank, k_reciprocal_rerank,
                         pairwise_distance, rerank_distance)


def naive_eval(dist, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The protocol written the plain way: one full sort per query, by distance, and within equal
    distances the true matches last (pessimistic ties)."""
    cmc = np.zeros(max_rank)
    aps, inps = [], []
    for i in range(dist.shape[0]):
        order = np.lexsort((g_pids == q_pids[i], dist[i]))
        same = g_pids[order] == q_pids[i]
        keep = ~(same & (g_camids[order] == q_camids[i]))
        match = same[keep]
        if not match.any():
            continue
        ranks = np.nonzero(match)[0] + 1
        aps.append(sum((k + 1) / r for k, r in enumerate(ranks)) / len(ranks))
        inps.append(len(ranks) / ranks[-1])
        if ranks[0] <= max_rank:
            cmc[ranks[0] - 1:] += 1
    return cmc / len(aps), float(np.mean(aps)), float(np.mean(inps)), len(aps)


def hand_case():
    # gallery:     0      1      2      3      4      5
    g_pids = np.array([1, 2, 1, 0, 1, 3])
    g_camids = np.array([0, 1, 1, 1, 2, 0])
    q_pids = np.array([1, 3, 2])
    q_camids = np.array([0, 0, 0])
    dist = np.array([
        # q0 (id 1, cam 0): g0 is same id+cam -> removed; ranking g1 g2* g3 g4* g5
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        # q1 (id 3, cam 0): its only gallery image g5 is in cam 0 -> query skipped
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.0],
        # q2 (id 2, cam 0): g1 first
        [0.5, 0.05, 0.4, 0.3, 0.2, 0.1],
    ], dtype=np.float32)
    return dist, q_pids, g_pids, q_camids, g_camids


def test_hand_computed_case():
    r = evaluate_rank(*hand_case(), max_rank=5)
    # q0: true matches at ranks 2 and 4 (after removing g0): AP = (1/2 + 2/4) / 2, INP = 2/4
    # q2: true match at rank 1: AP = INP = 1
    assert r["num_valid_queries"] == 2
    assert r["num_queries"] == 3
    assert r["mAP"] == pytest.approx((0.5 + 1.0) / 2)
    assert r["mINP"] == pytest.approx((0.5 + 1.0) / 2)
    np.testing.assert_allclose(r["cmc"], [0.5, 1, 1, 1, 1])
    assert len(r["cmc"]) == 5
    assert np.isnan(r["AP"][1]) and r["AP"][0] == pytest.approx(0.5)


def test_same_camera_rule_changes_result():
    dist, qp, gp, qc, gc = hand_case()
    # If q0 were in camera 3, g0 (distance 0.1) would be a valid rank-1 match.
    qc = np.array([3, 0, 0])
    r = evaluate_rank(dist, qp, gp, qc, gc, max_rank=5)
    # q0: matches at ranks 1, 3, 5: AP = (1 + 2/3 + 3/5) / 3, INP = 3/5
    ap0 = (1 + 2 / 3 + 3 / 5) / 3
    assert r["mAP"] == pytest.approx((ap0 + 1) / 2)
    assert r["mINP"] == pytest.approx((3 / 5 + 1) / 2)
    assert r["cmc"][0] == 1.0


def test_distractors_count_as_negatives():
    dist, qp, gp, qc, gc = hand_case()
    # Turn distractor g3 (id 0) into a true match of q0: rank 3 becomes a hit.
    gp = gp.copy()
    gp[3] = 1
    r = evaluate_rank(dist, qp, gp, qc, gc, max_rank=5)
    ap0 = (1 / 2 + 2 / 3 + 3 / 4) / 3
    assert r["mAP"] == pytest.approx((ap0 + 1) / 2)
    assert r["mINP"] == pytest.approx((3 / 4 + 1) / 2)


def test_ties_rank_true_matches_last():
    g_pids = np.array([5, 1, 5, 1, 7])
    g_camids = np.array([1, 1, 1, 1, 1])
    dist = np.array([[0.3, 0.3, 0.3, 0.3, 0.1]], np.float32)  # g4 first, then a tie of four
    with pytest.warns(RuntimeWarning, match="1 of 1 queries have a true match tied"):
        r = evaluate_rank(dist, np.array([1]), g_pids, np.array([0]), g_camids, max_rank=5)
    # the true matches g1, g3 take the tie's last places: ranks 4 and 5
    assert r["mAP"] == pytest.approx((1 / 4 + 2 / 5) / 2)
    np.testing.assert_allclose(r["cmc"], [0, 0, 0, 1, 1])
    assert r["num_tied_queries"] == 1


def test_no_valid_query_raises():
    dist, qp, gp, qc, gc = hand_case()
    with pytest.raises(ValueError, match="no query"):
        evaluate_rank(dist[1:2], qp[1:2], gp, qc[1:2], gc)


def test_bad_shapes_and_nan_raise():
    dist, qp, gp, qc, gc = hand_case()
    with pytest.raises(ValueError):
        evaluate_rank(dist[:, :5], qp, gp, qc, gc)
    bad = dist.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(bad, qp, gp, qc, gc)


def random_problem(seed=0, nq=150, ng=700, dim=32, nid=40, ncam=4):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(nid, dim)).astype(np.float32)
    g_pids = rng.integers(0, nid, ng)
    q_pids = rng.integers(0, nid, nq)
    gf = centers[g_pids] + 1.5 * rng.normal(size=(ng, dim)).astype(np.float32)
    qf = centers[q_pids] + 1.5 * rng.normal(size=(nq, dim)).astype(np.float32)
    gf[10:20] = gf[0]  # exact duplicates -> tied distances
    qf[5] = gf[3]
    return (qf, gf, q_pids, g_pids, rng.integers(0, ncam, nq), rng.integers(0, ncam, ng))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_chunked_equals_unchunked_exactly(metric):
    qf, gf, qp, gp, qc, gc = random_problem()
    full = pairwise_distance(qf, gf, metric)
    ref = evaluate_rank(full, qp, gp, qc, gc, chunk_size=len(qp))
    for cs in (1, GEMM_BLOCK, 100, 10_000):
        r = evaluate_features(qf, gf, qp, gp, qc, gc, metric=metric, chunk_size=cs)
        assert r["mAP"] == ref["mAP"] and r["mINP"] == ref["mINP"]
        assert np.array_equal(r["cmc"], ref["cmc"])
        assert np.array_equal(r["AP"], ref["AP"], equal_nan=True)
    r1 = evaluate_rank(full, qp, gp, qc, gc, chunk_size=7)
    assert r1["mAP"] == ref["mAP"] and np.array_equal(r1["cmc"], ref["cmc"])
    # and the distances a chunk computes are the rows of the full matrix, bit for bit
    assert np.array_equal(pairwise_distance(qf[64:128], gf, metric), full[64:128])
    # against the plain implementation
    cmc, mAP, mINP, nv = naive_eval(full, qp, gp, qc, gc)
    assert nv == ref["num_valid_queries"]
    np.testing.assert_allclose(ref["cmc"], cmc, rtol=0, atol=1e-12)
    assert ref["mAP"] == pytest.approx(mAP, abs=1e-12)
    assert ref["mINP"] == pytest.approx(mINP, abs=1e-12)


def test_distance_definitions():
    qf, gf, *_ = random_problem(nq=20, ng=30)
    q, g = torch.from_numpy(qf).double(), torch.from_numpy(gf).double()
    cos = 1 - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    np.testing.assert_allclose(pairwise_distance(qf, gf, "cosine"), cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(pairwise_distance(qf, gf, "euclidean"),
                               (torch.cdist(q, g) ** 2).numpy(), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError):
        pairwise_distance(qf, gf, "manhattan")


def test_features_accept_torch_tensors():
    qf, gf, qp, gp, qc, gc = random_problem(nq=40, ng=100)
    a = evaluate_features(qf, gf, qp, gp, qc, gc)
    b = evaluate_features(torch.from_numpy(qf), torch.from_numpy(gf), torch.from_numpy(qp),
                          torch.from_numpy(gp), torch.from_numpy(qc), torch.from_numpy(gc))
    assert a["mAP"] == b["mAP"] and 0 <= a["mAP"] <= 1 and 0 <= a["mINP"] <= a["mAP"] + 1e-12


def test_rerank_sanity():
    # two tight clusters per identity, cameras alternate
    rng = np.random.default_rng(1)
    nid, per = 6, 6
    centers = rng.normal(size=(nid, 16)) * 5
    pids = np.repeat(np.arange(nid), per)
    cams = np.tile(np.arange(per), nid) % 3
    feats = (centers[pids] + 0.3 * rng.normal(size=(nid * per, 16))).astype(np.float32)
    qmask = np.arange(nid * per) % per == 0
    qf, gf = feats[qmask], feats[~qmask]
    args = (pids[qmask], pids[~qmask], cams[qmask], cams[~qmask])
    dist = rerank_distance(qf, gf, "euclidean", k1=5, k2=3)
    assert dist.shape == (qf.shape[0], gf.shape[0])
    assert np.isfinite(dist).all() and (dist >= -1e-6).all() and (dist <= 1 + 1e-6).all()
    plain = evaluate_features(qf, gf, *args, metric="euclidean")
    rr = evaluate_features(qf, gf, *args, metric="euclidean", rerank=True, k1=5, k2=3)
    assert plain["mAP"] == 1.0 and rr["mAP"] == 1.0
    # lambda = 1 keeps only the (row-normalised) original distance: the same ranking
    allf = np.concatenate([qf, gf])
    d_all = pairwise_distance(allf, allf, "euclidean")
    only_orig = k_reciprocal_rerank(d_all, len(qf), k1=5, k2=3, lambda_value=1.0)
    order_a = np.argsort(only_orig, axis=1, kind="stable")
    order_b = np.argsort(d_all[:len(qf), len(qf):], axis=1, kind="stable")
    assert np.array_equal(order_a, order_b)
    # lambda = 0: pure Jaccard distance; a query and its own cluster share neighbours
    jac = k_reciprocal_rerank(d_all, len(qf), k1=5, k2=1, lambda_value=0.0)
    same = pids[qmask][:, None] == pids[~qmask][None, :]
    assert jac[same].max() < jac[~same].min()
    with pytest.raises(MemoryError):
        rerank_distance(qf, gf, max_bytes=10)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_rerank_sparse_matches_dense_reference(metric):
    qf, gf, qp, gp, qc, gc = random_problem(seed=3, nq=40, ng=160, dim=16, nid=20)
    gf[10:20] = gf[0] + 1e-3 * np.arange(10)[:, None]  # near-duplicates, not exact ties
    qf[5] = gf[3] + 1e-3
    allf = np.concatenate([qf, gf])
    dense = k_reciprocal_rerank(pairwise_distance(allf, allf, metric), len(qf), k1=8, k2=3)
    for cs in (1, 1000):
        fast = rerank_distance(qf, gf, metric, k1=8, k2=3, chunk_size=cs)
        np.testing.assert_allclose(fast, dense, rtol=0, atol=2e-5)
    plain = evaluate_features(qf, gf, qp, gp, qc, gc, metric=metric)
    rr = evaluate_features(qf, gf, qp, gp, qc, gc, metric=metric, rerank=True, k1=8, k2=3)
    assert rr["num_valid_queries"] == plain["num_valid_queries"]
    assert rr["mAP"] != plain["mAP"]  # it does something


# ------------------------------------------------------------------------------
# degenerate evaluations: identical or NaN features, ties in any gallery order
# ------------------------------------------------------------------------------

def test_identical_features_are_refused():
    from rga.errors import DegenerateFeaturesError
    from rga.metrics import evaluate_features

    q_pids, g_pids = np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3, 0, 1])
    q_cams, g_cams = np.zeros(4, np.int64), np.ones(6, np.int64)
    with pytest.raises(DegenerateFeaturesError, match="all 10 features .* every cosine distance ties"):
        evaluate_features(torch.ones(4, 8), torch.ones(6, 8), q_pids, g_pids, q_cams, g_cams)
    with pytest.raises(DegenerateFeaturesError, match="every euclidean distance ties"):
        evaluate_features(torch.ones(4, 8), torch.ones(6, 8), q_pids, g_pids, q_cams, g_cams, metric="euclidean")
    nan = torch.randn(6, 8)
    nan[2, 3] = float("nan")
    with pytest.raises(DegenerateFeaturesError, match="1 of 6 gallery features hold NaN"):
        evaluate_features(torch.randn(4, 8), nan, q_pids, g_pids, q_cams, g_cams)


def test_ties_do_not_depend_on_the_gallery_order():
    from rga.metrics import evaluate_rank

    # one query (id 1, camera 0); gallery: a clear false match first, then a tie of four items,
    # two of them true matches
    dist = np.array([[0.3, 0.3, 0.3, 0.3, 0.1, 0.9]], np.float32)
    g_pids, g_cams = np.array([5, 1, 5, 1, 7, 1]), np.ones(6, np.int64)
    results = []
    for perm in ([0, 1, 2, 3, 4, 5], [1, 3, 0, 2, 4, 5], [5, 4, 3, 2, 1, 0]):
        with pytest.warns(RuntimeWarning, match="1 of 1 queries have a true match tied"):
            r = evaluate_rank(dist[:, perm], np.array([1]), g_pids[perm], np.array([0]), g_cams[perm], max_rank=6)
        results.append((r["mAP"], tuple(r["cmc"]), r["num_tied_queries"]))
    assert len(set(results)) == 1, results
    # pessimistic: the true matches take the tie's last places (ranks 4, 5), then rank 6
    assert results[0][0] == pytest.approx((1 / 4 + 2 / 5 + 3 / 6) / 3)
