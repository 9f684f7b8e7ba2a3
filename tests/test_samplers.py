from collections import Counter

import pytest

from rga.samplers import RandomIdentityBatchSampler


def make_pids(num_ids=20, seed=0):
    # identities with 1..9 images each, interleaved like a real list
    import random
    rng = random.Random(seed)
    pids = [pid for pid in range(num_ids) for _ in range(1 + pid % 9)]
    rng.shuffle(pids)
    return pids


def test_pk_batches_have_p_ids_times_k():
    pids = make_pids()
    s = RandomIdentityBatchSampler(pids, num_ids=4, num_instances=3, seed=1)
    batches = list(s)
    assert len(batches) == len(s) > 0
    for b in batches:
        assert len(b) == 12
        counts = Counter(pids[i] for i in b)
        assert len(counts) == 4 and set(counts.values()) == {3}


def test_identity_with_few_images_is_topped_up():
    pids = [0] + [1] * 4 + [2] * 4 + [3] * 4
    s = RandomIdentityBatchSampler(pids, num_ids=2, num_instances=4, seed=0)
    seen = [i for b in s for i in b]
    assert seen.count(0) in (0, 4)  # sampled with replacement when chosen


def test_epochs_differ_and_are_reproducible():
    pids = make_pids()
    a = RandomIdentityBatchSampler(pids, 4, 2, seed=3)
    b = RandomIdentityBatchSampler(pids, 4, 2, seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    assert list(a) == list(b)
    b.set_epoch(6)
    assert list(a) != list(b)
    c = RandomIdentityBatchSampler(pids, 4, 2, seed=4)
    c.set_epoch(5)
    assert list(a) != list(c)


def test_state_dict_round_trip():
    pids = make_pids()
    a = RandomIdentityBatchSampler(pids, 4, 2, seed=7)
    a.set_epoch(11)
    b = RandomIdentityBatchSampler(pids, 4, 2, seed=0)
    b.load_state_dict(a.state_dict())
    assert list(a) == list(b)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_identities_and_same_length(world):
    pids = make_pids(num_ids=30)
    samplers = [RandomIdentityBatchSampler(pids, 3, 2, seed=9, rank=r, world_size=world) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    lengths = {len(s) for s in samplers}
    assert len(lengths) == 1
    per_rank = [list(s) for s in samplers]
    assert len({len(x) for x in per_rank}) == 1 and len(per_rank[0]) == lengths.pop() > 0
    for step in zip(*per_rank):
        ids = [set(pids[i] for i in b) for b in step]
        for b, idset in zip(step, ids):
            assert len(b) == 6 and len(idset) == 3
        union = set().union(*ids)
        assert len(union) == 3 * world  # disjoint across ranks


def test_single_rank_equals_union_view():
    # rank blocks are slices of one global batch list
    pids = make_pids(num_ids=30)
    g = RandomIdentityBatchSampler(pids, 3, 2, seed=1, rank=0, world_size=2)
    g.set_epoch(0)
    glob = g.global_batches()
    r1 = RandomIdentityBatchSampler(pids, 3, 2, seed=1, rank=1, world_size=2)
    r1.set_epoch(0)
    assert list(r1) == [b[6:12] for b in glob]


def test_too_few_identities_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 8 training identities"):
        RandomIdentityBatchSampler([0, 1, 2, 3, 4], num_ids=4, num_instances=2, world_size=2)


def test_every_image_used_roughly_once_per_epoch():
    pids = [p for p in range(10) for _ in range(8)]
    s = RandomIdentityBatchSampler(pids, 2, 4, seed=0)
    seen = [i for b in s for i in b]
    assert len(seen) == len(set(seen)) == 80  # 10 ids x 2 groups of 4, all used once
