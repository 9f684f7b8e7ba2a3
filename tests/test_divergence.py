"""rga.divergence: the per-batch loss rule and the finite-weights check, alone and in rga.train (a
diverged run stops with one error line naming the epoch, on every rank, and never writes a
non-finite checkpoint)."""
import subprocess
import sys

import pytest
import torch

import rga.train as rtrain
from rga import build_model
from testkit import REPO, SUBPROCESS_ENV, one_error_line, quick_market_args

H, W = 64, 32


def test_diverged_run_stops_with_an_error_naming_the_epoch(market_root, tmp_path):
    """The issue's command (--lr 1e8): exit 2, one error line naming the epoch, no checkpoint."""
    out = tmp_path / "nan"
    r = subprocess.run([sys.executable, "-m", "rga.train", *quick_market_args(market_root, out, "--epochs", "3",
                                                                      "--milestones", "1", "--lr", "1e8")],
                       env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    line = one_error_line(r.stderr)
    assert "epoch 1:" in line and ("exploded" in line or "diverged" in line), line
    assert "no checkpoint was written" in line
    assert not list(out.glob("checkpoint_ep*.pth")) and not (out / "metrics.jsonl").exists()


def test_non_finite_batch_norm_statistics_stop_the_run(market_root, tmp_path, monkeypatch, capsys):
    """With the loss rule out of the way (a huge factor), the weight check alone stops the run:
    Adam keeps the loss finite while batch-norm variances overflow to Inf."""
    import rga.divergence

    monkeypatch.setattr(rga.divergence, "EXPLOSION_FACTOR", 1e300)
    out = tmp_path / "inf"
    assert rtrain.main(quick_market_args(market_root, out, "--epochs", "3", "--milestones", "1", "--lr", "1e8")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "epoch 1: training diverged" in line and "running_var" in line and "NaN or Inf" in line, line
    assert not list(out.glob("checkpoint_ep*.pth"))


def test_diverged_distributed_run_stops_on_every_rank(market_root, tmp_path):
    """2 processes (gloo): the rule sees the loss averaged over the ranks, so both stop at the same
    batch with the same error (no rank left waiting in a collective)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rga.train",
           *quick_market_args(market_root, out, "--epochs", "3", "--milestones", "1", "--lr", "1e8", "--batch-ids", "2")]
    r = subprocess.run(cmd, env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("rga.train: error:")]
    assert len(errors) == 2 and errors[0] == errors[1] and "epoch 1:" in errors[0], r.stderr[-3000:]
    assert not list(out.glob("checkpoint_ep*.pth"))


def test_no_non_finite_checkpoint_over_a_good_one(tmp_path):
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


def test_a_negative_running_variance_is_divergence(tmp_path):
    from rga.divergence import check_finite_state
    from rga.errors import TrainingDivergedError

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    check_finite_state(model, 1, all_ranks=False)
    model[1].running_var[2] = -0.5
    with pytest.raises(TrainingDivergedError, match=r"negative variance \(1.running_var\)"):
        check_finite_state(model, 1, all_ranks=False)
