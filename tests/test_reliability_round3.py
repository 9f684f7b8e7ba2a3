"""Issue 24, one test (or more) per numbered case, on tiny files and runs (CPU): .pt2 files are
accepted by an allow-list and never unpickled, a generated set in use is not replaced and a run
notices its data changed, outputs never overwrite inputs, the showcase validates its JSON, a
fixed-batch export works in search, the last tracebacks are one line, and the partial fixes."""
import json
import zipfile

import pytest
from PIL import Image

from testkit import one_error_line, write_tiny_checkpoint

H, W = 64, 32


# ------------------------------------------------------------------------------ 3: outputs over inputs

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder holding one checkpoint of a ResNet-18 baseline at 64x32."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("run"), H, W)


@pytest.mark.parametrize("command", ["export", "search", "evaluate"])
def test_case3_an_output_over_a_checkpoint_is_refused(tiny_run, gallery, command, capsys):
    from rga.evaluate import main as evaluate_main
    from rga.export import main as export_main
    from rga.search import main as search_main

    ckpt = tiny_run / "checkpoint_ep0001.pth"
    before = ckpt.read_bytes()
    if command == "export":
        code = export_main([str(tiny_run), "--format", "exported-program", "--out", str(ckpt), "--no-check"])
    elif command == "search":
        code = search_main(["build", str(tiny_run), str(gallery), "--index", str(ckpt), "--no-progress"])
    else:
        code = evaluate_main(["--checkpoint", str(tiny_run), "--output", str(ckpt)])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"refusing to overwrite {ckpt}: it is a checkpoint" in line and "--force" in line, line
    assert ckpt.read_bytes() == before


def test_case3_an_output_of_its_own_kind_is_replaced_and_force_replaces_any(tiny_run, gallery, tmp_path, capsys):
    from rga.search import main as search_main

    index = tmp_path / "i.npz"
    for _ in range(2):  # an index over an index: no --force needed
        assert search_main(["build", str(tiny_run), str(gallery), "--index", str(index), "--no-progress"]) == 0
    notes = tmp_path / "notes.npz"
    notes.write_text("mine")
    assert search_main(["build", str(tiny_run), str(gallery), "--index", str(notes), "--no-progress"]) == 2
    assert "it is a file rga did not write" in capsys.readouterr().err and notes.read_text() == "mine"
    assert search_main(["build", str(tiny_run), str(gallery), "--index", str(notes), "--no-progress",
                        "--force"]) == 0
    assert zipfile.is_zipfile(notes)


def test_case3_train_keeps_a_users_config_json(data_root, tmp_path, capsys):
    from testkit import tiny_run_args

    import rga.train as rtrain

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}\n')
    assert rtrain.main(tiny_run_args(data_root, out, "--epochs", "1")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"refusing to overwrite {out / 'config.json'}" in line, line
    assert (out / "config.json").read_text() == '{"my": "settings"}\n'


# ------------------------------------------------------------------------------ 7: the partial fixes

def test_case7_pretrained_from_another_backbone_is_one_line_naming_both(data_root, tiny_run, tmp_path, capsys):
    from testkit import tiny_run_args

    import rga.train as rtrain

    argv = tiny_run_args(data_root, tmp_path / "run", "--epochs", "1", pretrained=str(tiny_run))
    assert rtrain.main(argv + ["--backbone", "resnet50"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not a torchvision resnet50 state dict: it holds a resnet18 trunk" in line, line


def test_case7_resume_keeps_the_recorded_gate_init(data_root, tmp_path, capsys):
    from testkit import tiny_run_args

    import rga.train as rtrain
    from rga.fileio import load_torch

    out = tmp_path / "run"
    assert rtrain.main(tiny_run_args(data_root, out, "--model", "rga_s", "--gate-init", "zero", "--epochs", "1")) == 0
    assert rtrain.main(tiny_run_args(data_root, out, "--model", "rga_s", "--gate-init", "public", "--epochs", "2",
                                     "--resume", "auto")) == 0
    assert json.loads((out / "config.json").read_text())["model"]["gate_init"] == "zero"
    assert load_torch(out / "checkpoint_ep0002.pth")["config"]["model"]["gate_init"] == "zero"
    assert "gate_init stays 'zero' as recorded" in (out / "train.log").read_text()


@pytest.mark.parametrize("flags, why", [(["--batch-instances", "1"], "batch_instances must be >= 2"),
                                        (["--id-weight", "0", "--triplet-weight", "0"], "not both 0")],
                         ids=["one_instance", "no_loss"])
def test_case7_a_run_whose_triplet_loss_is_always_zero_is_refused(data_root, tmp_path, flags, why, capsys):
    from testkit import tiny_run_args

    import rga.train as rtrain

    assert rtrain.main(tiny_run_args(data_root, tmp_path / "run", "--epochs", "1", *flags)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert why in line, line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ 2: a dataset swapped under a run

def test_case2_a_run_notices_its_generated_set_changed_during_the_run(tmp_path, monkeypatch, capsys):
    """A swap the lock cannot see (another machine on a shared folder): the epoch's check stops the run."""
    from testkit import tiny_run_args

    import rga.train as rtrain

    data = tmp_path / "data"
    trained = rtrain.Trainer.epoch

    def epoch_then_swap(self, epoch):
        stats = trained(self, epoch)
        marker = data / "synthetic" / "synthetic_config.json"
        marker.write_text(marker.read_text().replace('"seed": 0', '"seed": 1'))
        return stats

    monkeypatch.setattr(rtrain.Trainer, "epoch", epoch_then_swap)
    out = tmp_path / "run"
    assert rtrain.main(tiny_run_args(data, out, "--epochs", "2", dataset="synthetic")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "epoch 1: the training data in" in line and "seed 0 -> 1" in line, line
    assert not list(out.glob("checkpoint_*.pth"))


def test_case2_a_resume_refuses_data_changed_since_its_checkpoint(data_root, tmp_path, capsys):
    import shutil

    from testkit import tiny_run_args

    import rga.train as rtrain
    from rga.fileio import load_torch

    market = tmp_path / "market"
    shutil.copytree(data_root / "synthetic", market)
    out = tmp_path / "run"
    assert rtrain.main(tiny_run_args(market, out, "--epochs", "1", dataset="market1501")) == 0
    assert load_torch(out / "checkpoint_ep0001.pth")["data_fingerprint"]["images"] > 0
    swapped = sorted((market / "bounding_box_train").iterdir())[0]
    Image.new("RGB", (32, 64), (200, 10, 10)).save(swapped)  # same name, other picture
    capsys.readouterr()
    assert rtrain.main(tiny_run_args(market, out, "--epochs", "2", "--resume", "auto", dataset="market1501")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot resume from" in line and "its image files differ" in line, line
