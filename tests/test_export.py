"""rga.export: ONNX and ExportedProgram files of the feature extractor, run in ONNX Runtime and
torch.export.load, against the PyTorch model; a subprocess that never imports rga runs them."""
import errno
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from rga import build_model
from rga.export import (export_onnx, export_program, fold_batch_norms,
                        load_exported, main, prepare_for_export, read_metadata)
from testkit import (REPO, SUBPROCESS_ENV, assert_close, one_error_line, read_only_folder,
                     tiny_exported_program)

try:
    import onnx
    import onnxruntime as ort
except ImportError:
    onnx = ort = None
#: the tests that run an ONNX model (the output-file tests at the end run without the deploy extra)
needs_deploy = pytest.mark.skipif(ort is None,
                                  reason="the deploy extra (onnx, onnxruntime, onnxscript) is not installed")

H, W = 64, 32
BATCHES = (1, 7, 32)
TOL = 1e-4  # max abs difference of L2-normalized features (the bound)


def _perturb_batch_norms(model, seed=0):
    """Non-trivial BN statistics and affine parameters, so that folding them is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                if m.bias.requires_grad:
                    m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)
    return model


def _model(variant, seed=0):
    torch.manual_seed(seed)
    m = build_model(variant, 7, height=H, width=W, backbone="resnet18", fused=True, pretrained=False)
    return _perturb_batch_norms(m, seed).eval()


def _images(batch, seed=1):
    return torch.randn(batch, 3, H, W, generator=torch.Generator().manual_seed(seed + batch))


def _pytorch_features(model, x):
    with torch.no_grad():
        return torch.nn.functional.normalize(model(x), dim=1)


@pytest.fixture(scope="module", params=["baseline", "rga_s", "rga_c", "rga_sc"])
def exported(request, tmp_path_factory):
    """One dynamic-batch ExportedProgram per variant and the ONNX file converted from it (saving and
    loading a .pt2 is tested once, by test_cli_exports_run_without_rga: it costs seconds per model)."""
    model = _model(request.param)
    program = export_program(model, dynamic_batch=True)
    onnx_path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    meta = export_onnx(model, onnx_path, dynamic_batch=True, exporter="dynamo", program=program)
    return request.param, model, program, onnx_path, meta


@needs_deploy
def test_parity_onnx_runtime_and_exported_program(exported):
    variant, model, program, onnx_path, meta = exported
    assert meta["exporter"] == "dynamo" and meta["dynamic_batch"] and meta["input_shape"][0] == "batch"
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ops = {n.op_type for n in proto.graph.node}
    assert not any(n.domain not in ("", "ai.onnx") for n in proto.graph.node), "custom-domain ops in the graph"
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) <= 1, ops  # at most the BN neck
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    program = program.module()
    for b in BATCHES:
        x = _images(b)
        expected = _pytorch_features(model, x)
        got_ort = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            got_ep = program(x)
        assert got_ort.shape == got_ep.shape == (b, model.feature_dim)
        err_ort = (got_ort - expected).abs().max().item()
        err_ep = (got_ep - expected).abs().max().item()
        assert err_ort <= TOL, f"{variant} batch {b}: ONNX Runtime differs by {err_ort:.2e}"
        assert err_ep <= TOL, f"{variant} batch {b}: ExportedProgram differs by {err_ep:.2e}"
    # the features are not degenerate: different images, different features
    assert (expected[0] - expected[1]).abs().max() > 1e-3


@needs_deploy
def test_graph_has_no_package_ops_and_folded_trunk(exported):
    variant, model, program, _, _ = exported
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("rga_kernels" in t for t in targets), targets
    # trunk convs and BNs folded: the only batch norm left is the BN neck (1-D)
    bn_nodes = [t for t in targets if "batch_norm" in t]
    assert len([n for n in program.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]) <= 1, \
        bn_nodes


@needs_deploy
def test_fold_batch_norms_keeps_the_function():
    import copy

    model = _model("rga_sc", seed=3).double()
    folded = copy.deepcopy(model)
    assert fold_batch_norms(folded.backbone) == 1 + 2 * 8 + 3  # stem, 2 per basic block, 3 downsamples
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for name, m in folded.backbone.named_modules()
                   if "rga_att" not in name)
    x = _images(3).double()
    with torch.no_grad():
        assert_close(folded(x), model(x), "float64")  # float64: exact up to rounding
    prepared = prepare_for_export(model.float(), normalize=False)
    assert prepared.model.fused == "torch" and model.fused is True  # the original is untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.layer1.modules())
    with torch.no_grad():
        assert_close(prepared(x.float()), model(x.float()), "float32")


@needs_deploy
def test_torchscript_exporter_dynamic_batch(tmp_path):
    model = _model("rga_sc", seed=2)
    meta = export_onnx(model, tmp_path / "ts.onnx", dynamic_batch=True, exporter="torchscript")
    assert meta["exporter"] == "torchscript" and meta["opset"] == 17
    run, meta2 = load_exported(tmp_path / "ts.onnx")
    assert meta2 == meta
    for b in (1, 7):
        x = _images(b)
        assert (run(x) - _pytorch_features(model, x)).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------
# A run of rga.train, exported by the CLI and run where rga cannot be imported
# ---------------------------------------------------------------------------------------------

RUNTIME_SCRIPT = textwrap.dedent(r"""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("rga", "rga_kernels"):
                raise ImportError(f"{name} must not be imported here")
    sys.meta_path.insert(0, Block())
    import numpy as np, onnxruntime as ort, torch
    onnx_file, pt2_file, inputs, out = sys.argv[1:5]
    x = np.load(inputs)
    s = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    a = s.run(None, {"images": x})[0]
    m = torch.export.load(pt2_file).module()
    with torch.no_grad():
        b = m(torch.from_numpy(x)).numpy()
    loaded = sorted(k for k in sys.modules if k.split(".")[0] in ("rga", "rga_kernels"))
    assert not loaded, loaded
    np.savez(out, onnx=a, pt2=b)
    print("ok", sys.flags.isolated)
