"""Dataset parsers on small fabricated folders of each layout, the image-reading Dataset, and the
cross-camera pre-flight of rga.data.check."""
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

import rga.data.datasets as dsmod
import rga.train as rtrain
from rga.data import (DatasetLayoutError, ImageDataset, ImageReadError, build_dataset,
                      parse_market_name)
from testkit import broken_copy, one_error_line, quick_market_args


def blank_jpg(path: Path, size=(8, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 80, 40)).save(path)


# ---------------------------------------------------------------------------------------------
# Market-1501
# ---------------------------------------------------------------------------------------------
MARKET_FILES = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg",
                           "0007_c3s3_012345_02.jpg", "-1_c1s1_000001_00.jpg", "badname.jpg",
                           "0007_c3.jpg", "Thumbs.db"],
    "query": ["0003_c1s1_000001_00.jpg", "0003_c4s2_000002_00.jpg"],
    "bounding_box_test": ["0003_c2s1_000003_00.jpg", "0000_c1s1_000004_00.jpg",
                          "-1_c3s1_000005_00.jpg", "0004_c6s1_000006_00.jpg"],
}


def make_market(base: Path):
    for folder, names in MARKET_FILES.items():
        for n in names:
            if n.endswith(".db"):
                (base / folder / n).write_bytes(b"x")
            else:
                blank_jpg(base / folder / n)


@pytest.mark.parametrize("sub", ["Market-1501-v15.09.15", ""])
def test_market_layouts(tmp_path, sub, capsys):
    make_market(tmp_path / sub if sub else tmp_path)
    with pytest.warns(UserWarning, match="did not parse"):
        ds = build_dataset("market1501", tmp_path)
    out = capsys.readouterr().out
    assert "train" in out and "gallery" in out and "# cameras" in out
    names = lambda items: sorted(Path(p).name for p, _, _ in items)  # noqa: E731
    # junk (-1) dropped everywhere, distractor (0) kept in the gallery
    assert names(ds.train) == ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg",
                               "0007_c3s3_012345_02.jpg"]
    assert sorted((Path(p).name, pid, c) for p, pid, c in ds.train) == [
        ("0002_c1s1_000451_03.jpg", 0, 0), ("0002_c2s1_000551_01.jpg", 0, 1),
        ("0007_c3s3_012345_02.jpg", 1, 2)]
    assert ds.num_train_pids == 2 and ds.num_train_cams == 3
    assert sorted((pid, c) for _, pid, c in ds.query) == [(3, 0), (3, 3)]
    assert sorted((pid, c) for _, pid, c in ds.gallery) == [(0, 0), (3, 1), (4, 5)]
    assert ds.unparsed == {"train": ["0007_c3.jpg", "badname.jpg"]}
    assert ds.num_unparsed == 2
    assert ds.dropped["junk (pid -1)"] == 2
    assert ds.dropped["non-image files"] == 1
    assert all(Path(p).exists() for p, _, _ in ds.train + ds.query + ds.gallery)


def test_market_name_parser():
    assert parse_market_name("1501_c6s4_001877_02.jpg") == (1501, 5)
    assert parse_market_name("-1_c1s1_000001_00.jpg") == (-1, 0)
    assert parse_market_name("0001_c0s1_000001_00.jpg") is None  # cameras start at 1
    assert parse_market_name("0001_c1s1_000001_00.txt") is None
    assert parse_market_name("x0001_c1s1_000001_00.jpg") is None


def test_market_missing_folder(tmp_path):
    make_market(tmp_path / "Market-1501-v15.09.15")
    for f in (tmp_path / "Market-1501-v15.09.15" / "query").iterdir():
        f.unlink()
    (tmp_path / "Market-1501-v15.09.15" / "query").rmdir()
    with pytest.raises(FileNotFoundError) as e:
        build_dataset("market1501", tmp_path)
    assert isinstance(e.value, DatasetLayoutError)
    assert "Expected Market-1501 layout" in str(e.value) and "bounding_box_test" in str(e.value)


