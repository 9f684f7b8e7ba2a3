"""rga.train's user-facing failures, end to end on tiny runs (ResNet-18 at 64x32, CPU, one thread):
one `error:` line and exit code 2 each, the dataset checked before the first epoch, the training
data checked every epoch and on resume, and the final checkpoint saved before the final evaluation."""
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import rga.train as rtrain
from testkit import (REPO, SUBPROCESS_ENV, broken_copy, one_error_line, read_only_folder, tiny_run_args,
                     train_tiny)


# ------------------------------------------------------------------------------
# the dataset, before the first epoch; the final checkpoint, before the final evaluation
# ------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["empty_query", "bad_gallery", "bad_train"])
def test_dataset_problems_stop_the_run_before_the_first_epoch(market_copy, tmp_path, capsys, monkeypatch, how):
    root, expected = broken_copy(market_copy, tmp_path, how)
    epochs, real = [], rtrain.train_one_epoch
    monkeypatch.setattr(rtrain, "train_one_epoch", lambda *a, **kw: epochs.append(1) or real(*a, **kw))
    capsys.readouterr()
    assert train_tiny(root, tmp_path / "run", "--epochs", "1", dataset="market1501") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "dataset market1501: " in line and expected in line
    assert not epochs and not list((tmp_path / "run").glob("checkpoint_*"))


def test_final_checkpoint_is_saved_before_the_final_evaluation(data_root, tmp_path, capsys, monkeypatch):
    from rga.data import ImageReadError

    def failing_eval(*a, **kw):
        raise ImageReadError("cannot read image /x/0001_c1s1_000001_00.jpg: OSError: disk went away")

    monkeypatch.setattr(rtrain, "evaluate_model", failing_eval)
    capsys.readouterr()
    assert train_tiny(data_root, tmp_path / "run", "--epochs", "1") == 2
    assert "cannot read image /x/0001_c1s1_000001_00.jpg" in one_error_line(capsys.readouterr().err)
    ck = torch.load(tmp_path / "run" / "checkpoint_ep0001.pth", weights_only=True)  # the epoch is not lost
    assert ck["epoch"] == 1


def test_final_checkpoint_still_holds_the_final_metrics(two_epoch_run):
    """Saved before the evaluation, then again with its metrics."""
    ck = torch.load(two_epoch_run / "checkpoint_ep0002.pth", weights_only=True)
    assert ck["epoch"] == 2 and ck["metrics"]["epoch"] == 2 and 0 <= ck["metrics"]["mAP"] <= 1
    assert "saved" in (two_epoch_run / "train.log").read_text()


# ------------------------------------------------------------------------------
# one error line, exit 2
# ------------------------------------------------------------------------------

TEXT = "hello, I am not a checkpoint\n"


@pytest.mark.parametrize("case", ["read_only", "output_is_file", "lr_nan", "nan_loss", "resume_text", "pretrained_text"])
def test_train_errors_are_one_line_with_exit_2(data_root, tmp_path, capsys, case):
    out = tmp_path / "run"
    text = tmp_path / "notes.pth"
    text.write_text(TEXT)
    extra, expected = {
        "read_only": ([], "is not writable: Permission denied (EACCES)"),
        "output_is_file": ([], "exists and is not a folder"),
        "lr_nan": (["--lr", "nan"], "bad value for '--lr': expected a finite number, got 'nan'"),
        "nan_loss": (["--id-weight", "1e308"], "epoch 1: loss became inf (lower --lr, or try --amp off); no checkpoint"),
        "resume_text": (["--resume", str(text)], f"could not read checkpoint {text}: not a PyTorch checkpoint (a text file"),
        "pretrained_text": (["--pretrained", str(text)], f"could not read checkpoint {text}: not a PyTorch checkpoint"),
    }[case]
    if case == "read_only":
        out = read_only_folder(tmp_path)
    elif case == "output_is_file":
        out = tmp_path / "a_file"
        out.write_text("x")
    capsys.readouterr()
    assert train_tiny(data_root, out, "--epochs", "1", *extra) == 2
    assert expected in one_error_line(capsys.readouterr().err)


def test_disk_full_while_saving_is_one_line_with_the_cause(data_root, tmp_path):
    """A checkpoint write that runs out of room (RLIMIT_FSIZE: the same failure path as a full
    disk) in a real `python -m rga.train` process: one line naming the file and the reason."""
    out = tmp_path / "run"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, resource.RLIM_INFINITY))

    argv = tiny_run_args(data_root, out, "--epochs", "1", dataset="synthetic", pretrained=None)
    res = subprocess.run([sys.executable, "-m", "rga.train", *argv], env=SUBPROCESS_ENV,
                         cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_error_line(res.stderr)
    assert f"could not write checkpoint {out / 'checkpoint_ep0001.pth'}: File too large (EFBIG)" in line
    # no temp file, no lock (metrics.jsonl holds the trained epoch's line, written before the checkpoint)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "train.log"]


def test_pretrained_from_another_backbone_is_one_line_naming_both(data_root, tiny_checkpoint, tmp_path, capsys):
    argv = tiny_run_args(data_root, tmp_path / "run", "--epochs", "1", pretrained=str(tiny_checkpoint))
    assert rtrain.main(argv + ["--backbone", "resnet50"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not a torchvision resnet50 state dict: it holds a resnet18 trunk" in line, line


@pytest.mark.parametrize("flags, why", [(["--batch-instances", "1"], "batch_instances must be >= 2"),
                                        (["--id-weight", "0", "--triplet-weight", "0"], "not both 0")],
                         ids=["one_instance", "no_loss"])
def test_a_run_whose_triplet_loss_is_always_zero_is_refused(data_root, tmp_path, flags, why, capsys):
    assert rtrain.main(tiny_run_args(data_root, tmp_path / "run", "--epochs", "1", *flags)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert why in line, line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------
# the training data, checked every epoch and on resume
# ------------------------------------------------------------------------------

def test_a_run_notices_its_generated_set_changed_during_the_run(tmp_path, monkeypatch, capsys):
    """A swap the lock cannot see (another machine on a shared folder): the epoch's check stops the run."""
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


def test_a_resume_refuses_data_changed_since_its_checkpoint(data_root, tmp_path, capsys):
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
