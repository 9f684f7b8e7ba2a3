"""ResNet + RGA models: contract with the pipeline, parameter counts, checkpoints, size errors."""
import copy
import warnings

import pytest
import torch

import rga_kernels
from rga import RGAModule, build_model
from rga.models import VARIANTS, stage_sizes
from testkit import assert_close

SMALL_HW = dict(height=64, width=32)  # stage maps 16x8, 8x4, 4x2, 4x2


def _small(name="rga_sc", **kw):
    kw = {"backbone": "resnet18", "pretrained": False, **SMALL_HW, **kw}
    return build_model(name, 5, **kw)


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, millions", [("baseline", 25.1), ("rga_s", 28.3)])
def test_parameter_counts_match_paper_table3(name, millions):
    model = build_model(name, 751, pretrained=False)
    assert round(_count(model) / 1e6, 1) == millions


def test_stage_sizes():
    assert stage_sizes(256, 128) == [(64, 32), (32, 16), (16, 8), (16, 8)]
    assert stage_sizes(384, 128) == [(96, 32), (48, 16), (24, 8), (24, 8)]
    assert stage_sizes(250, 126) == [(63, 32), (32, 16), (16, 8), (16, 8)]  # ceil at every stride 2


def test_stage_sizes_match_the_backbone_for_odd_inputs():
    model = _small("rga_s", height=70, width=38).eval()
    seen = [m.spatial_size for m in model.rga_modules()]
    assert seen == stage_sizes(70, 38)
    assert model(torch.randn(1, 3, 70, 38)).shape == (1, 512)  # would raise if a size were wrong


def test_train_and_eval_outputs_and_neck_feat():
    torch.manual_seed(0)
    model = _small()
    assert model.feature_dim == 512
    x = torch.randn(2, 3, 64, 32)
    pooled, bn_feat, logits = model(x)
    assert pooled.shape == bn_feat.shape == (2, 512) and logits.shape == (2, 5)
    model.eval()
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 512)
    pooled_eval = torch.nn.functional.adaptive_avg_pool2d(model.backbone(x), 1).flatten(1)
    torch.testing.assert_close(out, model.feat_bn(pooled_eval))
    model.neck_feat = "pool"
    torch.testing.assert_close(model(x), pooled_eval)
    with pytest.raises(ValueError, match="neck_feat"):
        model.neck_feat = "fc"


def test_neck_and_classifier():
    model = _small("baseline")
    assert not model.feat_bn.bias.requires_grad
    assert model.feat_bn.weight.requires_grad
    assert model.cls.bias is None
    assert build_model("baseline", 3, pretrained=False).feature_dim == 2048


def test_variants_and_their_modules():
    for name in VARIANTS:
        if VARIANTS[name] is not None and VARIANTS[name].get("attention", "rga") != "rga":
            continue  # a Table 2 design (rga/attention.py): tests/test_attention.py
        model = _small(name)
        mods = model.rga_modules()
        if name == "baseline":
            assert mods == []
            continue
        assert len(mods) == 4
        m = mods[0]
        branches = {"rga_s": (True, False), "rga_c": (False, True)}.get(name, (True, True))
        assert (m.use_spatial, m.use_channel) == branches
        if m.use_spatial and m.use_channel:
            assert m.order == {"rga_sc": "sc", "rga_cs": "cs", "rga_s_par_c": "parallel"}[name]
    m = _small("rga_sc", use_relation=False, embedding="symmetric").rga_modules()[2]
    assert not m.use_relation and m.embedding == "symmetric"


def test_public_model_checkpoint_names():
    keys = build_model("rga_sc", 751, pretrained=False).state_dict().keys()
    for k in ("backbone.conv1.weight", "backbone.layer4.2.bn3.running_var", "backbone.rga_att1.theta_spatial.0.weight",
              "backbone.rga_att4.W_channel.4.running_mean", "feat_bn.weight", "cls.weight"):
        assert k in keys, k
    assert "cls.bias" not in keys


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_model_equals_reference_model(train):
    backend = "cpp" if "cpp" in rga_kernels.available_backends() else "torch"
    torch.manual_seed(0)
    ref = _small("rga_sc").double().train(train)
    fus = copy.deepcopy(ref)
    fus.fused = backend
    assert all(m.fused == backend for m in fus.rga_modules())
    x = torch.randn(2, 3, 64, 32, dtype=torch.float64)
    outs = []
    for m in (ref, fus):
        out = m(x)
        out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])
        out.square().sum().backward()
        outs.append(out.detach())
    assert_close(outs[1], outs[0], "float64_regrouped")
    # a deep net in train-mode BN at batch 2 amplifies rounding elementwise (entries near zero, and
    # the attention MLPs whose 1-channel BN makes some gradients a cancellation): compare norms
    for (n, p1), p2 in zip(ref.named_parameters(), fus.parameters()):
        if p1.grad is not None:
            assert (p2.grad - p1.grad).norm() <= 1e-8 * p1.grad.norm() + 1e-12, n
    for (n, b1), b2 in zip(ref.named_buffers(), fus.buffers()):
        assert_close(b2, b1, "float64_regrouped", msg=lambda msg: f"{n}: {msg}")


