"""End-to-end tests of rga.train / rga.evaluate on a tiny synthetic dataset and a ResNet-18 RGA-SC
at 64x32, on CPU: resume equivalence, a 2-process gloo run, flags, config files, error messages."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rga.train as rtrain
from rga import evaluate as reval
from testkit import TINY_DATA, one_error_line, quick_market_args, tiny_run_args

def base_args(data_root, out, *extra):
    return tiny_run_args(data_root, out, *extra)


def train(data_root, out, *extra):
    return rtrain.main(base_args(data_root, out, *extra))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    assert train(data_root, out, "--epochs", "2") == 0
    return load(out / "checkpoint_ep0002.pth")


def test_resume_gives_identical_weights(data_root, straight_run, tmp_path, monkeypatch):
    a = straight_run
    # the same run, stopped after 1 epoch (main() returns: nothing but the checkpoint carries over) ...
    assert train(data_root, tmp_path / "split", "--epochs", "1") == 0
    shutil.copytree(tmp_path / "split", tmp_path / "split_norng")
    # ... and continued to 2 with --resume auto
    assert train(data_root, tmp_path / "split", "--epochs", "2", "--resume", "auto") == 0
    b = load(tmp_path / "split" / "checkpoint_ep0002.pth")
    assert a["epoch"] == b["epoch"] == 2
    assert same_weights(a["model"], b["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert a["scheduler"] == b["scheduler"] and a["sampler"] == b["sampler"]
    assert a["metrics"]["mAP"] == b["metrics"]["mAP"]
    assert sorted(p.name for p in (tmp_path / "split").glob("checkpoint_ep*.pth")) == [
        "checkpoint_ep0001.pth", "checkpoint_ep0002.pth"]
    # control: the test notices a resume that forgets the RNG states (augmentation stream differs)
    monkeypatch.setattr(rtrain, "restore_rng_state", lambda state: None)
    assert train(data_root, tmp_path / "split_norng", "--epochs", "2", "--resume", "auto") == 0
    c = load(tmp_path / "split_norng" / "checkpoint_ep0002.pth")
    assert not same_weights(a["model"], c["model"])


def test_resume_after_sigkill(data_root, straight_run, tmp_path):
    """A training process killed (SIGKILL) right after its first checkpoint, then resumed."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rga.train", *base_args(data_root, out, "--epochs", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint_ep0001.pth").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL and not (out / "checkpoint_ep0002.pth").exists()
    assert train(data_root, out, "--epochs", "2", "--resume", "auto") == 0
    assert same_weights(straight_run["model"], load(out / "checkpoint_ep0002.pth")["model"])


def test_resume_from_explicit_path_and_missing_path(data_root, tmp_path, capsys):
    assert train(data_root, tmp_path / "r", "--epochs", "1", "--eval-every", "1") == 0
    metrics = json.loads((tmp_path / "r" / "metrics" / "epoch_0001.json").read_text())
    for k in ("R1", "R5", "R10", "R20", "mAP", "mINP"):
        assert 0.0 <= metrics[k] <= 1.0
    # the paper's sampler: one group of K per identity per epoch, 8 ids / 4 per batch = 2 batches
    assert metrics["epoch"] == 1 and metrics["train"]["batches"] == 2
    assert (tmp_path / "r" / "train.log").read_text().count("eval @ epoch 1") == 1
    # an explicit path continues too
    ck = tmp_path / "r" / "checkpoint_ep0001.pth"
    assert train(data_root, tmp_path / "r2", "--epochs", "2", "--resume", str(ck)) == 0
    assert load(tmp_path / "r2" / "checkpoint_ep0002.pth")["epoch"] == 2
    # a missing one is a clear error, not a traceback
    assert train(data_root, tmp_path / "r3", "--resume", str(tmp_path / "nope.pth")) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    # starting over in a folder with checkpoints, without --resume, is refused
    assert train(data_root, tmp_path / "r", "--epochs", "2") == 2
    assert "--resume auto" in capsys.readouterr().err


def test_resume_keeps_the_recorded_gate_init(data_root, tmp_path, capsys):
    from rga.fileio import load_torch

    out = tmp_path / "run"
    assert rtrain.main(tiny_run_args(data_root, out, "--model", "rga_s", "--gate-init", "zero", "--epochs", "1")) == 0
    assert rtrain.main(tiny_run_args(data_root, out, "--model", "rga_s", "--gate-init", "public", "--epochs", "2",
                                     "--resume", "auto")) == 0
    assert json.loads((out / "config.json").read_text())["model"]["gate_init"] == "zero"
    assert load_torch(out / "checkpoint_ep0002.pth")["config"]["model"]["gate_init"] == "zero"
    assert "gate_init stays 'zero' as recorded" in (out / "train.log").read_text()


def test_flags_reach_the_run(data_root, tmp_path, monkeypatch):
    seen = {}
    real = rtrain.train_one_epoch

    def spy(step, loader, *a, **kw):
        imgs, pids, _, _ = next(iter(loader))
        seen["shape"] = tuple(imgs.shape)
        seen["ids_per_batch"] = len(set(pids.tolist()))
        return real(step, loader, *a, **kw)

    monkeypatch.setattr(rtrain, "train_one_epoch", spy)
    assert train(data_root, tmp_path / "a", "--epochs", "1", "--model", "baseline", "--height", "48", "--width", "24",
                 "--batch-ids", "2", "--batch-instances", "4", "--lr", "2e-3", "--warmup-epochs", "0",
                 "--weight-decay", "1e-3", "--seed", "5") == 0
    assert seen["shape"] == (8, 3, 48, 24) and seen["ids_per_batch"] == 2
    ck = load(tmp_path / "a" / "checkpoint_ep0001.pth")
    group = ck["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(2e-3) and group["weight_decay"] == pytest.approx(1e-3)
    assert ck["sampler"]["seed"] == 5 and ck["config"]["model"]["height"] == 48
    assert not any("rga" in k for k in ck["model"])  # --arch baseline: no RGA modules
    assert ck["metrics"]["epoch"] == 1  # the last epoch is always evaluated
    # warm-up: epoch 0 of a 2-epoch warm-up runs at --warmup-lr
    assert train(data_root, tmp_path / "b", "--epochs", "1", "--warmup-epochs", "2", "--warmup-lr", "1e-5",
                 "--model", "baseline", "--seed", "5", "--height", "48", "--width", "24", "--batch-ids", "2", "--batch-instances", "4") == 0
    assert load(tmp_path / "b" / "checkpoint_ep0001.pth")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)
    # another seed, other weights
    assert train(data_root, tmp_path / "c", "--epochs", "1", "--model", "baseline", "--height", "48", "--width", "24",
                 "--batch-ids", "2", "--batch-instances", "4", "--lr", "2e-3", "--warmup-epochs", "0",
                 "--weight-decay", "1e-3", "--seed", "6") == 0
    assert not same_weights(ck["model"], load(tmp_path / "c" / "checkpoint_ep0001.pth")["model"])


def test_config_file_and_precedence(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"epochs": 2, "batch-ids": 2, "margin": 0.5, "eval_feat": "pool"}))
    c = rtrain.parse_config(["--config", str(cfg), "--epochs", "1"])
    assert c.optim.epochs == 1 and c.data.batch_ids == 2 and c.optim.margin == 0.5 and c.eval.eval_feat == "pool"
    c = rtrain.parse_config(["--preset", "quick", "--config", str(cfg)])
    assert c.model.backbone == "resnet18" and c.optim.epochs == 2  # the file beats the preset
    # a file nested by section, as checkpoints and config.json store it
    cfg.write_text(json.dumps({"model": {"height": 64, "width": 32}, "optim": {"epochs": 3}}))
    c = rtrain.parse_config(["--config", str(cfg)])
    assert (c.model.height, c.model.width, c.optim.epochs) == (64, 32, 3)
    for bad, msg in [({"epoch": 3}, "unknown option 'epoch'"), ({"metric": "l1"}, "expected one of cosine"),
                     ({"epochs": "many"}, "bad value for 'epochs'"), ({"model": "rga_x"}, "unknown model 'rga_x'")]:
        cfg.write_text(json.dumps(bad))
        assert rtrain.main(["--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert msg in err and str(cfg) in err and "Traceback" not in err
    assert rtrain.main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "config file not found" in capsys.readouterr().err
    # the old spelling of --model still works, on the command line and in files
    assert rtrain.parse_config(["--arch", "rga_s"]).model.variant == "rga_s"
    cfg.write_text(json.dumps({"arch": "rga_c", "fused_rga": "torch"}))
    c = rtrain.parse_config(["--config", str(cfg)])
    assert (c.model.variant, c.model.fused) == ("rga_c", "torch")


def test_shipped_configs_parse():
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.json"))
    assert {f.stem for f in files} >= {"market1501", "cuhk03", "msmt17", "quick"}
    paper = rtrain.parse_config(["--preset", "paper"])
    for f in files:
        c = rtrain.parse_config(["--config", str(f)])
        assert c.data.dataset in ("synthetic", "market1501", "cuhk03", "msmt17")
        if f.stem != "quick":  # the real-data recipes are the paper preset plus a dataset and weights file
            assert c.model == dataclasses.replace(paper.model, pretrained=c.model.pretrained)
            assert c.optim == paper.optim and c.eval == paper.eval
            assert dataclasses.replace(c.data, dataset="x", dataset_opt={}) == dataclasses.replace(
                paper.data, dataset="x", dataset_opt={})
    # configs/quick.json is the --preset quick of the README, written out
    assert rtrain.parse_config(["--config", str(root / "quick.json")]) == rtrain.parse_config(["--preset", "quick"])


@pytest.mark.parametrize("argv,msg", [
    (["--dataset", "nosuchset"], "unknown dataset"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA GPU"),
    (["--sync-bn", "--device", "cpu"], "--sync-bn needs CUDA GPUs"),
    (["--amp", "bf16", "--device", "cpu"], "--amp bf16 needs a CUDA GPU"),
    (["--batch-ids", "9"], "at least 9 training identities"),
    (["--milestones", "5", "3"], "increasing"),
    (["--stages", "2,5"], "subset of 1,2,3,4"),
    (["--model", "baseline", "--stages", "2"], "the baseline has no attention modules"),
    (["--model", "rga_s", "--no-use-relation", "--no-use-original"], "needs use_relation or use_original"),
    (["--model", "rga_q"], "unknown model 'rga_q'"),
    (["--crop-prob", "2"], "must be in [0, 1]"),
    (["--pretrained", "/nonexistent/resnet.pth"], "--pretrained file not found"),
    (["--fused-rga", "flash"], "--fused-rga flash: unknown backend"),
    (["--fused-rga", "cuda", "--device", "cpu"], "--fused-rga cuda cannot run on cpu"),
    (["--dist-backend", "nccl", "--device", "cpu"], "--dist-backend nccl needs CUDA GPUs"),
])
def test_bad_input_gives_clear_errors(data_root, tmp_path, capsys, argv, msg):
    assert train(data_root, tmp_path / "x", "--epochs", "1", *argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_tensorboard_flag(data_root, tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert train(data_root, tmp_path / "tb", "--epochs", "1", "--tensorboard") == 2
        assert "pip install tensorboard" in capsys.readouterr().err
    else:
        assert train(data_root, tmp_path / "tb", "--epochs", "1", "--tensorboard") == 0
        assert any((tmp_path / "tb" / "tensorboard").iterdir())


def test_evaluate_cli(data_root, tmp_path, capsys, monkeypatch):
    assert train(data_root, tmp_path / "run", "--epochs", "1") == 0
    capsys.readouterr()
    out = tmp_path / "m.json"
    assert reval.main(["--checkpoint", str(tmp_path / "run"), "--workers", "0", "--threads", "1",
                       "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for k in ("R1", "R5", "R10", "R20", "mAP", "mINP"):
        assert k in printed
    m = json.loads(out.read_text())
    assert m["epoch"] == 1 and m["feat"] == "bn" and m["metric"] == "cosine" and not m["flip"]
    # the evaluation in training and the stand-alone one agree
    assert m["mAP"] == pytest.approx(load(tmp_path / "run" / "checkpoint_ep0001.pth")["metrics"]["mAP"])

    # --feat, --flip and --metric change what reaches rga.metrics.evaluate_features
    import rga.metrics
    calls = []
    real = rga.metrics.evaluate_features

    def spy(qf, gf, *a, **kw):
        calls.append((qf.clone(), kw["metric"], kw["rerank"]))
        return real(qf, gf, *a, **kw)

    monkeypatch.setattr(rga.metrics, "evaluate_features", spy)
    common = ["--checkpoint", str(tmp_path / "run" / "checkpoint_ep0001.pth"), "--workers", "0", "--no-progress"]
    assert reval.main(common) == 0
    assert reval.main(common + ["--feat", "pool"]) == 0
    assert reval.main(common + ["--flip"]) == 0
    assert reval.main(common + ["--metric", "euclidean", "--rerank"]) == 0
    bn, pool, flip, euc = calls
    assert not torch.allclose(bn[0], pool[0]) and not torch.allclose(bn[0], flip[0])
    assert torch.equal(bn[0], euc[0]) and euc[1] == "euclidean" and euc[2] is True and bn[1] == "cosine"

    assert reval.main(["--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bogus = tmp_path / "bogus.pth"
    bogus.write_bytes(b"not a checkpoint")
    assert reval.main(["--checkpoint", str(bogus)]) == 2
    assert "could not read checkpoint" in capsys.readouterr().err


def test_two_process_gloo_run(data_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rga.train",
           *base_args(data_root, out, "--epochs", "2", "--batch-ids", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ck = load(out / "checkpoint_ep0002.pth")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # per-rank augmentation streams
    log = (out / "train.log").read_text()
    assert "world_size=2" in log and log.count("eval @ epoch 2") == 1  # rank 0 alone evaluates and logs
    # 8 ids, 2 per rank per step: 2 steps of 4 ids x ... each rank ran the same number of batches
    assert "epoch 2/2" in log


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    from rga.checkpoint import atomic_save, find_latest, list_checkpoints, prune_checkpoints
    path = tmp_path / "checkpoint_ep0001.pth"
    atomic_save({"epoch": 1}, path)
    with pytest.raises(Exception):
        atomic_save({"epoch": 2, "bad": lambda: None}, path)  # a lambda cannot be pickled
    assert load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    for e in (3, 12, 7):
        atomic_save({"epoch": e}, tmp_path / f"checkpoint_ep{e:04d}.pth")
    assert find_latest(tmp_path).name == "checkpoint_ep0012.pth"
    prune_checkpoints(tmp_path, 2)
    assert [e for e, _ in list_checkpoints(tmp_path)] == [7, 12]


class _Stop(Exception):
    pass


def test_model_flags_reach_build_model(data_root, tmp_path, monkeypatch):
    import rga.models
    got = {}

    def spy(name, num_classes, **kw):
        got.clear()
        got.update(kw, name=name, num_classes=num_classes)
        raise _Stop

    monkeypatch.setattr(rga.models, "build_model", spy)
    weights = tmp_path / "r18.pth"
    weights.write_bytes(b"")
    with pytest.raises(_Stop):
        train(data_root, tmp_path / "m", "--model", "rga_s", "--fused-rga", "--pretrained", str(weights),
              "--eval-feat", "pool")
    assert got == {"name": "rga_s", "num_classes": 8, "height": 64, "width": 32, "fused": True,
                   "pretrained": str(weights), "backbone": "resnet18", "neck_feat": "pool", "stages": (1, 2, 3, 4)}
    with pytest.raises(_Stop):
        train(data_root, tmp_path / "m2", "--fused-rga", "triton")
    assert got["fused"] == "triton" and got["pretrained"] is False and got["neck_feat"] == "bn"
    # every RGA option and the stages reach the model
    with pytest.raises(_Stop):
        train(data_root, tmp_path / "m3", "--model", "rga_c_wo_rel", "--stages", "3,1", "--embedding", "symmetric",
              "--cha-ratio", "4", "--spa-ratio", "2", "--down-ratio", "16")
    assert got["name"] == "rga_c" and got["stages"] == (1, 3)
    assert {k: got[k] for k in ("use_relation", "embedding", "cha_ratio", "spa_ratio", "down_ratio")} == dict(
        use_relation=False, embedding="symmetric", cha_ratio=4, spa_ratio=2, down_ratio=16)


class _Payload:
    """Stands for any object a malicious checkpoint could smuggle in (its unpickling runs code)."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_loading_refuses_arbitrary_objects(tmp_path, capsys):
    from rga.checkpoint import CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state

    good = tmp_path / "good.pth"
    torch.save({"epoch": 1, "model": {"w": torch.ones(2)}, "rng": [capture_rng_state()]}, good)
    state = load_checkpoint(good)
    restore_rng_state(state["rng"][0])  # RNG states round-trip through the safe loader
    bad = tmp_path / "bad.pth"
    torch.save({"epoch": 1, "payload": _Payload()}, bad)
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        load_checkpoint(bad)
    assert "this must never run" not in capsys.readouterr().out


def test_ablation_trains_and_its_checkpoint_alone_rebuilds_it(data_root, tmp_path, capsys):
    """The issue's 'done': an ablation row with a stage subset trains; rga.evaluate and
    FeatureExtractor rebuild exactly that network from the run folder with no model flags."""
    from rga import FeatureExtractor
    from rga.checkpoint import load_model

    run = tmp_path / "abl"
    assert train(data_root, run, "--model", "rga_s_wo_ori", "--stages", "2,3", "--epochs", "1") == 0
    ck = load(run / "checkpoint_ep0001.pth")
    assert ck["format_version"] == 2 and ck["config"]["model"]["stages"] == [2, 3]
    assert json.loads((run / "config.json").read_text()) == ck["config"]
    keys = ck["model"].keys()
    assert any(k.startswith("backbone.rga_att2.gg_spatial") for k in keys)
    assert not any(k.startswith(("backbone.rga_att1.", "backbone.rga_att4.")) or "_channel" in k or "gx_" in k
                   for k in keys)
    model, info = load_model(run, with_info=True)
    assert info.model.label() == "rga_s_wo_ori-s23" and model.stages == (2, 3)
    assert same_weights(model.state_dict(), ck["model"])
    capsys.readouterr()
    out = tmp_path / "m.json"
    assert reval.main(["--checkpoint", str(run), "--workers", "0", "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rga_s_wo_ori-s23 / resnet18 64x32, stages 2,3" in printed
    assert json.loads(out.read_text())["mAP"] == pytest.approx(ck["metrics"]["mAP"])
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(x), dim=1)
    torch.testing.assert_close(FeatureExtractor(run, device="cpu")(x), expected)
    # flags that would change the architecture are refused; dataset and evaluation ones are said out loud
    for flags, msg in [(["--height", "128"], "height=128 differs from its height=64"),
                       (["--model", "rga_s"], "use_original=True differs from its use_original=False"),
                       (["--stages", "1,2,3,4"], "stages=(1, 2, 3, 4) differs")]:
        assert reval.main(["--checkpoint", str(run), "--workers", "0", *flags]) == 2
        err = capsys.readouterr().err
        assert msg in err and "architecture comes from the checkpoint" in err
    assert reval.main(["--checkpoint", str(run), "--workers", "0", "--no-progress", "--stages", "3,2",
                       "--metric", "euclidean"]) == 0  # the checkpoint's own value is fine
    assert "overriding the checkpoint's metric: 'euclidean' instead of the checkpoint run's 'cosine'" in \
        capsys.readouterr().out
    # resuming with another architecture is refused too
    assert train(data_root, run, "--model", "rga_s_wo_ori", "--epochs", "2", "--resume", "auto") == 2
    assert "stages (2, 3) -> (1, 2, 3, 4)" in capsys.readouterr().err


def test_evaluate_public_checkpoint(data_root, tmp_path, capsys):
    """rga.evaluate on a file in the public training script's layout (it names no dataset)."""
    torch.manual_seed(0)
    from rga import build_model
    model = build_model("rga_sc", 751, pretrained=False)
    path = tmp_path / "checkpoint_600.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 600,
                "best_top1": 0.0, "optimizer": torch.optim.Adam(model.parameters()).state_dict()}, path)
    common = ["--checkpoint", str(path), "--workers", "0", "--no-progress", "--threads", "1"]
    assert reval.main(common) == 2
    assert "does not say which dataset" in capsys.readouterr().err
    data = ["--dataset", "synthetic", "--data-root", str(data_root)] + [f"--dataset-opt={kv}" for kv in TINY_DATA]
    assert reval.main(common + data + ["--output", str(tmp_path / "p.json")]) == 0
    printed = capsys.readouterr().out
    assert "public training script, epoch 600" in printed and "rga_sc / resnet50 256x128" in printed
    m = json.loads((tmp_path / "p.json").read_text())
    assert m["checkpoint_kind"] == "public training script" and 0 <= m["mAP"] <= 1


def test_trainer_never_changes_the_callers_config(tmp_path):
    cfg = rtrain.parse_config(["--preset", "quick", "--output-dir", str(tmp_path / "{model}-seed{seed}")])
    before = cfg.to_dict()
    trainer = rtrain.Trainer(cfg)
    assert trainer.cfg.run.output_dir == str(tmp_path / "rga_sc-seed0")  # the trainer's copy is filled in
    assert cfg.to_dict() == before and cfg.run.output_dir == str(tmp_path / "{model}-seed{seed}")
    unnamed = rtrain.parse_config(["--preset", "quick", "--output-dir", "none"])
    assert unnamed.run.output_dir is None  # no folder given: the trainer picks one, the caller's stays empty
    assert rtrain.Trainer(unnamed).cfg.run.output_dir == "runs/synthetic-rga_sc-resnet18"
    assert unnamed.run.output_dir is None


# ------------------------------------------------------------------------------
# a bad kernel backend in the environment
# ------------------------------------------------------------------------------

def test_bogus_kernel_backend_is_one_error_line(market_root, tmp_path, monkeypatch, capsys):
    from rga import evaluate as reval

    monkeypatch.setenv("RGA_KERNELS_BACKEND", "bogus")
    assert rtrain.main(quick_market_args(market_root, tmp_path / "r", "--epochs", "1", "--fused-rga")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "RGA_KERNELS_BACKEND=bogus" in line and "unknown backend" in line, line
    # rga.evaluate of a fused run
    monkeypatch.delenv("RGA_KERNELS_BACKEND")
    out = tmp_path / "fused"
    assert rtrain.main(quick_market_args(market_root, out, "--epochs", "1", "--fused-rga")) == 0
    capsys.readouterr()
    monkeypatch.setenv("RGA_KERNELS_BACKEND", "bogus")
    assert reval.main(["--checkpoint", str(out), "--threads", "1", "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "RGA_KERNELS_BACKEND=bogus" in line, line
