"""Issue 15, one test (or more) per numbered case, on tiny synthetic runs and files (ResNet-18 at
64x32, CPU, one thread): diverged runs stop, degenerate evaluations are refused and ties do not
depend on the gallery order, exports and indexes are written atomically, the run folder's clean-up
leaves a user's files alone, untrusted .pt2 files and indexes run no code, the data pre-flight
checks the cross-camera rule, and the remaining raw tracebacks are one `error:` line."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rga.train as rtrain
from testkit import CodeRunningPayload, one_error_line, read_only_folder, write_gallery, write_tiny_checkpoint
from rga import build_model

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
TINY_DATA = ["num_train_ids=8", "num_test_ids=4", "num_cameras=2", "min_cams_per_id=2", "max_cams_per_id=2",
             "min_imgs_per_cam=2", "max_imgs_per_cam=2", "num_distractors=2"]
H, W = 64, 32


@pytest.fixture(scope="module")
def market_root(tmp_path_factory):
    """The issue's tiny synthetic set, in Market-1501's layout."""
    root = tmp_path_factory.mktemp("data")
    subprocess.run([sys.executable, "-m", "rga.data", "synthetic", str(root), *TINY_DATA], env=ENV, cwd=REPO,
                   check=True, capture_output=True)
    return root / "synthetic"


def train_args(root, out, *extra):
    return ["--preset", "quick", "--threads", "1", "--dataset", "market1501", "--data-root", str(root),
            "--batch-ids", "4", "--batch-instances", "2", "--output-dir", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A run folder holding one checkpoint of a ResNet-18 baseline at 64x32 (format 1)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("run"), H, W)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    return write_gallery(tmp_path_factory.mktemp("gallery"))


# ------------------------------------------------------------------------------ 1: diverged runs

def test_case1_diverged_run_stops_with_an_error_naming_the_epoch(market_root, tmp_path):
    """The issue's command (--lr 1e8): exit 2, one error line naming the epoch, no checkpoint."""
    out = tmp_path / "nan"
    r = subprocess.run([sys.executable, "-m", "rga.train", *train_args(market_root, out, "--epochs", "3",
                                                                      "--milestones", "1", "--lr", "1e8")],
                       env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    line = one_error_line(r.stderr)
    assert "epoch 1:" in line and ("exploded" in line or "diverged" in line), line
    assert "no checkpoint was written" in line
    assert not list(out.glob("checkpoint_ep*.pth")) and not (out / "metrics.jsonl").exists()


def test_case1_non_finite_batch_norm_statistics_stop_the_run(market_root, tmp_path, monkeypatch, capsys):
    """With the loss rule out of the way (a huge factor), the weight check alone stops the run:
    Adam keeps the loss finite while batch-norm variances overflow to Inf."""
    import rga.divergence

    monkeypatch.setattr(rga.divergence, "EXPLOSION_FACTOR", 1e300)
    out = tmp_path / "inf"
    assert rtrain.main(train_args(market_root, out, "--epochs", "3", "--milestones", "1", "--lr", "1e8")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "epoch 1: training diverged" in line and "running_var" in line and "NaN or Inf" in line, line
    assert not list(out.glob("checkpoint_ep*.pth"))


def test_case1_diverged_distributed_run_stops_on_every_rank(market_root, tmp_path):
    """2 processes (gloo): the rule sees the loss averaged over the ranks, so both stop at the same
    batch with the same error (no rank left waiting in a collective)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rga.train",
           *train_args(market_root, out, "--epochs", "3", "--milestones", "1", "--lr", "1e8", "--batch-ids", "2")]
    r = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("rga.train: error:")]
    assert len(errors) == 2 and errors[0] == errors[1] and "epoch 1:" in errors[0], r.stderr[-3000:]
    assert not list(out.glob("checkpoint_ep*.pth"))


def test_case1_no_non_finite_checkpoint_over_a_good_one(tmp_path):
    from rga.divergence import LossWatch, check_finite_state
    from rga.errors import TrainingDivergedError

    model = build_model("baseline", 5, height=H, width=W, backbone="resnet18", pretrained=False)
    check_finite_state(model, 3)  # finite: nothing happens
    model.feat_bn.running_var[0] = float("inf")
    good = tmp_path / "checkpoint_ep0002.pth"
    with pytest.raises(TrainingDivergedError, match=r"epoch 3: .*feat_bn.running_var.*checkpoint_ep0002.pth is kept"):
        check_finite_state(model, 3, kept=good)
    watch = LossWatch()
    watch.check(6.0)
    watch.check(5000.0)  # within 1000 x the first loss
    with pytest.raises(FloatingPointError, match="exploded"):
        watch.check(1e17)
    with pytest.raises(FloatingPointError, match="nan"):
        watch.check(float("nan"))


# ------------------------------------------------------------------------------ 2: degenerate evaluations

def test_case2_identical_features_are_refused():
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


def test_case2_ties_do_not_depend_on_the_gallery_order():
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


# ------------------------------------------------------------------------------ 3: atomic exports

def _tiny_program():
    return torch.export.export(torch.nn.Linear(4, 2), (torch.randn(2, 4),))


def test_case3_pt2_export_on_a_full_disk_keeps_the_old_file(tmp_path):
    """A real failed write (RLIMIT_FSIZE: EFBIG, the same path as a full disk) in a subprocess:
    torch's C++ archive writer used to abort the process (exit 134) and leave half a file."""
    out = tmp_path / "x.pt2"
    out.write_bytes(b"the good old file")
    script = (
        "import resource, signal, sys, torch\n"
        "from rga.export import save_program\n"
        "from rga.errors import run_cli\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(s):\n"
        "        super().__init__(); s.l = torch.nn.Linear(1000, 1000)\n"
        "    def forward(s, x): return s.l(x)\n"
        "ep = torch.export.export(M(), (torch.randn(2, 1000),))\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))\n"
        f"sys.exit(run_cli('rga.export', save_program, ep, {str(out)!r}, {{'format': 'exported-program'}}))\n")
    r = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    line = one_error_line(r.stderr)
    assert f"could not write ExportedProgram {out}: File too large (EFBIG)" in line, line
    assert out.read_bytes() == b"the good old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt2"]  # no temporary file, no sidecar


def _enospc_midway(path_or_file, data=b"PK\x03\x04" + b"x" * 1000):
    if hasattr(path_or_file, "write"):
        path_or_file.write(data)
    else:
        Path(path_or_file).write_bytes(data)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_case3_onnx_export_on_a_full_disk_keeps_the_old_file(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """Both ONNX exporters run out of room half-way: the old file stays, the message names the
    path and the reason (not the exporter), and no fallback exporter runs."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from rga import export

    calls = []

    def full_disk(model, args, f, **kw):
        calls.append(kw.get("dynamo"))
        _enospc_midway(f)

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    monkeypatch.setattr(export, "export_program", lambda *a, **k: _tiny_program())
    out = tmp_path / "x.onnx"
    out.write_bytes(b"the good old file")
    assert export.main([str(tiny_checkpoint), "--format", "onnx", "--out", str(out), "--no-check", "--force"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"could not write ONNX model {out}: No space left on device (ENOSPC)" in line, line
    assert "TorchScript" not in line and calls == [True]  # the dynamo exporter only
    assert out.read_bytes() == b"the good old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]


def test_case3_a_truncated_export_is_named_not_a_raw_badzipfile(tmp_path):
    from rga.export import ExportError, load_exported, read_metadata

    pt2 = tmp_path / "t.pt2"
    torch.export.save(_tiny_program(), str(pt2))
    pt2.write_bytes(pt2.read_bytes()[:300])
    with pytest.raises(ExportError, match="not a complete .pt2 archive"):
        read_metadata(pt2)
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["images", "w"], ["features"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 64])], [weight])
    data = helper.make_model(graph).SerializeToString()
    # the positive control: the whole model is a valid one, so the errors below come from the cut
    onnx.checker.check_model(onnx.load_from_string(data))
    onnx_file = tmp_path / "t.onnx"
    onnx_file.write_bytes(data[: len(data) // 2])  # the truncated file a full disk used to leave
    Path(str(onnx_file) + ".json").write_text(json.dumps({"format": "onnx", "input": "images"}))
    with pytest.raises(ExportError, match="cannot be loaded by ONNX Runtime .truncated or damaged"):
        load_exported(onnx_file)
    Path(str(onnx_file) + ".json").unlink()  # the embedded metadata: the file itself is read
    with pytest.raises(ExportError, match="not a complete ONNX model"):
        read_metadata(onnx_file)


def test_case3_metrics_jsonl_keeps_its_lines_when_a_write_fails(tmp_path, monkeypatch):
    """metrics.jsonl grows by rewriting it atomically (it was appended to in place)."""
    from rga import fileio
    from rga.errors import FileWriteError

    path = tmp_path / "metrics.jsonl"
    fileio.append_line('{"epoch": 1}', path)
    fileio.append_line('{"epoch": 2}\n', path)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", full_disk)
    with pytest.raises(FileWriteError, match=r"could not write JSON lines file .*metrics.jsonl: No space left"):
        fileio.append_line('{"epoch": 3}', path, what="JSON lines file")
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# ------------------------------------------------------------------------------ 4: a user's files

def test_case4_start_up_clean_up_leaves_a_users_temporary_files(market_root, tmp_path):
    from rga.runfolder import RunFolder

    mine = tmp_path / "mydir"
    mine.mkdir()
    notes = mine / ".notes.tmp"
    notes.write_text("my notes")
    ours = mine / ".rga-tmp-checkpoint_ep0001.pth.4242-0badf00d.tmp"
    ours.write_bytes(b"half a checkpoint")
    with RunFolder(mine) as f:
        assert f.removed_temp == [ours]
    assert notes.read_text() == "my notes" and not ours.exists()


# ------------------------------------------------------------------------------ 5: untrusted files

def _evil_pt2(tmp_path, marker) -> Path:
    """A .pt2 whose first weight is switched to use_pickle, holding a code-running pickle, with
    the sidecar rga.export writes."""
    import io

    good = tmp_path / "good.pt2"
    torch.export.save(_tiny_program(), str(good))
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


def test_case5_a_pt2_with_pickles_runs_no_code(tmp_path, gallery, capsys):
    from rga.search import main as search_main

    marker = tmp_path / "PWNED"
    evil = _evil_pt2(tmp_path, marker)
    assert search_main(["build", str(evil), str(gallery), "--index", str(tmp_path / "i.npz"), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not a .pt2 this package accepts" in line and "--trust-pickles" in line, line
    assert not marker.exists() and not (tmp_path / "i.npz").exists()


def test_case5_an_index_never_loads_a_model_on_its_own(tmp_path, gallery, capsys):
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


# ------------------------------------------------------------------------------ 6: cross-camera pre-flight

def test_case6_queries_without_a_cross_camera_match_are_refused_before_training(market_root, tmp_path, capsys):
    root = tmp_path / "market"
    shutil.copytree(market_root, root)
    for split in ("query", "bounding_box_test"):  # every test image into camera 1
        for p in (root / split).iterdir():
            pid, rest = p.name.split("_c", 1)
            p.rename(p.with_name(f"{pid}_c1{rest[1:]}"))
    out = tmp_path / "run"
    assert rtrain.main(train_args(root, out, "--epochs", "1", "--eval-every", "40")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert re.search(r"none of the \d+ query images has a gallery image of its identity from another camera",
                     line), line
    assert not list(out.glob("checkpoint_ep*.pth"))


def test_case6_some_unmatched_queries_are_counted():
    from types import SimpleNamespace

    from rga.data.check import queries_without_cross_camera_match, unmatched_note

    query = [("q1", 1, 0), ("q2", 2, 0), ("q3", 3, 1)]
    gallery = [("g1", 1, 1), ("g2", 2, 0), ("g3", 3, 1), ("g4", 3, 1)]
    assert queries_without_cross_camera_match(query, gallery) == 2
    note = unmatched_note({"queries_without_match": 2}, SimpleNamespace(query=query))
    assert "2 of 3 query images have no gallery image" in note


# ------------------------------------------------------------------------------ 7: corrupt index features

@pytest.mark.parametrize("damage", ["nan", "scaled"])
def test_case7_corrupt_index_features_are_refused(tmp_path, tiny_checkpoint, gallery, damage, capsys):
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


# ------------------------------------------------------------------------------ 8: raw tracebacks

def test_case8_export_under_a_file_is_one_error_line(tmp_path, tiny_checkpoint, capsys):
    from rga import export

    (tmp_path / "afile").write_text("x")
    assert export.main([str(tiny_checkpoint), "--format", "onnx", "--out", str(tmp_path / "afile" / "x.onnx")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "afile is a file, not a folder" in line, line


def test_case8_bogus_kernel_backend_is_one_error_line(market_root, tmp_path, monkeypatch, capsys):
    from rga import evaluate as reval

    monkeypatch.setenv("RGA_KERNELS_BACKEND", "bogus")
    assert rtrain.main(train_args(market_root, tmp_path / "r", "--epochs", "1", "--fused-rga")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "RGA_KERNELS_BACKEND=bogus" in line and "unknown backend" in line, line
    # rga.evaluate of a fused run
    monkeypatch.delenv("RGA_KERNELS_BACKEND")
    out = tmp_path / "fused"
    assert rtrain.main(train_args(market_root, out, "--epochs", "1", "--fused-rga")) == 0
    capsys.readouterr()
    monkeypatch.setenv("RGA_KERNELS_BACKEND", "bogus")
    assert reval.main(["--checkpoint", str(out), "--threads", "1", "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "RGA_KERNELS_BACKEND=bogus" in line, line


@pytest.mark.parametrize("meta", [["a", "list"], "no model"])
def test_case8_index_meta_a_list_or_without_model(tmp_path, tiny_checkpoint, gallery, meta, capsys):
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


# ------------------------------------------------------------------------------ 9: misleading

@pytest.mark.parametrize("where", ["folder", "read-only"])
def test_case9_export_into_a_folder_or_read_only_place_names_the_path(tmp_path, tiny_checkpoint, where,
                                                                       monkeypatch, capsys):
    from rga import export

    def never(*a, **k):
        raise AssertionError("an exporter ran although the output cannot be written")

    monkeypatch.setattr(export, "export_program", never)
    monkeypatch.setattr(torch.onnx, "export", never)
    if where == "folder":
        out = tmp_path / "x.onnx"
        out.mkdir()
        expected = "it is a folder"
    else:
        out = Path(read_only_folder(tmp_path)) / "x.onnx"
        expected = "Permission denied"
    assert export.main([str(tiny_checkpoint), "--format", "onnx", "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and expected in line and "exporter" not in line, line


def test_case9_query_with_another_model_is_refused(tmp_path, tiny_checkpoint, gallery, capsys):
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


def test_case9_exif_orientation_is_applied(tmp_path):
    from rga.data import read_image

    portrait = np.zeros((40, 20, 3), np.uint8)
    portrait[:10] = 255  # white at the top
    sideways = Image.fromarray(portrait).transpose(Image.Transpose.ROTATE_90)  # stored 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    sideways.save(tmp_path / "side.jpg", exif=exif.tobytes(), quality=95)
    for draft in (False, True):
        im = read_image(tmp_path / "side.jpg", draft=draft)
        a = np.asarray(im).astype(float)
        assert im.size[0] < im.size[1], im.size  # portrait again
        assert a[: a.shape[0] // 5].mean() > 200 and a[-a.shape[0] // 5:].mean() < 50
