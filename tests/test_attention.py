"""The Table 2 attention designs (rga/attention.py) and their models."""
import copy

import pytest
import torch

from rga.attention import (CBAM, DESIGNS, CBAMChannel, CBAMSpatial, FCChannel, FCParallel, FCSpatial, NonLocal,
                           SimplifiedNonLocal, SqueezeExcitation, build_design)
from rga.models import ATTENTION_VARIANTS, PAPER_TABLE3, build_model, count_parameters, main as models_main

C, H, W = 16, 8, 4


def _x(b=3, seed=0):
    torch.manual_seed(seed)
    return torch.randn(b, C, H, W, dtype=torch.float64)


def _randomize(module):
    """Give every parameter and BN statistic a non-trivial value (so zero-initialised layers act)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_shape_grad_and_kept_maps(name):
    m = _randomize(build_design(name, C, (H, W)).double()).train()
    x = _x().requires_grad_()
    assert m.last_attention == {}
    y = m(x)
    assert y.shape == x.shape
    assert m.last_attention == {}  # nothing kept unless asked
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for p in m.parameters():
        assert p.grad is not None, name
    m.keep_attention = True
    m.eval()
    with torch.no_grad():
        y = m(x)
    kept = m.last_attention
    if name == "nl":
        assert kept == {}
        return
    assert kept, name
    for key, a in kept.items():
        assert not a.requires_grad
        shape = {"spatial": (3, 1, H, W), "channel": (3, C, 1, 1), "context": (3, 1, H, W)}[key]
        assert a.shape == shape, (name, key)
    if "context" in kept:  # SNL: softmax weights over the positions
        torch.testing.assert_close(kept["context"].sum((2, 3)), torch.ones(3, 1, dtype=torch.float64))
    else:  # gating designs: the output is the input times the kept masks
        mask = torch.ones_like(x)
        for a in kept.values():
            assert (a > 0).all() and (a < 1).all()
            mask = mask * a
        torch.testing.assert_close(y, x * mask)


def test_cbam_cs_is_channel_then_spatial():
    m = _randomize(CBAM(C, (H, W)).double()).eval()
    x = _x()
    ch, sp = m.channel, m.spatial
    torch.testing.assert_close(m(x), sp(ch(x)))
    assert not torch.allclose(m(x), ch(sp(x)))


def test_fc_parallel_uses_the_same_input():
    m = _randomize(FCParallel(C, (H, W)).double()).eval()
    x = _x()
    torch.testing.assert_close(m(x), m.spatial(x) * m.channel(x) / x)


def test_cbam_channel_uses_avg_and_max():
    m = _randomize(CBAMChannel(C, reduction=4).double())
    x = _x()
    expect = torch.sigmoid(m.mlp(x.mean((2, 3))) + m.mlp(x.amax((2, 3))))[:, :, None, None] * x
    torch.testing.assert_close(m(x), expect)


def test_cbam_spatial_published_form():
    m = _randomize(CBAMSpatial(C, (H, W), embed_ratio=None).double()).eval()
    x = _x()
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
    torch.testing.assert_close(m(x), torch.sigmoid(m.bn(m.conv(pooled))) * x)
    assert m.embed is None and m.conv.weight.shape == (1, 2, 7, 7)


def test_nonlocal_matches_the_equations_and_starts_as_identity():
    fresh = NonLocal(C, (H, W)).double()
    x = _x()
    torch.testing.assert_close(fresh(x), x)  # zero-initialised BN scale: identity block
    m = _randomize(copy.deepcopy(fresh)).eval()
    f = m.relation(x)
    assert f.shape == (3, H * W, H * W)
    torch.testing.assert_close(f.sum(-1), torch.ones(3, H * W, dtype=torch.float64))
    b = x.shape[0]
    th = m.theta(x).reshape(b, -1, H * W)
    ph = m.phi(x).reshape(b, -1, H * W)
    g = m.g(x).reshape(b, -1, H * W)
    y = torch.zeros_like(g)
    for i in range(H * W):  # y_i = sum_j softmax_j(θ_i·φ_j) g_j, written out
        w = torch.softmax((th[:, :, i:i + 1] * ph).sum(1), -1)  # (b, N)
        y[:, :, i] = (g * w[:, None, :]).sum(-1)
    torch.testing.assert_close(m(x), m.W(y.reshape(b, -1, H, W)) + x)


def test_snl_context_is_position_invariant_and_starts_as_identity():
    fresh = SimplifiedNonLocal(C, (H, W), reduction=4).double()
    x = _x()
    torch.testing.assert_close(fresh(x), x)
    m = _randomize(copy.deepcopy(fresh)).eval()
    y = m(x)
    delta = y - x  # the same vector added at every position
    torch.testing.assert_close(delta, delta[:, :, :1, :1].expand_as(delta))
    assert delta.abs().max() > 1e-6
    assert isinstance(SimplifiedNonLocal(C, reduction=4, layer_norm=True).transform[1], torch.nn.LayerNorm)
    assert SimplifiedNonLocal(C, reduction=None).transform[0].weight.shape == (C, C, 1, 1)


def test_se_and_fc_channel_shapes():
    se = SqueezeExcitation(C, reduction=4)
    assert (se.fc1.in_features, se.fc1.out_features) == (C, 4)
    fc = FCChannel(C, embed_ratio=2)
    assert fc.embed[0].weight.shape == (C // 2, C, 1, 1) and fc.fc[0].weight.shape == (C, C // 2)


def test_bad_input():
    with pytest.raises(ValueError, match="spatial_size"):
        FCSpatial(C, None)
    m = build_design("cbam_s", C, (H, W))
    with pytest.raises(ValueError, match="8x4 feature maps"):
        m(torch.randn(1, C, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, C + 1, H, W))
    with pytest.raises(ValueError, match="unknown attention design"):
        build_design("cbam", C, (H, W))
    with pytest.raises(ValueError, match="reduction"):
        SqueezeExcitation(C, reduction=0)


@pytest.mark.parametrize("name", sorted(ATTENTION_VARIANTS))
def test_models_train_with_fused_flag_off_or_on(name):
    torch.manual_seed(0)
    ref = build_model(name, 5, height=32, width=16, backbone="resnet18", pretrained=False).train()
    assert ref.rga_modules() == [] and len(ref.attention_modules()) == 4
    assert isinstance(ref.attention_modules()[0], DESIGNS[name][0])
    fus = build_model(name, 5, height=32, width=16, backbone="resnet18", pretrained=False, fused=True)
    fus.load_state_dict(ref.state_dict())
    fus.train()
    x = torch.randn(4, 3, 32, 16)
    torch.manual_seed(1)
    out = ref(x)
    assert len(out) == 3 and out[2].shape == (4, 5)
    out[2].sum().backward()
    torch.testing.assert_close(fus(x)[2], out[2])  # --fused-rga only touches RGA modules
    fus.fused = "torch"  # settable, no effect here
    assert fus.fused is False
    with pytest.raises(ValueError, match="no RGA modules"):
        build_model(name, 5, height=32, width=16, backbone="resnet18", pretrained=False, use_relation=False)
    with pytest.raises(ValueError, match="built for 32x16 images"):
        ref.eval()(torch.randn(1, 3, 64, 32))


def test_parameter_counts_against_table3(capsys):
    """ResNet-50, 751 classes, 256x128: the readings documented in rga/attention.py."""
    ours = {name: count_parameters(name) / 1e6 for name in PAPER_TABLE3}
    for name in ("baseline", "fc_s", "rga_s", "cbam_c", "fc_c"):
        assert abs(ours[name] - PAPER_TABLE3[name]) < 0.06, (name, ours[name])
    # CBAM-S: no reading reproduces 26.1 M; ours (with the 1x1 embedding) is 0.35 M short
    assert abs(ours["cbam_s"] - 25.75) < 0.01
    assert abs(count_parameters("nl") / 1e6 - 36.21) < 0.01
    assert models_main(["--params"]) == 0
    out = capsys.readouterr().out
    assert "| FC-S | `fc_s` | 26.88 | 26.9 | -0.02 |" in out
    assert "| NL | `nl` | 36.21 | - | - |" in out
