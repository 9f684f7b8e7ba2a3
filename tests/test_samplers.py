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
    for mode in ("one_group", "all_groups"):
        s = RandomIdentityBatchSampler(pids, num_ids=2, num_instances=4, seed=0, mode=mode)
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
    s = RandomIdentityBatchSampler(pids, 2, 4, seed=0, mode="all_groups")
    seen = [i for b in s for i in b]
    assert len(seen) == len(set(seen)) == 80  # 10 ids x 2 groups of 4, all used once


def test_one_group_per_identity_per_epoch():
    pids = make_pids(num_ids=30)  # 1..9 images per identity
    s = RandomIdentityBatchSampler(pids, num_ids=4, num_instances=2, seed=2, mode="one_group")
    for epoch in (0, 1):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == 30 // 4
        ids = [pids[i] for b in batches for i in b[::2]]
        assert len(ids) == len(set(ids)) == 28  # each identity at most once per epoch, 2 left out
        for b in batches:
            assert len(set(pids[i] for i in b)) == 4 and len(b) == 8
    # the other mode uses every group: more batches from the same list
    assert len(RandomIdentityBatchSampler(pids, 4, 2, seed=2, mode="all_groups")) > len(s)


def test_mode_is_checked_and_kept_in_the_state():
    pids = make_pids()
    with pytest.raises(ValueError, match="mode must be one of"):
        RandomIdentityBatchSampler(pids, 4, 2, mode="random")
    a = RandomIdentityBatchSampler(pids, 4, 2, mode="one_group")
    b = RandomIdentityBatchSampler(pids, 4, 2, mode="all_groups")
    with pytest.raises(ValueError, match="for mode 'one_group'"):
        b.load_state_dict(a.state_dict())
    b.load_state_dict({"seed": 3, "epoch": 1})  # a state written before the modes: all groups
    assert b.seed == 3


def public_batches_per_epoch(pids, batch_size, num_instances):
    """What the public RGA code's loader gives per epoch: its RandomIdentitySampler yields
    num_instances indices for each identity once (len = #ids * K), and DataLoader(batch_size,
    drop_last=True) cuts that stream into full batches."""
    return (len(set(pids)) * num_instances) // batch_size


def make_market_train(root, num_ids=751, seed=0):
    """A Market-1501 layout with 751 training identities (2..40 images each, 6 cameras), empty
    query and gallery names enough for the loader. Files are empty: only names are parsed."""
    import random
    rng = random.Random(seed)
    base = root / "Market-1501-v15.09.15"
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (base / sub).mkdir(parents=True)
    n = 0
    for pid in range(1, num_ids + 1):
        for k in range(rng.randint(2, 40)):
            (base / "bounding_box_train" / f"{pid:04d}_c{1 + k % 6}s1_{k:06d}_00.jpg").touch()
            n += 1
    (base / "query" / "1600_c1s1_000001_00.jpg").touch()
    (base / "bounding_box_test" / "1600_c2s1_000001_00.jpg").touch()
    return n


def test_paper_preset_epoch_on_market_layout_matches_public_sampler(tmp_path):
    from rga.config import PRESETS, resolve
    from rga.data import build_dataset
    from rga.train import build_sampler

    n_images = make_market_train(tmp_path)
    cfg = resolve([("preset paper", PRESETS["paper"]), ("test", {"dataset": "market1501",
                                                                 "data_root": str(tmp_path)})])
    ds = build_dataset("market1501", str(tmp_path), verbose=False)
    pids = [int(pid) for _, pid, _ in ds.train]
    assert len(pids) == n_images and len(set(pids)) == 751
    sampler = build_sampler(cfg, pids, rank=0, world_size=1)
    batch = cfg.data.batch_ids * cfg.data.batch_instances
    assert (cfg.data.sampler, batch) == ("one_group", 64)
    expected = public_batches_per_epoch(pids, batch, cfg.data.batch_instances)
    assert expected == 46
    for epoch in (0, 7):
        sampler.set_epoch(epoch)
        assert len(sampler) == len(list(sampler)) == expected
    # the torchreid-style sampler, on the same list, runs several times as many batches per epoch
    cfg.data.sampler = "all_groups"
    assert len(build_sampler(cfg, pids, rank=0, world_size=1)) > 3 * expected
