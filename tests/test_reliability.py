"""Issue 9, end to end on tiny runs (ResNet-18 RGA-SC at 64x32, CPU, one thread): one run per
folder, the resume rule, the dataset checked before the first epoch, the final checkpoint saved
before the final evaluation, and one `error:` line with exit code 2 for each user-facing failure."""
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rga.train as rtrain
from testkit import REPO, SUBPROCESS_ENV as ENV, one_error_line, read_only_folder, tiny_run_args



def args_for(data_root, out, *extra, dataset="synthetic"):
    return tiny_run_args(data_root, out, *extra, dataset=dataset, pretrained=None)


def train(data_root, out, *extra, **kw):
    return rtrain.main(args_for(data_root, out, *extra, **kw))


@pytest.fixture(scope="module")
def run2(data_root, tmp_path_factory):
    """A finished 2-epoch run keeping both checkpoints."""
    out = tmp_path_factory.mktemp("run2") / "E"
    assert train(data_root, out, "--epochs", "2", "--keep-checkpoints", "0") == 0
    return out


# --------------------------------------------------------------------------- 4: the dataset, before the first epoch

@pytest.fixture(scope="module")
def market_copy(data_root, tmp_path_factory):
    src = Path(data_root) / "synthetic"
    dst = tmp_path_factory.mktemp("market") / "clean"
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        shutil.copytree(src / split, dst / split)
    return dst


def broken_copy(market_copy, tmp_path, how):
    root = tmp_path / how
    shutil.copytree(market_copy, root)
    if how == "empty_query":
        for p in (root / "query").iterdir():
            p.unlink()
        return root, "empty split(s): query"
    split = "bounding_box_test" if how == "bad_gallery" else "bounding_box_train"
    victim = sorted((root / split).iterdir())[3]
    victim.write_bytes(b"this is not a JPEG")
    return root, f"{victim} (UnidentifiedImageError: cannot identify image file)"


@pytest.mark.parametrize("how", ["empty_query", "bad_gallery", "bad_train"])
def test_dataset_problems_stop_the_run_before_the_first_epoch(market_copy, tmp_path, capsys, monkeypatch, how):
    root, expected = broken_copy(market_copy, tmp_path, how)
    epochs, real = [], rtrain.train_one_epoch
    monkeypatch.setattr(rtrain, "train_one_epoch", lambda *a, **kw: epochs.append(1) or real(*a, **kw))
    capsys.readouterr()
    assert train(root, tmp_path / "run", "--epochs", "1", dataset="market1501") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "dataset market1501: " in line and expected in line
    assert not epochs and not list((tmp_path / "run").glob("checkpoint_*"))


def test_final_checkpoint_is_saved_before_the_final_evaluation(data_root, tmp_path, capsys, monkeypatch):
    from rga.data import ImageReadError

    def failing_eval(*a, **kw):
        raise ImageReadError("cannot read image /x/0001_c1s1_000001_00.jpg: OSError: disk went away")

    monkeypatch.setattr(rtrain, "evaluate_model", failing_eval)
    capsys.readouterr()
    assert train(data_root, tmp_path / "run", "--epochs", "1") == 2
    assert "cannot read image /x/0001_c1s1_000001_00.jpg" in one_error_line(capsys.readouterr().err)
    ck = torch.load(tmp_path / "run" / "checkpoint_ep0001.pth", weights_only=True)  # the epoch is not lost
    assert ck["epoch"] == 1


def test_final_checkpoint_still_holds_the_final_metrics(run2):
    """Saved before the evaluation, then again with its metrics."""
    ck = torch.load(run2 / "checkpoint_ep0002.pth", weights_only=True)
    assert ck["epoch"] == 2 and ck["metrics"]["epoch"] == 2 and 0 <= ck["metrics"]["mAP"] <= 1
    assert "saved" in (run2 / "train.log").read_text()


# --------------------------------------------------------------------------- 7 and 8: one error line, exit 2

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
    assert train(data_root, out, "--epochs", "1", *extra) == 2
    assert expected in one_error_line(capsys.readouterr().err)


def test_disk_full_while_saving_is_one_line_with_the_cause(data_root, tmp_path):
    """A checkpoint write that runs out of room (RLIMIT_FSIZE: the same failure path as a full
    disk) in a real `python -m rga.train` process: one line naming the file and the reason."""
    out = tmp_path / "run"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, resource.RLIM_INFINITY))

    res = subprocess.run([sys.executable, "-m", "rga.train", *args_for(data_root, out, "--epochs", "1")], env=ENV,
                         cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_error_line(res.stderr)
    assert f"could not write checkpoint {out / 'checkpoint_ep0001.pth'}: File too large (EFBIG)" in line
    # no temp file, no lock (metrics.jsonl holds the trained epoch's line, written before the checkpoint)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "train.log"]
