"""Issue 22: the showcase's pretraining pool shares no identity with the showcase, the validation
split of --val-ids never reads a test image, and the cosine schedule / new-module learning rate."""
import math
from pathlib import Path

import numpy as np
import pytest

from rga import config as C
from rga.data import build_dataset
from rga.data.split import held_out_ids, validation_split
from rga.data.generated import plan
from rga.data.synthetic import _identity
from rga.data.synthetic_scenes import SceneConfig
from rga.schedulers import lr_at


def _cfg(preset: str) -> SceneConfig:
    values = C.resolve([("preset", C.PRESETS[preset])])
    assert values.data.dataset == "synthetic_scenes"
    return SceneConfig(**values.data.dataset_opt)


def _signature(ident: dict) -> tuple:
    """An identity's appearance as a hashable value (colours rounded to 1/100)."""
    return tuple((k, tuple(np.round(np.asarray(v, dtype=float), 2).ravel())) if not isinstance(v, str) else (k, v)
                 for k, v in sorted(ident.items()))


def _appearances(cfg: SceneConfig) -> set:
    pids = {pid for pid, _, _ in plan(cfg)}
    return {_signature(_identity(cfg.seed, pid)) for pid in pids}


def _overlap(a: SceneConfig, b: SceneConfig) -> set:
    return _appearances(a) & _appearances(b)


def test_pretraining_pool_is_disjoint_from_the_showcase_identities():
    pool, show = _cfg("showcase_pretrain"), _cfg("showcase")
    assert pool.seed != show.seed
    # the same geometry (the trunk is pretrained at the showcase's size, on its kind of image)
    for k in ("height", "width", "min_person_height", "max_person_height", "people_prob", "occluder_prob"):
        assert getattr(pool, k) == getattr(show, k), k
    assert len(_appearances(pool)) == pool.num_train_ids + pool.num_test_ids  # every pool identity distinct
    assert not _overlap(pool, show)  # no showcase identity (train or test) in the pool
    # the check can fail: a pool drawn with the showcase's seed shares every showcase identity
    same_seed = SceneConfig(**{**C.PRESETS["showcase_pretrain"]["dataset_opt"], "seed": show.seed})
    assert len(_overlap(same_seed, show)) == show.num_train_ids + show.num_test_ids
    # two folders: generating one set never replaces the other
    roots = {C.PRESETS[p]["data_root"] for p in ("showcase_pretrain", "showcase")}
    assert len(roots) == 2
    # the showcase fine-tunes the pool's trunk
    assert C.PRESETS["showcase"]["pretrained"] == C.PRESETS["showcase_pretrain"]["output_dir"]


def test_runner_keeps_the_pool_out_of_the_showcase_data_root(tmp_path, monkeypatch):
    from rga import experiments as E
    from rga import train as T

    seen = []
    monkeypatch.setattr(T, "train", lambda cfg: seen.append(cfg) or {"R1": 0.0})
    extra = E.ensure_pretrain(tmp_path / "runs", ["--threads", "1"], data_root=str(tmp_path / "d"), log=lambda *_: 0)
    assert extra[-2:] == ["--pretrained", str(tmp_path / "runs" / "trunk")]
    (cfg,) = seen
    assert cfg.data.data_root == str(tmp_path / "d") + "-pool" and cfg.data.dataset_opt["seed"] == 1
    assert cfg.model.variant == "baseline" and (cfg.model.height, cfg.model.width) == (128, 64)


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return build_dataset("synthetic_scenes", str(root), verbose=False, num_train_ids=12, num_test_ids=5,
                         num_distractors=2, height=64, width=32)


def test_validation_split_holds_out_training_identities_only(tiny_scenes):
    ds = tiny_scenes
    val = validation_split(ds, 4)
    test_paths = {p for p, _, _ in ds.query + ds.gallery}
    train_paths = {p for p, _, _ in ds.train}
    used = [p for p, _, _ in val.train + val.query + val.gallery]
    assert set(used) <= train_paths and not set(used) & test_paths
    assert all(Path(p).parent.name == "bounding_box_train" for p in used)
    assert len(used) == len(set(used)) == len(ds.train)  # every training image once, nowhere twice
    # held-out identities are not trained on: their images are not in val.train
    assert not {p for p, _, _ in val.query + val.gallery} & {p for p, _, _ in val.train}
    assert val.num_train_pids == ds.num_train_pids - 4
    assert sorted({p for _, p, _ in val.train}) == list(range(val.num_train_pids))  # relabelled
    # every query has a gallery image of its identity from another camera
    for _, pid, cam in val.query:
        assert any(p == pid and c != cam for _, p, c in val.gallery)
    # the same held-out identities whatever the run (the split does not follow the run's seed)
    assert held_out_ids(ds.train, 4) == held_out_ids(list(reversed(ds.train)), 4)
    with pytest.raises(ValueError):
        validation_split(ds, ds.num_train_pids)


