"""The synthetic dataset: deterministic, Market-1501 layout, masks, regeneration on change, and
`python -m rga.data synthetic` refusing a folder it did not write or a set a run is using."""
import gc
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rga.data.synthetic as syn
from rga.data import build_dataset, mask_path, parse_market_name
from testkit import REPO, SUBPROCESS_ENV, TINY_DATA, build_tiny_dataset, one_error_line

SMALL = dict(num_train_ids=4, num_test_ids=4, num_cameras=3, max_cams_per_id=3,
             max_imgs_per_cam=3, num_distractors=3, height=64, width=32)


def tree_bytes(d: Path):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    a = syn.generate_synthetic(tmp_path / "a", syn.SyntheticConfig(**SMALL))
    b = syn.generate_synthetic(tmp_path / "b", syn.SyntheticConfig(**SMALL))
    c = syn.generate_synthetic(tmp_path / "c", syn.SyntheticConfig(**SMALL, seed=1))
    ta, tb, tc = tree_bytes(a), tree_bytes(b), tree_bytes(c)
    assert len(ta) > 50
    assert ta == tb
    common = set(ta) & set(tc)
    assert sum(ta[k] != tc[k] for k in common if k.endswith(".jpg")) > 0.9 * sum(
        k.endswith(".jpg") for k in common)


def test_layout_masks_and_protocol(tmp_path):
    ds = build_dataset("synthetic", tmp_path, verbose=False, **SMALL)
    root = tmp_path / "synthetic"
    for d in ("bounding_box_train", "query", "bounding_box_test"):
        assert (root / d).is_dir()
    assert ds.num_unparsed == 0
    assert ds.num_train_pids == 4 and sorted({p for _, p, _ in ds.train}) == [0, 1, 2, 3]
    assert ds.num_train_cams <= 3
    for path, _, _ in ds.train + ds.query + ds.gallery:
        name = Path(path).name
        assert parse_market_name(name) is not None
        img, m = Image.open(path), Image.open(mask_path(path))
        assert img.size == (32, 64) and m.size == (32, 64) and m.mode == "L"
        assert set(np.unique(np.asarray(m))) <= {0, 255}
    # test ids: >= 2 cameras, one query per camera, every query has a cross-camera gallery match
    gal = defaultdict(set)
    for _, pid, cam in ds.gallery:
        gal[pid].add(cam)
    seen = set()
    for _, pid, cam in ds.query:
        assert (pid, cam) not in seen
        seen.add((pid, cam))
        assert gal[pid] - {cam}
    assert {p for _, p, _ in ds.query} == set(range(5, 9))
    assert sum(p == 0 for _, p, _ in ds.gallery) == 3  # distractors
    # test identities are not training identities (compare the ids in the file names: train pids
    # are relabelled, query pids are not)
    train_file_ids = {parse_market_name(Path(p).name)[0] for p, _, _ in ds.train}
    assert train_file_ids and not train_file_ids & {p for _, p, _ in ds.query}
    # masks cover a person-sized part of the image (not empty, not everything)
    cover = [np.asarray(Image.open(mask_path(p))).mean() / 255 for p, _, _ in ds.query]
    assert 0.05 < np.median(cover) < 0.6


def test_cameras_differ(tmp_path):
    ds = build_dataset("synthetic", tmp_path, verbose=False, **{**SMALL, "num_train_ids": 12})
    by_cam = defaultdict(list)
    for p, _, c in ds.train:
        by_cam[c].append(np.asarray(Image.open(p), np.float32).mean((0, 1)))
    means = np.array([np.mean(v, 0) for v in by_cam.values()])
    assert len(means) == 3
    # mean colour of each camera's images differs (scene + lighting)
    assert np.abs(means[:, None] - means[None]).max() > 10


def test_reuse_and_regenerate_on_config_change(tmp_path, monkeypatch):
    build_dataset("synthetic", tmp_path, verbose=False, **SMALL)
    marker = tmp_path / "synthetic" / syn.MARKER
    assert json.loads(marker.read_text())["num_train_ids"] == 4
    real = syn.generate_synthetic
    calls = []
    monkeypatch.setattr(syn, "generate_synthetic", lambda *a: calls.append(a) or real(*a))
    build_dataset("synthetic", tmp_path, verbose=False, **SMALL)
    assert calls == []  # reused
    ds = build_dataset("synthetic", tmp_path, verbose=False, **{**SMALL, "num_train_ids": 5})
    assert len(calls) == 1 and ds.num_train_pids == 5
    assert json.loads(marker.read_text())["num_train_ids"] == 5
    assert not list(tmp_path.glob(".synthetic.tmp-*"))
    # a generation killed midway leaves its temporary folder: removed by the next call, which
    # reuses the dataset as it is
    left = tmp_path / ".synthetic.tmp-999999"
    (left / "query").mkdir(parents=True)
    (left / "query" / "x.jpg").write_bytes(b"x" * 100)
    build_dataset("synthetic", tmp_path, verbose=False, **{**SMALL, "num_train_ids": 5})
    assert not left.exists() and len(calls) == 1


def test_bad_options(tmp_path):
    with pytest.raises(TypeError, match="unknown synthetic"):
        build_dataset("synthetic", tmp_path, num_ids=3)
    with pytest.raises(ValueError):
        build_dataset("synthetic", tmp_path, min_cams_per_id=1)
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "mine.txt").write_text("not generated by rga")
    with pytest.raises(FileExistsError):
        build_dataset("synthetic", tmp_path, verbose=False, **SMALL)
    assert (tmp_path / "synthetic" / "mine.txt").exists()


def test_concurrent_processes_generate_once(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from rga.data import build_dataset; "
            f"ds = build_dataset('synthetic', sys.argv[1], **{SMALL!r}); print('N', len(ds.train))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("=> generating") for o in outs) == 1
    assert len({o.splitlines()[-1] for o in outs}) == 1 and outs[0].splitlines()[-1] != "N 0"


def test_data_command_over_a_foreign_folder(tmp_path):
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "mine.txt").write_text("keep me")
    res = subprocess.run([sys.executable, "-m", "rga.data", "synthetic", str(tmp_path)], env=SUBPROCESS_ENV, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert line.startswith("rga.data: error: ") and "has no synthetic_config.json" in line
    assert (tmp_path / "synthetic" / "mine.txt").exists()


def test_a_generated_set_in_use_is_not_replaced(tmp_path):
    ds = build_tiny_dataset(tmp_path)  # a live dataset object: what a training run holds
    image = Path(ds.train[0][0])
    before = image.read_bytes()
    regenerate = [sys.executable, "-m", "rga.data", "synthetic", str(tmp_path), *TINY_DATA, "seed=1", "--no-images"]
    r = subprocess.run(regenerate, env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    line = one_error_line(r.stderr)
    assert f"refusing to replace {tmp_path / 'synthetic'}: a training run" in line, line
    marker = tmp_path / "synthetic" / "synthetic_config.json"
    assert image.read_bytes() == before and '"seed": 0' in marker.read_text()
    del ds
    gc.collect()
    r = subprocess.run(regenerate, env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]  # nobody uses it any more: replaced
    assert '"seed": 1' in marker.read_text()