def test_unknown_dataset_and_option(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("viper", tmp_path)
    make_market(tmp_path)
    with pytest.raises(TypeError):
        build_dataset("market1501", tmp_path, verbose=False, height=256)


# ---------------------------------------------------------------------------------------------
# CUHK03 (new protocol)
# ---------------------------------------------------------------------------------------------
PIDS_PER_PAIR = (3, 2)


def cuhk_image(variant_code, pair, pid, k):
    img = np.zeros((12, 6, 3), np.uint8)  # H x W x 3 as MATLAB holds it
    img[..., 0] = 50 * pair + pid
    img[..., 1] = 20 * k
    img[..., 2] = variant_code
    img[0, :, :] = 255  # top row, to check the orientation
    return img


def make_cuhk03(root: Path):
    """cuhk-03.mat as MATLAB v7.3 writes it: 'labeled'/'detected' = 1x5 cells (here 1x2) of
    (num_pids x 10) cells of images, stored transposed in HDF5, empty cells as 2-element arrays.
    Plus the new-protocol config files. Returns the expected (name, label) lists."""
    rel = root / "cuhk03_release"
    rel.mkdir(parents=True)
    with h5py.File(rel / "cuhk-03.mat", "w") as f:
        for code, variant in enumerate(("labeled", "detected")):
            pair_refs = []
            for pair, n in enumerate(PIDS_PER_PAIR):
                refs = np.empty((10, n), dtype=h5py.ref_dtype)
                for pid in range(n):
                    for k in range(10):
                        key = f"#refs#/{variant}_{pair}_{pid}_{k}"
                        if pid == 0 and k in (3, 8):  # missing images
                            d = f.create_dataset(key, data=np.zeros(2, np.uint64))
                        else:
                            d = f.create_dataset(key, data=cuhk_image(code, pair, pid, k).T)
                        refs[k, pid] = d.ref
                pair_refs.append(f.create_dataset(f"#refs#/{variant}_pair{pair}", data=refs).ref)
            top = np.empty((1, len(PIDS_PER_PAIR)), dtype=h5py.ref_dtype)
            top[0, :] = pair_refs
            f.create_dataset(variant, data=top)
    names, labels, cams = [], [], []
    for pair, n in enumerate(PIDS_PER_PAIR):
        for pid in range(n):
            for k in range(10):
                if pid == 0 and k in (3, 8):
                    continue
                view = 1 if k < 5 else 2
                names.append(f"{pair + 1}_{pid + 1:03d}_{view}_{k + 1:02d}.png")
                labels.append(100 * (pair + 1) + pid + 1)
                cams.append(view)
    names, labels, cams = np.array(names), np.array(labels), np.array(cams)
    train = np.nonzero(labels < 200)[0]
    test = np.nonzero(labels >= 200)[0]
    first_of_view = {}
    for i in test:
        first_of_view.setdefault((labels[i], cams[i]), i)
    query = np.array(sorted(first_of_view.values()))
    gallery = np.array([i for i in test if i not in set(query.tolist())])
    filelist = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        filelist[i, 0] = n
    for variant in ("labeled", "detected"):
        scipy.io.savemat(root / f"cuhk03_new_protocol_config_{variant}.mat", {
            "train_idx": (train + 1)[:, None], "query_idx": (query + 1)[:, None],
            "gallery_idx": (gallery + 1)[:, None], "labels": labels[:, None],
            "filelist": filelist, "camId": cams[:, None]})
    return names, labels, train, query, gallery


def test_cuhk03_labeled_and_detected(tmp_path, monkeypatch):
    names, labels, train, query, gallery = make_cuhk03(tmp_path)
    ds = build_dataset("cuhk03", tmp_path, verbose=False)  # labeled by default
    assert ds.name == "cuhk03_labeled"
    assert len(ds.train) == len(train) and len(ds.query) == len(query)
    assert len(ds.gallery) == len(gallery)
    assert ds.num_train_pids == PIDS_PER_PAIR[0] and ds.num_train_cams == 2
    assert sorted({p for _, p, _ in ds.train}) == [0, 1, 2]
    assert sorted({p for _, p, _ in ds.query}) == [201, 202]
    assert {c for _, _, c in ds.query} == {0, 1}
    # the right image went to the right name, upright
    path = next(p for p, _, _ in ds.query if Path(p).name == "2_002_2_06.png")
    img = np.asarray(Image.open(path))
    assert img.shape == (12, 6, 3)
    assert (img[0] == 255).all() and tuple(img[5, 3]) == (50 * 1 + 1, 20 * 5, 0)
    # cached: a second load does not extract again
    monkeypatch.setattr(dsmod, "_extract_cuhk03_images",
                        lambda *a: pytest.fail("extracted twice"))
    again = build_dataset("cuhk03_labeled", tmp_path, verbose=False)
    assert again.train == ds.train
    monkeypatch.undo()
    det = build_dataset("cuhk03", tmp_path, variant="detected", verbose=False)
    p = det.train[0][0]
    assert "images_detected" in p and np.asarray(Image.open(p))[5, 3, 2] == 1


def test_cuhk03_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="cuhk-03.mat"):
        build_dataset("cuhk03", tmp_path, verbose=False)
    make_cuhk03(tmp_path)
    (tmp_path / "cuhk03_new_protocol_config_detected.mat").unlink()
    with pytest.raises(DatasetLayoutError, match="config_detected"):
        build_dataset("cuhk03_detected", tmp_path, verbose=False)
    with pytest.raises(ValueError):
        build_dataset("cuhk03", tmp_path, variant="both", verbose=False)