def test_training_with_val_ids_never_reads_a_test_image(tiny_scenes, tmp_path, monkeypatch):
    """The whole run (dataset check, training, evaluation) reads training images only."""
    from rga import train as T
    from rga.data import check as CHK
    from rga.data import images as IM

    read = []
    real = IM.read_image

    def spy(path, *a, **kw):
        read.append(str(path))
        return real(path, *a, **kw)

    for module in (IM, CHK):
        monkeypatch.setattr(module, "read_image", spy)
    import rga.data as D
    monkeypatch.setattr(D, "read_image", spy)
    root = str(Path(tiny_scenes.root).parent)
    metrics = T.train(T.parse_config([
        "--preset", "quick", "--model", "baseline", "--dataset", "synthetic_scenes", "--data-root", root,
        "--dataset-opt", "num_train_ids=12", "--dataset-opt", "num_test_ids=5", "--dataset-opt", "num_distractors=2",
        "--dataset-opt", "height=64", "--dataset-opt", "width=32", "--val-ids", "4", "--epochs", "1",
        "--batch-ids", "4", "--batch-instances", "2", "--output-dir", str(tmp_path / "run"), "--no-progress"]))
    assert metrics and 0 <= metrics["R1"] <= 1
    assert read, "the spy saw no image read (the test would pass vacuously)"
    test_paths = {p for p, _, _ in tiny_scenes.query + tiny_scenes.gallery}
    assert not set(read) & test_paths
    assert all(Path(p).parent.name == "bounding_box_train" for p in read)
    val = validation_split(tiny_scenes, 4)
    assert metrics["num_query"] == len(val.query)


def test_cosine_schedule_and_new_module_learning_rate():
    kw = dict(warmup_epochs=1, warmup_start_lr=1e-5, schedule="cosine", total_epochs=11)
    assert lr_at(0, 1e-3, **kw) == 1e-5
    assert lr_at(1, 1e-3, **kw) == pytest.approx(1e-3)
    assert lr_at(6, 1e-3, **kw) == pytest.approx(0.5e-3)
    assert lr_at(10, 1e-3, **kw) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    lrs = [lr_at(e, 1e-3, **kw) for e in range(1, 11)]
    assert lrs == sorted(lrs, reverse=True)
    # the step schedule is unchanged (the quick preset's)
    assert lr_at(12, 8e-4, warmup_epochs=0, milestones=[10]) == pytest.approx(4e-4)
    with pytest.raises(C.ConfigError):
        C.resolve([("t", {"new_lr_mult": 0})])


def test_new_lr_mult_gives_the_new_modules_their_own_learning_rate(tiny_scenes, tmp_path):
    from rga import train as T
    root = str(Path(tiny_scenes.root).parent)
    cfg = T.parse_config(["--preset", "quick", "--model", "rga_sc", "--dataset", "synthetic_scenes",
                          "--data-root", root, "--dataset-opt", "num_train_ids=12", "--dataset-opt", "num_test_ids=5",
                          "--dataset-opt", "num_distractors=2", "--dataset-opt", "height=64", "--dataset-opt",
                          "width=32", "--new-lr-mult", "4", "--lr", "1e-4", "--output-dir", str(tmp_path / "r")])
    tr = T.Trainer(cfg)
    try:
        tr.open()
        trunk, new = tr.optimizer.param_groups
        assert trunk["lr"] == pytest.approx(1e-4) and new["lr"] == pytest.approx(4e-4)
        names = {id(p): n for n, p in tr.model.named_parameters()}
        assert all(names[id(p)].startswith("backbone.") and "rga_att" not in names[id(p)] for p in trunk["params"])
        assert any("rga_att" in names[id(p)] for p in new["params"]) and \
            any(names[id(p)].startswith("cls") for p in new["params"])
        assert len(trunk["params"]) + len(new["params"]) == len(list(tr.model.parameters()))
    finally:
        tr.close()
    # the quick preset keeps one group (its numbers stay bit for bit)
    assert C.resolve([("q", C.PRESETS["quick"])]).optim.new_lr_mult == 1.0
    assert "schedule" not in C.PRESETS["quick"] and "val_ids" not in C.PRESETS["quick"]
