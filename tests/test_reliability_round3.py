"""Issue 24, one test (or more) per numbered case, on tiny files and runs (CPU): .pt2 files are
accepted by an allow-list and never unpickled, a generated set in use is not replaced and a run
notices its data changed, outputs never overwrite inputs, the showcase validates its JSON, a
fixed-batch export works in search, the last tracebacks are one line, and the partial fixes."""

import pytest
from PIL import Image

from testkit import one_error_line, write_tiny_checkpoint

H, W = 64, 32


# ------------------------------------------------------------------------------ 3: outputs over inputs

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder holding one checkpoint of a ResNet-18 baseline at 64x32."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("run"), H, W)


# ------------------------------------------------------------------------------ 7: the partial fixes

def test_case7_pretrained_from_another_backbone_is_one_line_naming_both(data_root, tiny_run, tmp_path, capsys):
    from testkit import tiny_run_args

    import rga.train as rtrain

    argv = tiny_run_args(data_root, tmp_path / "run", "--epochs", "1", pretrained=str(tiny_run))
    assert rtrain.main(argv + ["--backbone", "resnet50"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not a torchvision resnet50 state dict: it holds a resnet18 trunk" in line, line


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