""")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A checkpoint as rga.train writes it for the quick start (RGA-SC, ResNet-18, 64x32, fused)."""
    model = _model("rga_sc", seed=5)
    folder = tmp_path_factory.mktemp("run")
    config = {"arch": "rga_sc", "backbone": "resnet18", "height": H, "width": W, "fused_rga": True}
    torch.save({"epoch": 14, "model": model.state_dict(), "config": config, "num_classes": 7},
               folder / "checkpoint_ep0014.pth")
    return folder, model


@needs_deploy
def test_cli_exports_run_without_rga(run_folder, tmp_path, capsys):
    folder, model = run_folder
    assert main([str(folder), "--format", "onnx", "--dynamic-batch", "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "exporter dynamo" in out and "check: ONNX Runtime (CPU) vs PyTorch" in out, out
    # default name; --no-check: the subprocess below runs this file against the model anyway
    assert main([str(folder), "--format", "exported-program", "--dynamic-batch", "--no-check"]) == 0
    pt2 = folder / "checkpoint_ep0014.pt2"
    assert pt2.is_file() and read_metadata(pt2)["format"] == "exported-program"
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert (meta["height"], meta["width"], meta["feature_dim"], meta["normalized"]) == (H, W, 512, True)

    x = _images(7).numpy()
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-I", "-c", RUNTIME_SCRIPT, str(tmp_path / "m.onnx"), str(pt2),
                           str(tmp_path / "x.npy"), str(tmp_path / "y.npz")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok 1", proc.stderr[-3000:]
    expected = _pytorch_features(model, torch.from_numpy(x))
    with np.load(tmp_path / "y.npz") as y:
        for name in ("onnx", "pt2"):
            assert np.abs(y[name] - expected.numpy()).max() <= TOL, name


@needs_deploy
def test_cli_bad_input(tmp_path, capsys, run_folder):
    folder, _ = run_folder
    (tmp_path / "empty_run").mkdir()
    assert main([str(tmp_path / "empty_run"), "--format", "onnx"]) == 2
    assert "no checkpoint_epNNNN.pth" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pth"), "--format", "onnx"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([str(folder), "--format", "exported-program", "--opset", "17"]) == 2
    assert "--opset" in capsys.readouterr().err
    assert main([str(folder), "--format", "onnx", "--opset", "3"]) == 2
    assert "opset" in capsys.readouterr().err
    assert main([str(folder), "--format", "onnx", "--batch-size", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "junk.pth"), "--format", "onnx"]) == 2
    assert "could not read checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(folder), "--format", "tflite"])
    with pytest.raises(TypeError, match="rga.build_model"):
        prepare_for_export(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError):
        load_exported(tmp_path / "none.onnx")
    (tmp_path / "plain.pt2").write_bytes(b"x")
    with pytest.raises(Exception, match="rga export metadata|zip"):
        load_exported(tmp_path / "plain.pt2")
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(_model("baseline"), tmp_path / "x.onnx", exporter="tensorrt")


# ------------------------------------------------------------------------------
# output files: a full disk keeps the old file, a bad output path is one error line naming it
# ------------------------------------------------------------------------------

def test_pt2_export_on_a_full_disk_keeps_the_old_file(tmp_path):
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
    r = subprocess.run([sys.executable, "-c", script], env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
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


def test_onnx_export_on_a_full_disk_keeps_the_old_file(tmp_path, tiny_checkpoint, monkeypatch, capsys):
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
    monkeypatch.setattr(export, "export_program", lambda *a, **k: tiny_exported_program())
    out = tmp_path / "x.onnx"
    out.write_bytes(b"the good old file")
    assert export.main([str(tiny_checkpoint), "--format", "onnx", "--out", str(out), "--no-check", "--force"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"could not write ONNX model {out}: No space left on device (ENOSPC)" in line, line
    assert "TorchScript" not in line and calls == [True]  # the dynamo exporter only
    assert out.read_bytes() == b"the good old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]


def test_export_under_a_file_is_one_error_line(tmp_path, tiny_checkpoint, capsys):
    from rga import export

    (tmp_path / "afile").write_text("x")
    assert export.main([str(tiny_checkpoint), "--format", "onnx", "--out", str(tmp_path / "afile" / "x.onnx")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "afile is a file, not a folder" in line, line


@pytest.mark.parametrize("where", ["folder", "read-only"])
def test_export_into_a_folder_or_read_only_place_names_the_path(tmp_path, tiny_checkpoint, where,
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
