"""The ``synthetic_scenes`` set: people at varying position and scale among clutter, other people
and occluders; masks of the target only; layout, protocol, determinism, loader and CLI."""
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

import rga.data.synthetic as syn
import rga.data.synthetic_scenes as sc
from rga.data import build_dataset, mask_path, parse_market_name

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_train_ids=4, num_test_ids=4, num_cameras=3, max_cams_per_id=3,
             max_imgs_per_cam=3, num_distractors=3)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return build_dataset("synthetic_scenes", root, verbose=False, **SMALL)


@pytest.fixture(scope="module")
def old_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("old")
    return build_dataset("synthetic", root, verbose=False, **SMALL, height=128, width=64)


def mask_stats(ds):
    """Per image: mask area fraction, bbox centre-x / width, bbox height / image height."""
    out = []
    for p, _, _ in ds.train + ds.query + ds.gallery:
        m = np.asarray(Image.open(mask_path(p))) > 0
        ys, xs = np.nonzero(m)
        H, W = m.shape
        out.append((m.mean(), (xs.min() + xs.max() + 1) / 2 / W, (ys.max() - ys.min() + 1) / H))
    return np.array(out)


def test_placement_varies_and_masks_are_smaller_than_the_old_sets(scenes, old_set):
    new, old = mask_stats(scenes), mask_stats(old_set)
    assert len(new) == len(old) > 40  # same plan, so the same number of images
    # horizontal position: spread over the frame, several times the old set's jitter
    assert new[:, 1].std() > 0.07 and new[:, 1].std() > 2 * old[:, 1].std()
    assert new[:, 1].min() < 0.4 and new[:, 1].max() > 0.6
    # height: a real range (the old set: 78-93% of the frame)
    h = new[:, 2]
    assert np.percentile(h, 90) - np.percentile(h, 10) > 0.2
    assert h.min() < 0.5 and np.median(h) < np.median(old[:, 2]) - 0.1
    # the person is a smaller part of the image
    assert 0.04 < new[:, 0].mean() < 0.25 and new[:, 0].mean() < 0.7 * old[:, 0].mean()
    assert new[:, 0].min() > 0.01  # never (almost) empty


def _scene_samples(n, **kw):
    cfg = sc.SceneConfig(**{**SMALL, **kw})
    cams = sc.scene_cameras(cfg)
    for i in range(n):
        ident = syn._identity(cfg.seed, 1 + i % 7)
        img, mask, lay = sc.render_scene(ident, cams[i % len(cams)], cfg, syn._rng(cfg.seed, 99, i))
        yield cfg, cams[i % len(cams)], img, mask, lay


def _dilate(mask, px):
    return np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(2 * px + 1))) > 0


def test_mask_is_where_the_target_is_drawn():
    checked = 0
    for cfg, cam, img, mask, lay in _scene_samples(12):
        full, _ = sc.finish_layout(lay, cam, cfg)
        assert np.array_equal(full, img)  # the layout reproduces the image
        without, _ = sc.finish_layout(lay, cam, cfg, skip=(sc.TARGET,))
        diff = np.abs(full.astype(int) - without.astype(int)).max(-1)
        m = mask > 0
        H, W = m.shape
        assert 0.01 < m.mean() < 0.5 and (img.shape[:2] == (H, W) == (cfg.height, cfg.width))
        # (nearly) every mask pixel changes when the target is left out ...
        assert (diff[m] > 8).mean() > 0.85
        # ... and nothing changes away from it (same camera noise: exactly 0 beyond the blur)
        assert diff[~_dilate(mask, 3)].max() == 0
        checked += 1
    assert checked == 12


def test_other_people_and_occluders_are_outside_the_mask():
    with_others = with_occ = covered = occluded = 0
    n = 40
    for cfg, cam, img, mask, lay in _scene_samples(n):
        roles = [o["role"] for o in lay["objects"]]
        with_others += sc.OTHER in roles
        with_occ += sc.OCCLUDER in roles
        _, owner = sc.finish_layout(lay, cam, cfg)
        # pixels wholly owned by another person or an occluder (all 4 sub-pixels) are not in the mask
        blocks = owner.reshape(cfg.height, 2, cfg.width, 2).transpose(0, 2, 1, 3).reshape(
            cfg.height, cfg.width, 4)
        others = np.isin(blocks, (sc.OTHER, sc.OCCLUDER)).all(-1)
        assert not (others & (mask > 0)).any()
        covered += others.sum()
        # something in front of the target hides part of it
        _, alone = sc.finish_layout(lay, cam, cfg, skip=(sc.OTHER, sc.OCCLUDER))
        hidden = ((alone == sc.TARGET) & (owner != sc.TARGET)).sum()
        assert hidden <= 0.45 * (alone == sc.TARGET).sum() + 1  # never hidden too much
        occluded += hidden > 0
    assert with_others > 0.4 * n and with_occ > 0.15 * n and occluded > 0.1 * n
    assert covered > 0.05 * n * cfg.height * cfg.width  # they are really in the frame


