"""rga.visualize: the foreground ratio, overlays, the four figure commands' PNGs, their flags."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402

from rga import visualize as V  # noqa: E402
from rga.metrics import ranked_gallery  # noqa: E402
from rga.models import build_model  # noqa: E402
from rga.modules import RGAModule  # noqa: E402
from testkit import SUBPROCESS_ENV, assert_close  # noqa: E402

def _rga_keeps_maps() -> bool:
    m = RGAModule(8, (4, 2), use_channel=False)
    m.keep_attention = True
    with torch.no_grad():
        m(torch.randn(1, 8, 4, 2))
    return "spatial" in (getattr(m, "last_attention", None) or {})


needs_rga_maps = pytest.mark.skipif(not _rga_keeps_maps(), reason="RGAModule.keep_attention does not record maps yet "
                                                                 "(the lead's switch on main)")


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _small(name, seed=0):
    torch.manual_seed(seed)
    return build_model(name, 7, height=64, width=32, backbone="resnet18", pretrained=False).eval()


@pytest.fixture()
def images(tmp_path):
    """Three 64x32 images in a Market-style folder with masks/<split>/<stem>.png beside it."""
    (tmp_path / "query").mkdir()
    (tmp_path / "masks" / "query").mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for k in range(3):
        img = rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)
        mask = np.zeros((64, 32), np.uint8)
        mask[8 + k:56, 8:24] = 255
        p = tmp_path / "query" / f"000{k}_c1s1_00000{k}_00.jpg"
        Image.fromarray(img).save(p)
        Image.fromarray(mask).save(tmp_path / "masks" / "query" / (p.stem + ".png"))
        paths.append(str(p))
    return paths


def test_foreground_ratio_definition():
    mask = torch.zeros(1, 1, 8, 4)
    mask[..., 2:6, 1:3] = 1  # covers 8 of 32 cells: 1/4 of the image
    uniform = torch.full((1, 1, 8, 4), 0.3)
    assert float(V.foreground_ratio(uniform, mask)) == pytest.approx(1.0)
    inside = mask.clone()
    assert float(V.foreground_ratio(inside, mask)) == pytest.approx(4.0)  # all mass inside a quarter
    outside = 1 - mask
    assert float(V.foreground_ratio(outside, mask)) == pytest.approx(0.0)
    # the mask is area-averaged onto a coarser attention grid: same answers at 4x2
    big = torch.zeros(1, 1, 16, 8)
    big[..., 4:12, 2:6] = 1
    torch.testing.assert_close(V.foreground_ratio(torch.full((1, 1, 8, 4), 0.5), big), torch.tensor([1.0]))
    assert float(V.foreground_ratio(inside, big)) == pytest.approx(4.0)
    assert torch.isnan(V.foreground_ratio(uniform, torch.zeros(1, 1, 8, 4))).all()
    with pytest.raises(ValueError):
        V.foreground_ratio(torch.ones(1, 2, 8, 4), mask)


def test_overlay_follows_the_attention():
    img = np.full((16, 8, 3), 100, np.uint8)
    a = np.zeros((4, 2), np.float32)
    a[0, 0] = 1
    b = np.zeros((4, 2), np.float32)
    b[3, 1] = 1
    oa, ob = V.overlay(img, a), V.overlay(img, b)
    assert oa.shape == img.shape and oa.dtype == np.uint8
    assert not np.array_equal(oa, ob)
    np.testing.assert_array_equal(oa, V.overlay(img, a.copy()))
    # hot corner is red-ish (jet's top), cold corner blue-ish
    assert oa[0, 0, 0] > oa[0, 0, 2] and oa[-1, -1, 2] > oa[-1, -1, 0]
    np.testing.assert_array_equal(V.overlay(img, a, alpha=0.0), img)


def test_attention_figure_png_changes_with_the_attention(tmp_path):
    img = [np.full((64, 32, 3), 120, np.uint8)] * 2
    a = torch.zeros(2, 1, 8, 4)
    a[:, :, :4] = 1
    b = torch.zeros(2, 1, 8, 4)
    b[:, :, 4:] = 1
    pa = V.attention_figure(img, [("A", {1: a})], tmp_path / "a.png")
    pa2 = V.attention_figure(img, [("A", {1: a.clone()})], tmp_path / "a2.png")
    pb = V.attention_figure(img, [("A", {1: b})], tmp_path / "b.png")
    xa, xa2, xb = _png(pa), _png(pa2), _png(pb)
    assert xa.shape == xb.shape and xa.shape[0] > 200 and xa.shape[1] > 100
    np.testing.assert_array_equal(xa, xa2)
    diff = np.abs(xa.astype(int) - xb.astype(int)).sum(-1) > 30
    # the image column is unchanged, the overlay column is not
    assert diff[:, xa.shape[1] // 2:].mean() > 0.05
    assert diff[:, : xa.shape[1] // 4].mean() < 0.01


def test_attention_figure_one_scale_colour_bar_and_flat_maps(tmp_path):
    img = [np.full((64, 32, 3), 120, np.uint8)] * 2
    varied = torch.linspace(0.1, 0.9, 64).reshape(2, 1, 8, 4)
    near_flat = 0.5 + 1e-4 * torch.randn(2, 1, 8, 4, generator=torch.Generator().manual_seed(0))
    runs = [("CBAM-S (run)", {1: varied}), ("RGA-SC (init:rga_sc)", {1: near_flat})]
    shared, per = [], []
    V.attention_figure(img, runs, tmp_path / "shared.png", labels=shared)
    V.attention_figure(img, runs, tmp_path / "per.png", stretch="per-map", labels=per)
    text = "\n".join(shared)
    assert "input image" in shared and "stage 1" in text and "CBAM-S" in text and "RGA-SC" in text
    assert "flat: range 0.500–0.500" in text and "range 0.10–0.49" in text
    assert "attention (one scale for all maps)" in shared  # the colour bar's label
    assert any("own range" in t for t in per) and not any("own range" in t for t in shared)
    assert "flat: range 0.500–0.500" in "\n".join(per)  # flat is said whatever the stretch
    # what the shared scale is for: a near-flat map stays flat, the per-map stretch blows it up
    grey = img[0]
    a = near_flat[0, 0].numpy()
    assert V.overlay(grey, a, vmin=0.1, vmax=0.9).std(axis=(0, 1)).max() < 1
    assert V.overlay(grey, a).std(axis=(0, 1)).max() > 20
    with pytest.raises(ValueError, match="stretch"):
        V.attention_figure(img, runs, tmp_path / "x.png", stretch="per-image")


def test_attention_maps_of_a_design_are_its_gates():
    model = _small("cbam_cs")
    x = torch.randn(2, 3, 64, 32)
    maps = V.attention_maps(model, x)
    assert sorted(maps) == [1, 2, 3, 4]
    assert maps[1]["spatial"].shape == (2, 1, 16, 8) and maps[4]["channel"].shape == (2, 512, 1, 1)
    m1 = model.backbone.rga_att1
    assert m1.keep_attention is False and m1.last_attention == {}  # switched back off
    # stage-1 gates reproduce the stage-1 output
    feats = model.backbone.layer1(model.backbone.maxpool(model.backbone.relu(model.backbone.bn1(model.backbone.conv1(x)))))
    with torch.no_grad():
        out = m1(feats)
    torch.testing.assert_close(out, feats * maps[1]["channel"] * maps[1]["spatial"])
    assert V.attention_maps(_small("se"), x)[2].keys() == {"channel"}
    assert V.attention_maps(_small("baseline"), x) == {}


@needs_rga_maps
def test_rga_maps_equal_in_fused_and_reference_paths():
    ref = _small("rga_sc")
    x = torch.randn(2, 3, 64, 32)
    a = V.attention_maps(ref, x)
    ref.fused = True
    b = V.attention_maps(ref, x)
    assert sorted(a) == [1, 2, 3, 4]
    for s in a:
        assert set(a[s]) == {"spatial", "channel"}
        for k in a[s]:
            assert_close(a[s][k], b[s][k], "float32")


def test_relation_values_are_the_modules_own():
    x = torch.randn(1, 3, 64, 32)
    model = _small("rga_s")
    targets = [(0, 0), (3, 2), (15, 7)]
    maps, what = V.relation_maps(model, x, 1, targets)
    assert maps.shape == (3, 16, 8) and "R(i, j)" in what
    seen = {}
    h = model.backbone.rga_att1.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    m = model.backbone.rga_att1
    th = m.theta_spatial(seen["x"]).reshape(1, -1, 128)
    ph = m.phi_spatial(seen["x"]).reshape(1, -1, 128)
    for t, (r, c) in enumerate(targets):
        i = r * 8 + c
        np.testing.assert_allclose(maps[t].reshape(-1), (th[0, :, i:i + 1] * ph[0]).sum(0).detach().numpy(),
                                   rtol=1e-4, atol=1e-5)
    nl = _small("nl")
    nmaps, what = V.relation_maps(nl, x, 2, [(0, 0), (1, 1)])
    assert nmaps.shape == (2, 8, 4) and "NL" in what
    np.testing.assert_allclose(nmaps.reshape(2, -1).sum(1), [1.0, 1.0], rtol=1e-5)
    assert V.position_invariance(np.stack([maps[0]] * 3)) == pytest.approx(1.0)
    assert V.position_invariance(np.stack([maps[0], -maps[0]])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="no pairwise relations"):
        V.relation_maps(_small("cbam_s"), x, 1, targets)
    with pytest.raises(ValueError, match="outside"):
        V.relation_maps(model, x, 1, [(16, 0)])


def test_relation_figure_names_the_grid(tmp_path):
    img = np.full((64, 32, 3), 120, np.uint8)
    maps = np.random.default_rng(0).random((2, 8, 4))
    labels = []
    V.relation_figure(img, [("NL (run)", maps, 0.9)], [(1, 1), (6, 3)], (8, 4), tmp_path / "r.png", stage=2,
                      labels=labels)
    text = "\n".join(labels)
    assert "target (6,3) of 8×4" in text and "invariance 0.90" in text
    assert "stage 2's 8×4 feature grid (input 64×32)" in text.replace("\n", " ")


def test_gradcam_through_the_grad_cam_package():
    pytest.importorskip("pytorch_grad_cam")
    model = _small("cbam_s")
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        logits = V.LogitsModel(model)(x)
        model.train()
        # same logits as the model's own classifier head on the eval-mode BN feature
        model.eval()
        torch.testing.assert_close(logits, model.cls(model(x)))
    cams = V.gradcam_maps(model, x)
    assert cams.shape == (2, 64, 32) and np.isfinite(cams).all()
    assert cams.min() >= 0 and cams.max() <= 1 and cams.max() > 0.5
    # the default target is the top class, the one the figure names
    top = V.top_classes(model, x)
    assert top == logits.argmax(1).tolist()
    np.testing.assert_allclose(V.gradcam_maps(model, x, classes=top), cams, atol=1e-6)


def test_gradcam_figure_names_the_class_and_has_a_scale(tmp_path):
    img = [np.full((64, 32, 3), 120, np.uint8)] * 2
    cams = np.linspace(0, 1, 2 * 64 * 32).reshape(2, 64, 32)
    labels = []
    V.gradcam_figure(img, [("Baseline (run-a)", cams), ("RGA-SC (run-b)", cams[::-1])], tmp_path / "g.png",
                     ratios=[[1.1, float("nan")], [1.3, 0.9]], classes=[[3, 5], [7, 7]], labels=labels)
    text = "\n".join(labels)
    assert "input image" in labels  # the first column's header
    assert "Baseline\n(run-a)\nclass 3\nfg ratio 1.10" in labels and "class 5" in text and "class 7" in text
    assert "Grad-CAM (0–1 per map)" in labels  # the colour bar
    assert "training identity" in text  # the title says what 'class' means


def test_rank_sheet_borders_match_identities(tmp_path):
    rng = np.random.default_rng(1)
    files = []
    for k in range(5):
        p = tmp_path / f"{k}.png"
        Image.fromarray(rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)).save(p)
        files.append(str(p))
    queries = [(files[0], 1), (files[1], 2)]
    ranked = [[(files[2], 1), (files[3], 3), (files[4], 1)], [(files[2], 1), (files[3], 2), (files[4], 2)]]
    layout = V.rank_sheet(queries, ranked, tmp_path / "ranks.png", style=V.SheetStyle(cell=(40, 20), border=3))
    assert "#1 id 1" in layout["texts"] and "id 2" in layout["texts"]  # ranks and identities, no distances given
    assert not any(t.startswith("d ") for t in layout["texts"])
    sheet = _png(layout["path"])
    assert sheet.shape[1::-1] == tuple(layout["size"])
    expect = [[V.GREY, V.GREEN, V.RED, V.GREEN], [V.GREY, V.RED, V.GREEN, V.GREEN]]
    for row, colours in zip(layout["cells"], expect):
        assert [c[4] for c in row] == colours
        for x0, y0, x1, y1, colour in row:
            for px, py in ((x0, y0), (x1, y1), (x0 + 1, (y0 + y1) // 2), ((x0 + x1) // 2, y1 - 1)):
                assert tuple(sheet[py, px]) == colour
            # the image sits inside the border
            assert tuple(sheet[(y0 + y1) // 2, (x0 + x1) // 2]) != colour
    # with distances and a title: they are on the sheet
    scored = [[(p, pid, 0.1 * (k + 1)) for k, (p, pid) in enumerate(row)] for row in ranked]
    layout = V.rank_sheet([(files[0], 1, 3), (files[1], 2, 4)], scored, tmp_path / "ranks2.png", title="model X")
    assert layout["texts"][0] == "model X" and "id 1 cam 3" in layout["texts"]
    assert "d 0.100" in layout["texts"] and "d 0.300" in layout["texts"]
    assert any("cosine distance" in t for t in layout["texts"])
    # rga.search's use: similarities, identities it cannot know, a file gone since indexing
    layout = V.rank_sheet([(files[0], 1, None)], [[(files[2], None, 0.9), (str(tmp_path / "gone.png"), 1, 0.5)]],
                          tmp_path / "ranks3.png", metric="cosine similarity", lower_is_closer=False)
    assert [c[4] for c in layout["cells"][0]] == [V.GREY, V.BLUE, V.GREEN]
    assert "identity unknown" in layout["texts"] and "unreadable" in layout["texts"]
    assert "#1 id ?" in layout["texts"] and "s 0.900" in layout["texts"]
    assert any("cosine similarity to the query (s; higher: closer)" in t for t in layout["texts"])


def test_ranked_gallery_drops_same_camera_matches():
    qf = torch.tensor([[1.0, 0.0]])
    gf = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    out = ranked_gallery(qf, gf, np.array([5]), np.array([5, 5, 6]), np.array([1]), np.array([1, 2, 1]), top=3)
    assert out[0].tolist() == [1, 2]  # gallery 0 is the query's identity seen by its own camera


def test_plot_cmc(tmp_path):
    p = V.plot_cmc(np.linspace(0.4, 1.0, 50), tmp_path / "cmc.png", label="x")
    img = _png(p)
    assert img.shape[0] > 200 and img.shape[1] > 300
    p2 = V.plot_cmc({"a": np.linspace(0.4, 1, 50), "b": np.linspace(0.2, 0.9, 50)}, tmp_path / "cmc2.png")
    assert not np.array_equal(_png(p2), img)


def test_cli_attention_relation_gradcam(images, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--threads", "1", "--out", str(out)]
    assert V.main(["attention", "init:cbam_s", *images, "--compare", "init:fc_s", *args]) == 0
    summary = json.loads((out / "foreground_ratio.json").read_text())
    assert [r["variant"] for r in summary["runs"]] == ["cbam_s", "fc_s"]
    assert summary["runs"][0]["stages"]["1"]["n"] == 3
    assert summary["stretch"] == "shared" and "attention (one scale for all maps)" in summary["texts"]
    assert _png(out / "attention.png").shape[0] > 300
    assert "foreground attention ratio" in capsys.readouterr().out
    assert V.main(["attention", "init:se", *images, *args]) == 2  # no spatial attention: a clear error

    assert V.main(["relation", "init:rga_s", images[0], "--compare", "init:nl", "--targets", "1,1", "4,2", "15,7",
                   *args]) == 0
    rel = json.loads((out / "relation.json").read_text())
    assert rel["targets"] == [[1, 1], [4, 2], [15, 7]] and len(rel["runs"]) == 2
    assert rel["grid"] == [16, 8] and "target (4,2) of 16×8" in "\n".join(rel["texts"])
    assert "stage 1's 16×8 feature grid" in " ".join(rel["texts"]).replace("\n", " ")
    assert _png(out / "relation.png").shape[0] > 300

    pytest.importorskip("pytorch_grad_cam")
    assert V.main(["gradcam", "init:baseline", *images[:2], "--compare", "init:rga_sc", *args]) == 0
    g = json.loads((out / "gradcam.json").read_text())
    assert len(g["runs"]) == 2 and len(g["runs"][0]["foreground_ratio"]) == 2
    assert f"class {g['runs'][0]['classes'][0]}" in "\n".join(g["texts"])
    assert _png(out / "gradcam.png").shape[0] > 300


def test_cli_ranks_on_a_small_synthetic_set(tmp_path):
    from rga.data import build_dataset
    root = tmp_path / "data"
    build_dataset("synthetic", str(root), verbose=False, num_train_ids=4, num_test_ids=6, num_distractors=2)
    out = tmp_path / "ranks"
    assert V.main(["ranks", "init:baseline", "--dataset", "synthetic", "--data-root", str(root), "--top", "5",
                   "--num-queries", "4", "--threads", "1",
                   "--out", str(out)]) == 0
    summary = json.loads((out / "ranks.json").read_text())
    sheet = _png(out / "ranks.png")
    assert len(summary["queries"]) == 4 and sheet.shape[0] > 4 * 128
    assert _png(out / "cmc.png").shape[1] > 300
    # the borders on the sheet say whether each ranked image has the query's identity
    for q, boxes in zip(summary["queries"], summary["cells"]):
        assert len(boxes) == 1 + len(q["top"])
        for item, (x0, y0, _x1, _y1, _colour) in zip(q["top"], boxes[1:]):
            want = V.GREEN if item["pid"] == q["pid"] else V.RED
            assert tuple(sheet[y0 + 1, x0 + 1]) == want
    # and the text says which model, which query, which rank and how far
    texts = summary["texts"]
    assert texts[0].startswith("Baseline (init:baseline) on synthetic"), texts[0]
    assert "R1" in texts[0] and "mAP" in texts[0]
    assert "same identity as the query" in texts and "another identity" in texts
    q0 = summary["queries"][0]
    assert f"id {q0['pid']} cam {q0['camid']}" in texts
    d = [item["distance"] for item in q0["top"]]
    assert d == sorted(d) and all(0 <= x <= 2 for x in d)
    assert f"#1 id {q0['top'][0]['pid']}" in texts and f"d {d[0]:.3f}" in texts


@pytest.mark.parametrize("argv, flag", [(["relation", "init:rga_sc", "IMG", "--stage", "9"], "--stage"),
                                        (["attention", "init:rga_sc", "IMG", "--show", "0"], "--show")])
def test_out_of_range_stage_and_show_flags_are_one_error_line(tmp_path, gallery, argv, flag):
    image = str(next(gallery.iterdir()))
    argv = [image if a == "IMG" else a for a in argv] + ["--out", str(tmp_path / "figs")]
    r = subprocess.run([sys.executable, "-m", "rga.visualize", *argv], env=SUBPROCESS_ENV, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"argument {flag}" in r.stderr.strip().splitlines()[-1], r.stderr
