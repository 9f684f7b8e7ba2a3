"""rga.config: the typed run configuration, its presets, the paper's model rows, legacy configs."""
import json

import pytest
import torch
from torch import nn

from rga import config as C
from rga.checkpoint import FORMAT_VERSION
from rga.models import build_from_config
from rga.modules import RGAModule


def test_defaults_are_the_paper_recipe():
    c = C.RunConfig()
    assert C.resolve([("preset paper", C.PRESETS["paper"])]) == c
    m, d, o, e = c.model, c.data, c.optim, c.eval
    assert (m.variant, m.backbone, m.height, m.width, m.stages, m.pretrained) == (
        "rga_sc", "resnet50", 256, 128, (1, 2, 3, 4), "auto")
    assert (m.use_relation, m.use_original, m.embedding, m.cha_ratio, m.spa_ratio, m.down_ratio) == (
        True, True, "asymmetric", 8, 8, 8)
    assert (d.dataset, d.sampler, d.batch_ids, d.batch_instances, d.crop, d.crop_prob, d.flip_prob,
            d.erasing_prob) == ("synthetic", "one_group", 16, 4, "random2d", 0.5, 0.5, 0.5)
    assert (o.label_smooth, o.margin, o.lr, o.weight_decay, o.warmup_epochs, o.warmup_lr, o.milestones, o.gamma,
            o.epochs) == (0.1, 0.3, 8e-4, 5e-4, 20, 8e-6, [80, 120, 160, 200, 240, 280, 320, 360], 0.5, 600)
    assert (e.eval_every, e.eval_feat, e.metric, e.rerank, e.flip_test) == (40, "bn", "cosine", False, False)
    assert m.label() == "rga_sc"