def test_a_whole_fused_model_pickles_after_a_step():
    """torch.save of a whole model (not its state_dict) after the fused path planned: the copy
    loads, runs on its own tensors and gives the original's output."""
    import io

    backend = "cpp" if "cpp" in rga_kernels.available_backends() else "torch"
    torch.manual_seed(0)
    model = _small("rga_sc", fused=backend).train()
    x = torch.randn(2, 3, 64, 32)
    out = model(x)
    sum(o.sum() for o in (out if isinstance(out, (tuple, list)) else [out])).backward()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copy_ = torch.load(buf, weights_only=False).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(copy_(x), model(x))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copy_.parameters(), model.parameters()))


@pytest.mark.parametrize("fused", [False, "torch"], ids=["reference", "fused"])
def test_wrong_image_size_error(fused):
    model = _small("rga_s", fused=fused).eval()
    with pytest.raises(ValueError, match=r"built for 64x32 images.*16x8 feature maps.*got 96x32.*height=96, width=32"):
        model(torch.randn(1, 3, 96, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 32))
    # a module called directly names its own built-for size and the model's image size
    with pytest.raises(ValueError, match=r"built for 16x8 feature maps.*got 8x8.*64x32 images"):
        model.backbone.rga_att1(torch.randn(1, 64, 8, 8))


def test_baseline_accepts_fused_flag():
    model = _small("baseline", fused=True)  # nothing to fuse: the same model, no error
    assert model.rga_modules() == [] and model.fused is False


def test_baseline_accepts_any_size():
    model = _small("baseline").eval()
    assert model(torch.randn(1, 3, 96, 48)).shape == (1, 512)


def test_build_model_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("rga_x", 5, pretrained=False)
    with pytest.raises(ValueError, match="backbone"):
        build_model("rga_s", 5, backbone="vgg16", pretrained=False)
    with pytest.raises(TypeError, match="unknown RGA option"):
        build_model("rga_s", 5, pretrained=False, use_relations=False)
    with pytest.raises(ValueError, match="no effect"):
        build_model("baseline", 5, pretrained=False, embedding="none")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("rga_s", 0, pretrained=False)
    with pytest.raises(ValueError, match="height"):
        build_model("rga_s", 5, pretrained=False, height=8)


# ------------------------------------------------------------------------------------------------
# ImageNet weights from a local torchvision checkpoint
# ------------------------------------------------------------------------------------------------

def _torchvision_like_state(arch, num_fc=1000):
    """A state dict with torchvision's resnet keys: our trunk's keys plus torchvision's fc."""
    torch.manual_seed(1)
    trunk = build_model("baseline", 3, backbone=arch, pretrained=False).backbone
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in trunk.state_dict().items()}
    width = 2048 if arch == "resnet50" else 512
    state["fc.weight"] = torch.randn(num_fc, width)
    state["fc.bias"] = torch.randn(num_fc)
    return state


def test_trunk_keys_are_torchvision_names():
    keys = build_model("baseline", 3, pretrained=False).backbone.state_dict().keys()
    # torchvision's resnet50 has 320 state-dict entries, fc.weight and fc.bias included
    assert len(keys) == 318
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
              "layer3.5.conv3.weight", "layer4.2.bn3.num_batches_tracked"):
        assert k in keys, k


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_pretrained_file_loads(tmp_path, arch):
    state = _torchvision_like_state(arch)
    path = tmp_path / f"{arch}-test.pth"
    torch.save(state, path)
    height, width = (64, 32)
    model = build_model("rga_sc", 7, backbone=arch, pretrained=str(path), height=height, width=width)
    got = model.backbone.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(got[k], v), k


def test_pretrained_true_reads_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="resnet18-"):
        build_model("rga_s", 5, backbone="resnet18", pretrained=True, **SMALL_HW)
    (tmp_path / "checkpoints").mkdir()
    state = _torchvision_like_state("resnet18")
    torch.save(state, tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_model("rga_s", 5, backbone="resnet18", pretrained=True, **SMALL_HW)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_pretrained_wrong_architecture(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(_torchvision_like_state("resnet18"), path)
    with pytest.raises(ValueError, match="not a torchvision resnet50"):
        build_model("rga_s", 5, pretrained=str(path), **SMALL_HW)
    with pytest.raises(FileNotFoundError):
        build_model("rga_s", 5, pretrained=str(tmp_path / "missing.pth"), **SMALL_HW)
    with pytest.raises(TypeError):
        build_model("rga_s", 5, pretrained=3.5, **SMALL_HW)


def test_random_init_warns_only_when_not_asked():
    with pytest.warns(UserWarning, match="randomly initialised"):
        build_model("baseline", 5, backbone="resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model("baseline", 5, backbone="resnet18", pretrained=False)


def test_exports():
    import rga

    assert rga.RGAModule is RGAModule and callable(rga.build_model)