# ---------------------------------------------------------------------------------------------
# MSMT17
# ---------------------------------------------------------------------------------------------
def make_msmt(root: Path, version="V1"):
    base = root / f"MSMT17_{version}"
    train_d, test_d = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}[version]
    lists = {
        "list_train.txt": [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                           ("0000/0000_001_05_0303morning_0016_0.jpg", 0),
                           ("0005/0005_000_15_0303noon_0001_1.jpg", 5)],
        "list_val.txt": [("0003/0003_000_02_0303noon_0002_0.jpg", 3)],
        "list_query.txt": [("0000/0000_000_01_0303morning_0100_0.jpg", 0)],
        "list_gallery.txt": [("0000/0000_000_03_0303morning_0101_0.jpg", 0),
                             ("0001/0001_000_07_0303morning_0102_0.jpg", 1)],
    }
    for lst, entries in lists.items():
        d = train_d if lst in ("list_train.txt", "list_val.txt") else test_d
        lines = []
        for rel, pid in entries:
            blank_jpg(base / d / rel)
            lines.append(f"{rel} {pid}")
        if lst == "list_gallery.txt":
            lines.append("garbage line without pid")
        (base / lst).write_text("\n".join(lines) + "\n")
    return base


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_msmt17(tmp_path, version):
    make_msmt(tmp_path, version)
    with pytest.warns(UserWarning, match="did not parse"):
        ds = build_dataset("msmt17", tmp_path, verbose=False)
    assert ds.name == f"msmt17_{version.lower()}"
    # train + val, relabelled 0..K-1
    assert sorted((pid, c) for _, pid, c in ds.train) == [(0, 0), (0, 4), (1, 1), (2, 14)]
    assert ds.num_train_pids == 3 and ds.num_train_cams == 15
    assert [(pid, c) for _, pid, c in ds.query] == [(0, 0)]
    assert sorted((pid, c) for _, pid, c in ds.gallery) == [(0, 2), (1, 6)]
    assert ds.unparsed == {"gallery": ["garbage line without pid"]}
    assert all(Path(p).exists() for p, _, _ in ds.train + ds.query + ds.gallery)