# the rows of the paper's Tables 1 and 4 -> (variant, branches, order, relation, original, embedding)
ROWS = {
    "baseline": None,
    "rga_s_wo_rel": ("rga_s", (True, False), None, False, True, None),
    "rga_s_wo_ori": ("rga_s", (True, False), None, True, False, "asymmetric"),
    "rga_s": ("rga_s", (True, False), None, True, True, "asymmetric"),
    "rga_c_wo_rel": ("rga_c", (False, True), None, False, True, None),
    "rga_c_wo_ori": ("rga_c", (False, True), None, True, False, "asymmetric"),
    "rga_c": ("rga_c", (False, True), None, True, True, "asymmetric"),
    "rga_s_par_c": ("rga_s_par_c", (True, True), "parallel", True, True, "asymmetric"),
    "rga_cs": ("rga_cs", (True, True), "cs", True, True, "asymmetric"),
    "rga_sc": ("rga_sc", (True, True), "sc", True, True, "asymmetric"),
    "wo_embedding": ("rga_sc", (True, True), "sc", True, True, "none"),
    "symmetric": ("rga_sc", (True, True), "sc", True, True, "symmetric"),
    "asymmetric": ("rga_sc", (True, True), "sc", True, True, "asymmetric"),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_model_rows_build_the_paper_rows(row):
    cfg = C.resolve([("command line", {"--model": row, "--backbone": "resnet18", "--height": "64",
                                        "--width": "32"})])
    model = build_from_config(cfg.model, 5)
    mods = model.rga_modules()
    want = ROWS[row]
    if want is None:
        assert mods == [] and cfg.model.variant == "baseline"
        return
    variant, branches, order, relation, original, embedding = want
    assert cfg.model.variant == variant and len(mods) == 4
    for m in mods:
        assert (m.use_spatial, m.use_channel) == branches
        assert (m.use_relation, m.use_original) == (relation, original)
        if order:
            assert m.order == order
        if embedding:
            assert m.embedding == embedding
    # the label names the row back (asymmetric is rga_sc itself)
    assert cfg.model.label() == ("rga_sc" if row == "asymmetric" else row)


def test_stages_and_ratios_from_flags():
    cfg = C.resolve([("command line", {"--model": "rga_s_wo_ori", "--stages": "3,2", "--backbone": "resnet18",
                                        "--height": "64", "--width": "32", "--cha-ratio": "4", "--down-ratio": "2"})])
    assert cfg.model.stages == (2, 3) and cfg.model.label() == "rga_s+custom-s23"
    model = build_from_config(cfg.model, 5)
    att = [getattr(model.backbone, f"rga_att{i}") for i in range(1, 5)]
    assert [isinstance(a, RGAModule) for a in att] == [False, True, True, False]
    assert not any(k.startswith(("backbone.rga_att1.", "backbone.rga_att4.")) for k in model.state_dict())
    assert att[1].cha_ratio == 4 and att[1].down_ratio == 2 and not att[1].use_original
    # a later source's --model resets the row; a later single option overrides one field
    cfg = C.resolve([("file", {"model": "rga_s_wo_ori", "cha_ratio": 4}), ("command line", {"--model": "rga_c"})])
    assert cfg.model.variant == "rga_c" and cfg.model.use_original and cfg.model.cha_ratio == 8


@pytest.mark.parametrize("values,msg", [
    ({"stages": "0,1"}, "subset of 1,2,3,4"),
    ({"stages": ""}, "--model baseline"),
    ({"model": "baseline", "cha_ratio": 4}, "the baseline has no attention modules"),
    ({"embedding": "diagonal"}, "expected one of asymmetric"),
    ({"cha_ratio": 0}, "must be >= 1"),
    ({"use_relation": "maybe"}, "expected true or false"),
    ({"sampler": "random"}, "expected one of one_group, all_groups"),
    ({"crop": "zoom"}, "expected one of random2d"),
    ({"variant": "rga_x"}, "expected one of baseline"),
    ({"model": {"heigth": 64}}, "unknown option 'model.heigth'"),
    ({"lr": 0}, "lr and warmup_lr must be > 0"),
    ({"config": "x.json"}, "cannot be set inside a config"),
])
def test_bad_values_name_the_key_and_what_was_expected(values, msg):
    with pytest.raises(C.ConfigError, match=msg):
        C.resolve([("my.json", values)])


def test_round_trip_through_dict_and_json(tmp_path):
    cfg = C.resolve([("x", {"model": "rga_c_wo_rel", "stages": [1, 3], "dataset_opt": ["variant=detected"],
                            "milestones": "5,9", "fused": "cpp", "seed": -3})])
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert C.RunConfig.from_dict(d) == cfg
    assert cfg.data.dataset_opt == {"variant": "detected"} and cfg.optim.milestones == [5, 9]
    # a saved config.json is a config file
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    assert C.resolve([("file", C.load_config_file(path))]) == cfg


def test_legacy_argparse_config():
    """The flat vars(args) that checkpoints held before format 2 (every key the old parser had)."""
    old = {"config": None, "preset": "quick", "dataset": "synthetic", "data_root": "data",
           "dataset_opt": [["num_train_ids", 8]], "height": 64, "width": 32, "workers": 0, "test_batch_size": 64,
           "arch": "rga_cs", "backbone": "resnet18", "pretrained": None, "fused_rga": "cpp", "batch_ids": 8,
           "batch_instances": 4, "pad": 4, "flip_prob": 0.5, "erasing_prob": 0.0, "label_smooth": 0.1,
           "margin": 0.3, "id_weight": 1.0, "triplet_weight": 1.0, "lr": 8e-4, "weight_decay": 5e-4,
           "warmup_epochs": 0, "warmup_lr": 8e-6, "milestones": [10], "gamma": 0.5, "epochs": 14,
           "eval_every": 0, "eval_feat": "bn", "metric": "cosine", "rerank": False, "flip_test": False,
           "output_dir": "runs/quick", "seed": 0, "resume": None, "ckpt_every": 1, "keep_checkpoints": 2,
           "tensorboard": False, "no_progress": True, "device": "auto", "amp": "auto", "channels_last": "auto",
           "threads": 0, "compile": False, "cuda_graphs": False, "sync_bn": False, "dist_backend": "auto",
           "deterministic": False}
    cfg = C.from_legacy(old)
    assert cfg.model.variant == "rga_cs" and cfg.model.backbone == "resnet18" and cfg.model.fused == "cpp"
    assert (cfg.model.height, cfg.model.width, cfg.model.stages) == (64, 32, (1, 2, 3, 4))
    assert cfg.data.sampler == "all_groups" and cfg.data.crop == "pad" and cfg.data.pad == 4
    assert cfg.data.dataset_opt == {"num_train_ids": 8} and cfg.run.progress is False


class _Gate(nn.Module):
    """A stand-in for another attention design (an SE-like channel gate)."""

    def __init__(self, channels, spatial_size, reduction=4):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]


def test_another_attention_design_is_one_table_entry(monkeypatch, tmp_path):
    """A design added to rga.models.ATTENTIONS and VARIANTS is a --model for training, and its
    checkpoints rebuild through load_model, with no other change."""
    import rga.models as M
    from rga.checkpoint import load_model

    monkeypatch.setitem(M.ATTENTIONS, "gate", _Gate)
    monkeypatch.setitem(M.VARIANTS, "gate", dict(attention="gate", reduction=2))
    cfg = C.resolve([("command line", {"--model": "gate", "--backbone": "resnet18", "--height": "64",
                                        "--width": "32", "--stages": "4"})])
    assert cfg.model.label() == "gate-s4"
    model = build_from_config(cfg.model, 3)
    assert isinstance(model.backbone.rga_att4, _Gate) and model.backbone.rga_att4.fc[0].out_features == 256
    torch.save({"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "num_classes": 3,
                "model": model.state_dict()}, tmp_path / "g.pth")
    again = load_model(tmp_path / "g.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="gate has no RGA modules"):
        build_from_config(C.resolve([("x", {"model": "gate", "cha_ratio": 4})]).model, 3)