def test_backgrounds_differ_per_camera_and_per_image():
    cfg = sc.SceneConfig(**SMALL)
    cams = sc.scene_cameras(cfg)
    pans = [c["background"].mean((0, 1)) for c in cams]
    assert max(np.abs(a - b).max() for a in pans for b in pans) > 10
    # two images of the same person in the same camera: different scene windows and clutter
    ident = syn._identity(0, 1)
    a = sc.render_scene(ident, cams[0], cfg, syn._rng(0, 1))
    b = sc.render_scene(ident, cams[0], cfg, syn._rng(0, 2))
    bg = (a[1] == 0) & (b[1] == 0)
    assert np.abs(a[0].astype(int) - b[0].astype(int))[bg].mean() > 20


def test_same_seed_same_files_other_seed_differs(tmp_path):
    small = {**SMALL, "num_train_ids": 2, "num_test_ids": 2}
    files = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        d = sc.generate_scenes(tmp_path / name, sc.SceneConfig(**small, seed=seed))
        files.append({str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
                      if p.is_file()})
    a, b, c = files
    assert len(a) > 20 and a == b
    jpgs = [k for k in set(a) & set(c) if k.endswith(".jpg")]
    assert sum(a[k] != c[k] for k in jpgs) == len(jpgs) > 0


def test_layout_protocol_and_marker(scenes):
    root = Path(scenes.root)
    assert root.name == "synthetic_scenes" and scenes.name == "synthetic_scenes"
    marker = json.loads((root / sc.MARKER).read_text())
    assert marker["generator"] == "scenes" and marker["generator_version"] == sc.GENERATOR_VERSION
    assert marker["num_train_ids"] == 4 and marker["min_person_height"] == 0.45
    assert scenes.num_unparsed == 0 and scenes.num_train_pids == 4
    for path, _, _ in scenes.train + scenes.query + scenes.gallery:
        assert parse_market_name(Path(path).name) is not None
        img, m = Image.open(path), Image.open(mask_path(path))
        assert img.size == (64, 128) and m.size == (64, 128) and m.mode == "L"
        assert set(np.unique(np.asarray(m))) == {0, 255}
    gal = defaultdict(set)
    for _, pid, cam in scenes.gallery:
        gal[pid].add(cam)
    seen = set()
    for _, pid, cam in scenes.query:
        assert (pid, cam) not in seen
        seen.add((pid, cam))
        assert gal[pid] - {cam}, f"query {pid} cam {cam} has no cross-camera gallery image"
    assert {p for _, p, _ in scenes.query} == set(range(5, 9))
    assert sum(p == 0 for _, p, _ in scenes.gallery) == 3


def test_reuse_regenerate_and_bad_options(tmp_path, monkeypatch):
    small = {**SMALL, "num_train_ids": 2, "num_test_ids": 2, "num_distractors": 1}
    build_dataset("synthetic_scenes", tmp_path, verbose=False, **small)
    calls = []
    real = sc.generate_scenes
    monkeypatch.setattr(sc, "generate_scenes", lambda *a: calls.append(a) or real(*a))
    build_dataset("synthetic_scenes", tmp_path, verbose=False, **small)
    assert calls == []
    ds = build_dataset("synthetic_scenes", tmp_path, verbose=False, **{**small, "people_prob": 0.2})
    assert len(calls) == 1 and ds.config.people_prob == 0.2
    assert not list(tmp_path.glob(".synthetic_scenes.tmp-*"))
    with pytest.raises(TypeError, match="unknown synthetic_scenes"):
        build_dataset("synthetic_scenes", tmp_path, num_ids=3)
    with pytest.raises(ValueError):
        build_dataset("synthetic_scenes", tmp_path, min_person_height=0.9, max_person_height=0.5)
    with pytest.raises(TypeError):
        build_dataset("synthetic_scenes", tmp_path, people_prob="often")


def test_loads_as_rga_train_loads_it(tmp_path):
    from rga import config as C
    from rga.cli import load_dataset

    data = C.DataConfig(dataset="synthetic_scenes", data_root=str(tmp_path),
                        dataset_opt={**SMALL, "num_train_ids": 2, "num_test_ids": 2})
    ds = load_dataset(data)
    assert ds.name == "synthetic_scenes" and ds.num_train_pids == 2 and len(ds.query) >= 4
    assert Path(mask_path(ds.query[0][0])).is_file()


def test_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rga.data", "synthetic_scenes", str(tmp_path),
                          "num_train_ids=2", "num_test_ids=2", "num_distractors=1",
                          "num_cameras=2", "max_cams_per_id=2", "max_imgs_per_cam=2"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "synthetic_scenes" in out.stdout and "images decode" in out.stdout
    assert (tmp_path / "synthetic_scenes" / sc.MARKER).is_file()
