"""rga.exported: reading an exported file (a truncated .pt2 or ONNX file is named, not a raw
BadZipFile or runtime error; a .pt2 is accepted by an allow-list of entries and never unpickled; a
fixed-batch export is run that many images at a time)."""
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from testkit import CodeRunningPayload, one_error_line, tiny_exported_program

H, W = 64, 32


def test_a_truncated_export_is_named_not_a_raw_badzipfile(tmp_path):
    from rga.export import ExportError, load_exported, read_metadata

    pt2 = tmp_path / "t.pt2"
    torch.export.save(tiny_exported_program(), str(pt2))
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


# ------------------------------------------------------------------------------
# .pt2 files run no code: the accepted layout, entry by entry
# ------------------------------------------------------------------------------

class _Images(torch.nn.Module):
    """(N, 3, H, W) -> (N, 4): a stand-in for an exported feature model, with one constant."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x):
        return torch.nn.functional.normalize(self.fc(x.mean(dim=(2, 3))) + torch.tensor([1.0, 0, 0, 0]), dim=1)


def _sidecar(path: Path) -> Path:
    meta = {"format": "exported-program", "height": H, "width": W, "input": "images", "dynamic_batch": True,
            "input_shape": ["batch", 3, H, W], "variant": "baseline", "backbone": "resnet18"}
    Path(str(path) + ".json").write_text(json.dumps(meta))
    return path


def _good_pt2(folder: Path) -> Path:
    program = torch.export.export(_Images().eval(), (torch.randn(2, 3, H, W),),
                                  dynamic_shapes=({0: torch.export.Dim("b", max=64)},))
    path = folder / "good.pt2"
    torch.export.save(program, str(path))
    return _sidecar(path)


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of the archive `src` with `change(name, data) -> data or None (dropped)` applied,
    plus `change.extra` entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = change(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item.filename, data)
        for name, data in getattr(change, "extra", {}).items():
            zout.writestr(name, data)
    return _sidecar(dst)


def _opaque_constant_pt2(tmp_path, marker) -> Path:
    """The constant switched to an ``opaque_obj_`` entry, which torch.export.load gives to
    pickle.loads with no use_pickle flag set."""
    good = _good_pt2(tmp_path)

    def change(name, data):
        if name.endswith("data/constants/model_constants_config.json"):
            config = json.loads(data)
            for entry in config["config"].values():
                entry["path_name"] = "opaque_obj_0"
            return json.dumps(config).encode()
        return data

    top = zipfile.ZipFile(good).namelist()[0].split("/")[0]
    change.extra = {f"{top}/data/constants/opaque_obj_0": __import__("pickle").dumps(CodeRunningPayload(marker))}
    return _rewrite(good, tmp_path / "opaque.pt2", change)


def _legacy_pt2(tmp_path, marker) -> Path:
    """The pre-2.8 layout torch.export.load falls back to, whose state dict and constants
    (``serialized_*.json``: no pickle suffix) it reads with torch.load without weights_only."""
    from torch._export.serde.schema import SCHEMA_VERSION

    good = _good_pt2(tmp_path)
    payload = io.BytesIO()
    torch.save(CodeRunningPayload(marker), payload)
    graph = next(zipfile.ZipFile(good).read(n) for n in zipfile.ZipFile(good).namelist()
                 if n.endswith("models/model.json"))
    path = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        z.writestr("serialized_exported_program.json", graph)
        z.writestr("serialized_state_dict.json", payload.getvalue())
        z.writestr("serialized_constants.json", payload.getvalue())
        plain = io.BytesIO()
        torch.save(((torch.zeros(1, 3, H, W),), {}), plain)
        z.writestr("serialized_example_inputs.pt", plain.getvalue())
    return _sidecar(path)


@pytest.mark.parametrize("kind", ["opaque_constant", "legacy_layout"])
def test_a_pt2_outside_the_accepted_layout_runs_no_code(tmp_path, gallery, kind, capsys):
    from rga.extractor import FeatureExtractor
    from rga.search import main as search_main

    marker = tmp_path / "PWNED"
    evil = {"opaque_constant": _opaque_constant_pt2, "legacy_layout": _legacy_pt2}[kind](tmp_path, marker)
    assert search_main(["build", str(evil), str(gallery), "--index", str(tmp_path / "i.npz"), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not a .pt2 this package accepts" in line and "--trust-pickles" in line, line
    with pytest.raises(Exception, match="not a .pt2 this package accepts"):
        FeatureExtractor(evil)
    assert not marker.exists() and not (tmp_path / "i.npz").exists()


def test_the_accepted_pt2_layout_loads_without_unpickling(tmp_path, monkeypatch):
    """A file torch.export.save wrote loads and runs, and nothing in the load calls an unpickler."""
    import pickle

    from rga.exported import load_exported

    good = _good_pt2(tmp_path)

    def refuse(*a, **k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    run, meta = load_exported(good)
    feats = run(torch.randn(3, 3, H, W))
    assert feats.shape == (3, 4) and torch.allclose(feats.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("damage", ["pickled_weight", "unknown_entry", "foreign_target", "sympy_code"])
def test_every_pt2_entry_must_be_a_storage_or_json_of_the_schema(tmp_path, damage):
    from rga.errors import UntrustedFileError
    from rga.exported import read_pt2_entries

    good = _good_pt2(tmp_path)

    def change(name, data):
        if damage == "pickled_weight" and name.endswith("model_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("models/model.json") and damage in ("foreign_target", "sympy_code"):
            text = data.decode()
            if damage == "foreign_target":
                return text.replace("torch.ops.aten.mean.dim", "torch.serialization.pickle.loads", 1).encode()
            return text.replace("Symbol(", "__import__('os').system('true') or Symbol(", 1).encode()
        return data

    top = zipfile.ZipFile(good).namelist()[0].split("/")[0]
    change.extra = {f"{top}/data/notes.pkl": b"x"} if damage == "unknown_entry" else {}
    bad = _rewrite(good, tmp_path / "bad.pt2", change)
    with pytest.raises(UntrustedFileError, match="not a .pt2 this package accepts"):
        read_pt2_entries(bad)


# ------------------------------------------------------------------------------
# a fixed-batch export (one without --dynamic-batch) in search
# ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("exported-program", ".pt2")])
def test_a_fixed_batch_export_indexes_a_gallery(tiny_checkpoint, gallery, tmp_path, fmt, suffix, capsys):
    from rga.export import main as export_main
    from rga.search import GalleryIndex, main as search_main

    model = tmp_path / f"x{suffix}"
    assert export_main([str(tiny_checkpoint), "--format", fmt, "--out", str(model), "--no-check"]) == 0  # batch 1
    index = tmp_path / "i.npz"
    assert search_main(["build", str(model), str(gallery), "--index", str(index), "--no-progress",
                        "--batch-size", "4"]) == 0, capsys.readouterr().err[-2000:]
    built = GalleryIndex.load(index)
    assert len(built) == 6
    # the same features as the PyTorch model gives them, image by image
    from rga.extractor import FeatureExtractor

    reference = FeatureExtractor(tiny_checkpoint, device="cpu")(sorted(str(p) for p in gallery.iterdir()))
    order = np.argsort([str(p) for p in built.paths])
    assert torch.allclose(torch.as_tensor(built.features[order]), reference, atol=1e-4)

    meta = json.loads(Path(f"{model}.json").read_text())
    Path(f"{model}.json").write_text(json.dumps({**meta, "height": 128, "width": 64}))
    assert search_main(["build", str(model), str(gallery), "--index", str(tmp_path / "j.npz"), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"takes {H}x{W} images but its metadata says 128x64" in line, line
