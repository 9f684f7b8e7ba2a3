"""rga.search: gallery index (build, save, load), exact search (torch and faiss), the CLI, bad input."""
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rga import FeatureExtractor, build_model
from rga.search import (INDEX_VERSION, GalleryIndex, SearchError, build_index, main, parse_name,
                        plot_results, rank, search, top1_share)
from testkit import CodeRunningPayload, assert_close, one_error_line, tiny_exported_program

H, W = 64, 32
PIDS = (3, 8, 15, 42, 77)


def _noisy(base, rng):
    return np.clip(base.astype(np.int16) + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Gallery: 4 noisy copies (2 cameras x 2) of one random picture per identity, one corrupt file
    and one image without an identity in its name; queries: a fifth copy from camera 3."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("search")
    gallery, queries = root / "gallery", root / "query"
    (gallery / "sub").mkdir(parents=True)
    queries.mkdir()
    for pid in PIDS:
        base = rng.integers(0, 256, (96, 48, 3), dtype=np.uint8)
        for cam in (1, 2):
            for k in range(2):
                folder = gallery / "sub" if cam == 2 else gallery
                Image.fromarray(_noisy(base, rng)).save(folder / f"{pid:04d}_c{cam}s1_{k:06d}_00.png")
        Image.fromarray(_noisy(base, rng)).save(queries / f"{pid:04d}_c3s1_000009_00.png")
    Image.fromarray(rng.integers(0, 256, (96, 48, 3), dtype=np.uint8)).save(gallery / "street.png")
    (gallery / "0099_c1s1_000001_00.jpg").write_bytes(b"not an image")  # unreadable
    (gallery / "notes.txt").write_text("not an image file name")
    return gallery, queries


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("baseline", 5, height=H, width=W, backbone="resnet18", pretrained=False).eval()
    with torch.no_grad():
        model.feat_bn.running_mean.uniform_(-0.1, 0.1)
    folder = tmp_path_factory.mktemp("run")
    config = {"arch": "baseline", "backbone": "resnet18", "height": H, "width": W, "fused_rga": True}
    torch.save({"epoch": 1, "model": model.state_dict(), "config": config, "num_classes": 5},
               folder / "checkpoint_ep0001.pth")
    return folder, model


def test_parse_name():
    assert parse_name("/x/0002_c1s1_000451_03.jpg") == (2, 0)
    assert parse_name("0000_c6s2_000001_01.png") == (0, 5)
    assert parse_name("-1_c3s1_000001_00.jpg") == (-1, 2)
    assert parse_name("0007_c2_anything.jpeg") == (7, 1)
    assert parse_name("street.png") == (-1, -1)
    assert parse_name("0007_c0_x.jpg") == (-1, -1)  # cameras are numbered from 1


def test_build_skips_unreadable_and_answers_queries(run, data, tmp_path, capsys):
    folder, model = run
    gallery, queries = data
    index_file = tmp_path / "gallery.idx"  # any name: nothing is appended to it
    assert main(["build", str(folder), str(gallery), "--index", str(index_file), "--no-progress",
                 "--batch-size", "3", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "0099_c1s1_000001_00.jpg" in captured.err  # the unreadable file is named
    assert "indexed 21 of 22 images (1 unreadable, skipped)" in captured.out, captured.out
    index = GalleryIndex.load(index_file)
    assert len(index) == 21 and index.features.shape == (21, model.feature_dim)
    assert index.meta["skipped"] == 1 and index.meta["skipped_files"][0]["path"].endswith("0099_c1s1_000001_00.jpg")
    assert index.meta["index_version"] == INDEX_VERSION
    torch.testing.assert_close(index.features.norm(dim=1), torch.ones(21))
    # features and labels agree with FeatureExtractor and the file names
    i = next(k for k, p in enumerate(index.paths) if p.endswith("0042_c2s1_000001_00.png"))
    assert (index.pids[i], index.camids[i]) == (42, 1)
    assert index.pids[index.paths.index(str((gallery / "street.png").resolve()))] == -1
    expected = FeatureExtractor(model, device="cpu")([index.paths[i]])
    assert_close(index.features[i:i + 1], expected, "float32")

    query_files = sorted(str(p) for p in queries.iterdir())
    bad = str(tmp_path / "missing.jpg")
    assert main(["query", str(index_file), *query_files, bad, "--top", "4", "--json", "--device", "cpu",
                 "--model", str(folder)]) == 0
    captured = capsys.readouterr()
    assert "1 of 6 query images unreadable" in captured.err and "missing.jpg" in captured.err
    out = json.loads(captured.out)
    assert len(out["queries"]) == 5 and out["skipped"][0]["path"] == bad
    q_feats = FeatureExtractor(model, device="cpu")(query_files)
    for q, r in zip(q_feats, out["queries"]):
        assert [h["rank"] for h in r["results"]] == [1, 2, 3, 4]
        sims = [h["similarity"] for h in r["results"]]
        assert sims == sorted(sims, reverse=True)
        manual = (index.features @ q).topk(4).values
        np.testing.assert_allclose(sims, manual.numpy(), atol=1e-4)
    hits, known = out["top1_same_identity"]["hits"], out["top1_same_identity"]["queries_with_identity"]
    assert known == 5 and hits == 5  # near-duplicates of the gallery pictures: the right identity first

    # text output, the cross-camera protocol and the plot
    plot = tmp_path / "q.png"
    assert main(["query", str(index_file), query_files[0], "--top", "3", "--cross-camera", "--plot", str(plot),
                 "--device", "cpu", "--model", str(folder)]) == 0
    text = capsys.readouterr().out
    assert text.count("\n  ") == 3 and "top-1 same identity: 1/1" in text, text
    pytest.importorskip("matplotlib")
    assert plot.stat().st_size > 1000


def test_cross_camera_drops_same_camera_matches(run, data):
    folder, model = run
    gallery, _ = data
    fm = FeatureExtractor(folder, device="cpu")
    index = build_index(fm, gallery)
    query = str(gallery / "0003_c1s1_000000_00.png")  # a gallery image as query: it matches itself first
    plain, _ = rank(index, fm, [query], top=3)
    assert plain[0]["results"][0]["path"] == query and plain[0]["results"][0]["similarity"] > 0.9999
    cross, _ = rank(index, fm, [query], top=3, cross_camera=True)
    assert len(cross[0]["results"]) == 3
    assert not any(h["pid"] == 3 and h["camid"] == 0 for h in cross[0]["results"])
    assert cross[0]["results"][0]["pid"] == 3 and cross[0]["results"][0]["camid"] == 1
    assert top1_share(cross) == (1, 1)


def test_faiss_gives_the_same_results():
    pytest.importorskip("faiss", reason="faiss-cpu is not installed")
    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(3000, 64, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(40, 64, generator=g), dim=1)
    s_t, i_t = search(gallery, queries, top=10, backend="torch")
    s_f, i_f = search(gallery, queries, top=10, backend="faiss")
    assert i_f.shape == (40, 10) and s_f.shape == (40, 10)
    assert bool((s_f[:, :-1] >= s_f[:, 1:]).all()), "faiss's results are not in rank order"
    assert torch.equal(i_t, i_f)
    assert_close(s_t, s_f, "similarity")
    # top larger than the gallery: the whole gallery, ranked
    s, i = search(gallery[:5], queries[:2], top=10, backend="faiss")
    assert i.shape == (2, 5) and sorted(i[0].tolist()) == [0, 1, 2, 3, 4]


def test_search_exact_and_bad_input():
    g = torch.Generator().manual_seed(1)
    gallery = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    sims, idx = search(gallery, gallery[[7, 3]], top=2, backend="torch", chunk=1)
    assert idx[:, 0].tolist() == [7, 3]
    torch.testing.assert_close(sims[:, 0], torch.ones(2))
    with pytest.raises(ValueError, match="same D"):
        search(gallery, torch.randn(2, 9))
    with pytest.raises(ValueError, match="top"):
        search(gallery, gallery[:1], top=0)
    with pytest.raises(ValueError, match="backend"):
        search(gallery, gallery[:1], backend="annoy")


def test_index_file_errors(tmp_path, capsys, run, data):
    folder, _ = run
    with pytest.raises(SearchError, match="not found"):
        GalleryIndex.load(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(SearchError, match="not an index"):
        GalleryIndex.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(SearchError, match="missing"):
        GalleryIndex.load(tmp_path / "other.npz")
    index = GalleryIndex(torch.zeros(1, 4), ["a.jpg"], np.array([1]), np.array([0]), {})
    path = index.save(tmp_path / "v.npz")
    with np.load(path) as z:
        arrays = dict(z)
    arrays["meta"] = np.array(json.dumps({"index_version": 99}))
    np.savez(tmp_path / "v99.npz", **arrays)
    with pytest.raises(SearchError, match="version 99"):
        GalleryIndex.load(tmp_path / "v99.npz")
    # a pickled object array is refused, not loaded
    arrays["paths"] = np.array([object()], dtype=object)
    np.savez(tmp_path / "pickled.npz", **arrays)
    with pytest.raises(SearchError, match="not an index"):
        GalleryIndex.load(tmp_path / "pickled.npz")
    # CLI: errors are messages with exit status 2
    assert main(["query", str(tmp_path / "junk.npz"), "x.jpg", "--model", str(folder)]) == 2
    assert "rga.search: error:" in capsys.readouterr().err
    assert main(["build", str(folder), str(tmp_path / "nowhere"), "--index", str(tmp_path / "i.npz")]) == 2
    assert "gallery folder not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["build", str(folder), str(empty), "--index", str(tmp_path / "i.npz")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "no_run"), str(data[0]), "--index", str(tmp_path / "i.npz")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["query", str(path), "a.jpg", "--top", "0"])


def test_plot_needs_no_matplotlib(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    img = tmp_path / "0001_c1s1_000000_00.png"
    Image.new("RGB", (32, 64), (200, 30, 30)).save(img)
    results = [{"query": str(img), "pid": 1, "camid": 0,
                "results": [{"rank": 1, "path": str(img), "pid": 1, "similarity": 1.0},
                            {"rank": 2, "path": str(tmp_path / "gone.png"), "pid": None, "similarity": 0.5}]}]
    # the ranked sheet is drawn with Pillow alone (rga.vis.ranks.rank_sheet, as rga.visualize ranks)
    out = plot_results(results, tmp_path / "x.png")
    assert out == tmp_path / "x.png" and out.stat().st_size > 500


# ------------------------------------------------------------------------------
# untrusted and damaged inputs: code-carrying .pt2 files, damaged indexes, another model
# ------------------------------------------------------------------------------

def _evil_pt2(tmp_path, marker) -> Path:
    """A .pt2 whose first weight is switched to use_pickle, holding a code-running pickle, with
    the sidecar rga.export writes."""
    good = tmp_path / "good.pt2"
    torch.export.save(tiny_exported_program(), str(good))
    payload = io.BytesIO()
    torch.save(CodeRunningPayload(marker), payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(evil, "w") as zout:
        config_name = next(n for n in zin.namelist() if n.endswith("data/weights/model_weights_config.json"))
        config = json.loads(zin.read(config_name))
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        weight_name = f"{config_name.rsplit('/', 1)[0]}/{first['path_name']}"
        for item in zin.infolist():
            data = {config_name: json.dumps(config).encode(), weight_name: payload.getvalue()}.get(
                item.filename, None)
            zout.writestr(item, data if data is not None else zin.read(item.filename))
    good.unlink()
    meta = {"format": "exported-program", "height": H, "width": W, "input": "images", "dynamic_batch": True,
            "input_shape": ["batch", 3, H, W], "variant": "baseline", "backbone": "resnet18"}
    Path(str(evil) + ".json").write_text(json.dumps(meta))
    return evil


def test_a_pt2_with_pickles_runs_no_code(tmp_path, gallery, capsys):
    from rga.search import main as search_main

    marker = tmp_path / "PWNED"
    evil = _evil_pt2(tmp_path, marker)
    assert search_main(["build", str(evil), str(gallery), "--index", str(tmp_path / "i.npz"), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not a .pt2 this package accepts" in line and "--trust-pickles" in line, line
    assert not marker.exists() and not (tmp_path / "i.npz").exists()


def test_an_index_never_loads_a_model_on_its_own(tmp_path, gallery, capsys):
    """An index from elsewhere that names a code-carrying model: query needs --model."""
    from rga.search import INDEX_VERSION, main as search_main

    marker = tmp_path / "PWNED"
    evil = _evil_pt2(tmp_path, marker)
    feats = torch.nn.functional.normalize(torch.randn(2, 8), dim=1).numpy()
    meta = {"index_version": INDEX_VERSION, "model": str(evil), "height": H, "width": W}
    np.savez(tmp_path / "i.npz", features=feats, paths=np.array(["a.png", "b.png"]), pids=np.array([1, 2]),
             camids=np.array([0, 1]), meta=np.array(json.dumps(meta)))
    query = str(next(gallery.iterdir()))
    with pytest.raises(SystemExit) as e:
        search_main(["query", str(tmp_path / "i.npz"), query])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["nan", "scaled"])
def test_corrupt_index_features_are_refused(tmp_path, tiny_checkpoint, gallery, damage, capsys):
    from rga.search import GalleryIndex, SearchError, main as search_main

    index_file = tmp_path / "i.npz"
    assert search_main(["build", str(tiny_checkpoint), str(gallery), "--index", str(index_file),
                        "--no-progress", "--device", "cpu"]) == 0
    with np.load(index_file) as z:
        arrays = dict(z)
    arrays["features"] = arrays["features"] * np.nan if damage == "nan" else arrays["features"] * 1000
    np.savez(index_file, **arrays)
    with pytest.raises(SearchError, match="NaN or Inf" if damage == "nan" else "not of unit length"):
        GalleryIndex.load(index_file)
    capsys.readouterr()
    query = str(next(gallery.iterdir()))
    assert search_main(["query", str(index_file), query, "--model", str(tiny_checkpoint), "--device", "cpu"]) == 2
    assert "damaged" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("meta", [["a", "list"], "no model"])
def test_index_meta_a_list_or_without_model(tmp_path, tiny_checkpoint, gallery, meta, capsys):
    from rga.search import INDEX_VERSION, main as search_main

    if meta == "no model":
        meta = {"index_version": INDEX_VERSION}

    feats = torch.nn.functional.normalize(torch.randn(2, 8), dim=1).numpy()
    np.savez(tmp_path / "i.npz", features=feats, paths=np.array(["a.png", "b.png"]), pids=np.array([1, 2]),
             camids=np.array([0, 1]), meta=np.array(json.dumps(meta)))
    query = str(next(gallery.iterdir()))
    assert search_main(["query", str(tmp_path / "i.npz"), query, "--model", str(tiny_checkpoint),
                        "--device", "cpu"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert ("not an object" in line) if isinstance(meta, list) else ("records no model fingerprint" in line), line


def test_query_with_another_model_is_refused(tmp_path, tiny_checkpoint, gallery, capsys):
    from rga.search import main as search_main

    index_file = tmp_path / "i.npz"
    assert search_main(["build", str(tiny_checkpoint), str(gallery), "--index", str(index_file),
                        "--no-progress", "--device", "cpu"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    ckpt = torch.load(tiny_checkpoint / "checkpoint_ep0001.pth", weights_only=True)
    ckpt["model"]["feat_bn.running_mean"] += 0.5  # another run: same architecture, other weights
    torch.save(ckpt, other / "checkpoint_ep0001.pth")
    capsys.readouterr()
    query = str(next(gallery.iterdir()))
    assert search_main(["query", str(index_file), query, "--model", str(other), "--device", "cpu"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is not the model that built" in line and "weights sha256" in line, line
    assert search_main(["query", str(index_file), query, "--model", str(tiny_checkpoint), "--device", "cpu"]) == 0