def test_msmt17_missing(tmp_path):
    with pytest.raises(DatasetLayoutError, match="list_train.txt"):
        build_dataset("msmt17", tmp_path, verbose=False)
    base = make_msmt(tmp_path)
    (base / "test" / "0001" / "0001_000_07_0303morning_0102_0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        build_dataset("msmt17", tmp_path, verbose=False)
    (base / "list_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Expected MSMT17 layout"):
        build_dataset("msmt17", tmp_path, version="V1", verbose=False)


# ---------------------------------------------------------------------------------------------
# ImageDataset
# ---------------------------------------------------------------------------------------------
def test_image_dataset_reads_and_names_bad_files(tmp_path):
    good = tmp_path / "0001_c1s1_000001_00.jpg"
    blank_jpg(good, size=(8, 16))
    bad = tmp_path / "0001_c2s1_000002_00.jpg"
    bad.write_bytes(b"this is not a jpeg")
    missing = tmp_path / "0001_c3s1_000003_00.jpg"
    items = [(str(good), 0, 0), (str(bad), 0, 1), (str(missing), 0, 2)]
    ds = ImageDataset(items)
    img, pid, camid, path = ds[0]
    assert img.size == (8, 16) and img.mode == "RGB" and (pid, camid, path) == (0, 0, str(good))
    assert len(ds) == 3
    for i, p in ((1, bad), (2, missing)):
        with pytest.raises(ImageReadError, match=str(p.name)):
            ds[i]
    with_t = ImageDataset(items, transform=lambda im: np.asarray(im).shape)
    assert with_t[0][0] == (16, 8, 3)


def test_check_command(tmp_path, capsys):
    from rga.data.__main__ import main

    make_market(tmp_path)
    assert main(["market1501", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "badname.jpg" in out and "2 file names did not parse" in out and "gallery" in out
    assert main(["msmt17", str(tmp_path)]) == 2
    assert "Expected MSMT17 layout" in capsys.readouterr().err


def test_data_command_lists_every_unreadable_image(market_copy, tmp_path, capsys):
    from rga.data.__main__ import main as data_main

    root, _ = broken_copy(market_copy, tmp_path, "bad_gallery")
    victims = sorted((root / "query").iterdir())[:2]
    for v in victims:
        v.write_bytes(v.read_bytes()[:100])  # truncated
    assert data_main(["market1501", str(root)]) == 2
    captured = capsys.readouterr()
    assert "3 unreadable image(s)" in one_error_line(captured.err)
    assert "query: 2 image(s) cannot be read" in captured.out and "gallery: 1 image(s)" in captured.out
    assert all(str(v) in captured.out for v in victims)
    assert data_main(["market1501", str(market_copy)]) == 0
    assert "all 50 images decode" in capsys.readouterr().out


# ------------------------------------------------------------------------------
# the cross-camera pre-flight (rga.data.check), alone and before a training run
# ------------------------------------------------------------------------------

def test_queries_without_a_cross_camera_match_are_refused_before_training(market_root, tmp_path, capsys):
    root = tmp_path / "market"
    shutil.copytree(market_root, root)
    for split in ("query", "bounding_box_test"):  # every test image into camera 1
        for p in (root / split).iterdir():
            pid, rest = p.name.split("_c", 1)
            p.rename(p.with_name(f"{pid}_c1{rest[1:]}"))
    out = tmp_path / "run"
    assert rtrain.main(quick_market_args(root, out, "--epochs", "1", "--eval-every", "40")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert re.search(r"none of the \d+ query images has a gallery image of its identity from another camera",
                     line), line
    assert not list(out.glob("checkpoint_ep*.pth"))


def test_some_unmatched_queries_are_counted():
    from types import SimpleNamespace

    from rga.data.check import queries_without_cross_camera_match, unmatched_note

    query = [("q1", 1, 0), ("q2", 2, 0), ("q3", 3, 1)]
    gallery = [("g1", 1, 1), ("g2", 2, 0), ("g3", 3, 1), ("g4", 3, 1)]
    assert queries_without_cross_camera_match(query, gallery) == 2
    note = unmatched_note({"queries_without_match": 2}, SimpleNamespace(query=query))
    assert "2 of 3 query images have no gallery image" in note
