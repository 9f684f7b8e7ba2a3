"""rga.FeatureExtractor: paths, images, arrays or tensors in; normalized features out."""
import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image

from rga import FeatureExtractor, build_model
from rga.checkpoint import CheckpointError
from rga.data import ImageReadError
from rga.transforms import build_test_transform

H, W = 64, 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("rga_sc", 5, height=H, width=W, pretrained=False, backbone="resnet18").eval()
    with torch.no_grad():  # non-trivial BN neck statistics
        m.feat_bn.running_mean.uniform_(-0.1, 0.1)
    return m


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("imgs")
    arrays = [rng.integers(0, 256, (80 + 8 * i, 40, 3), dtype=np.uint8) for i in range(3)]
    paths = []
    for i, a in enumerate(arrays):
        p = folder / f"{i}.png"  # lossless, so the array and the file are the same image
        Image.fromarray(a).save(p)
        paths.append(p)
    return arrays, paths


def test_paths_images_arrays_and_tensors_agree(model, images):
    arrays, paths = images
    extract = FeatureExtractor(model, device="cpu", batch_size=2)
    from_paths = extract([str(p) for p in paths])
    assert from_paths.shape == (3, model.feature_dim) and from_paths.dtype == torch.float32
    torch.testing.assert_close(from_paths.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(extract(arrays), from_paths)
    torch.testing.assert_close(extract([Image.fromarray(a) for a in arrays]), from_paths)
    torch.testing.assert_close(extract(arrays[1]), from_paths[1:2])
    # the same as running the model by hand on the test transform
    batch = torch.stack([build_test_transform(H, W)(a) for a in arrays])
    with torch.no_grad():
        manual = torch.nn.functional.normalize(model(batch), dim=1)
    torch.testing.assert_close(extract(batch), manual)
    torch.testing.assert_close(from_paths, manual)
    # different images give different features
    assert (from_paths[0] - from_paths[1]).abs().max() > 1e-3


def test_feat_choice_and_unnormalized(model, images):
    arrays, _ = images
    bn = FeatureExtractor(model, device="cpu", normalize=False)(arrays)
    pool = FeatureExtractor(model, device="cpu", feat="pool", normalize=False)(arrays)
    assert not torch.allclose(bn, pool)
    assert not torch.allclose(bn.norm(dim=1), torch.ones(3))
    model.neck_feat = "bn"


def test_from_checkpoint(model, images, tmp_path):
    arrays, _ = images
    config = {"arch": "rga_sc", "backbone": "resnet18", "height": H, "width": W, "fused_rga": False}
    ckpt = tmp_path / "run" / "checkpoint_ep0003.pth"
    ckpt.parent.mkdir()
    torch.save({"epoch": 3, "model": model.state_dict(), "config": config, "num_classes": 5}, ckpt)
    expected = FeatureExtractor(model, device="cpu")(arrays)
    torch.testing.assert_close(FeatureExtractor(ckpt, device="cpu")(arrays), expected)
    # a run folder means its newest checkpoint; the fused path gives the same features
    torch.testing.assert_close(FeatureExtractor(ckpt.parent, device="cpu", fused="torch")(arrays), expected,
                               rtol=1e-4, atol=1e-5)


def test_bad_input(model, images, tmp_path):
    extract = FeatureExtractor(model, device="cpu")
    with pytest.raises(ImageReadError, match="missing.jpg"):
        extract(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match=r"H x W x 3 uint8"):
        extract(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(TypeError, match="expected a path, a PIL image"):
        extract([3.5])
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 32\)"):
        extract(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="no images"):
        extract([])
    with pytest.raises(ValueError, match="feat must be"):
        FeatureExtractor(model, feat="logits")
    with pytest.raises(TypeError, match="model must be"):
        FeatureExtractor(42)
    with pytest.raises(CheckpointError, match="not found"):
        FeatureExtractor(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="no checkpoint_epNNNN"):
        FeatureExtractor(tmp_path)


# ---------------------------------------------------------------------------------------------
# rga.checkpoint.load_model: every checkpoint layout FeatureExtractor and rga.evaluate accept
# ---------------------------------------------------------------------------------------------

def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_format_1_checkpoint_written_by_the_previous_rga_train(images, tmp_path):
    """A checkpoint as rga.train wrote it before the typed config: the flat argparse namespace."""
    from rga.checkpoint import load_model

    arrays, _ = images
    torch.manual_seed(1)
    model = build_model("rga_cs", 6, height=H, width=W, pretrained=False, backbone="resnet18",
                        use_original=False).eval()
    old_args = {"config": None, "preset": None, "dataset": "synthetic", "data_root": "data", "dataset_opt": [],
                "height": H, "width": W, "workers": 0, "test_batch_size": 64, "arch": "rga_cs",
                "backbone": "resnet18", "pretrained": None, "fused_rga": False, "batch_ids": 8,
                "batch_instances": 4, "pad": 4, "flip_prob": 0.5, "erasing_prob": 0.0, "label_smooth": 0.1,
                "margin": 0.3, "id_weight": 1.0, "triplet_weight": 1.0, "lr": 8e-4, "weight_decay": 5e-4,
                "warmup_epochs": 0, "warmup_lr": 8e-6, "milestones": [10], "gamma": 0.5, "epochs": 14,
                "eval_every": 0, "eval_feat": "bn", "metric": "cosine", "rerank": False, "flip_test": False,
                "output_dir": "runs/quick", "seed": 0, "resume": None, "ckpt_every": 1, "keep_checkpoints": 2,
                "tensorboard": False, "no_progress": False, "device": "auto", "amp": "auto",
                "channels_last": "auto", "threads": 0, "compile": False, "cuda_graphs": False, "sync_bn": False,
                "dist_backend": "auto", "deterministic": False}
    path = tmp_path / "old" / "checkpoint_ep0014.pth"
    path.parent.mkdir()
    torch.save({"epoch": 14, "model": model.state_dict(), "optimizer": {}, "scheduler": {}, "sampler": {},
                "scaler": None, "rng": [], "config": old_args, "num_classes": 6, "metrics": {},
                "world_size": 1, "torch_version": str(torch.__version__)}, path)
    # use_original=False is not in that namespace (those versions could not set it), so the saved
    # config does not describe this network: the load says so instead of loading garbage
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(path)
    model = build_model("rga_cs", 6, height=H, width=W, pretrained=False, backbone="resnet18").eval()
    torch.save({"epoch": 14, "model": model.state_dict(), "config": old_args, "num_classes": 6}, path)
    again, info = load_model(path.parent, with_info=True)
    assert info.kind == "rga.train format 1" and info.epoch == 14 and info.model.label() == "rga_cs"
    assert info.config.data.sampler == "all_groups" and again.variant == "rga_cs"
    assert _same_state(again.state_dict(), model.state_dict())
    torch.testing.assert_close(FeatureExtractor(path.parent, device="cpu")(arrays),
                               FeatureExtractor(model, device="cpu")(arrays))


@pytest.mark.parametrize("name", ["rga_s", "rga_c", "rga_sc"])
def test_public_training_script_checkpoint(name, tmp_path):
    """The public code's save_checkpoint layout: {'state_dict', 'epoch', 'best_top1', 'optimizer'},
    ResNet-50 at 256x128, weights with the 'module.' prefix of nn.DataParallel."""
    from rga.checkpoint import load_model

    torch.manual_seed(0)
    model = build_model(name, 751, pretrained=False).eval()
    with torch.no_grad():
        model.feat_bn.running_mean.uniform_(-0.1, 0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=8e-4)
    wrapped = nn.DataParallel(model)
    path = tmp_path / "checkpoint_600.pth.tar"
    torch.save({"state_dict": wrapped.state_dict(), "epoch": 600, "best_top1": 0.961,
                "optimizer": optimizer.state_dict()}, path)
    assert next(iter(torch.load(path)["state_dict"])).startswith("module.")
    again, info = load_model(path, with_info=True)
    assert info.kind == "public training script" and info.epoch == 600 and info.num_classes == 751
    assert (info.model.variant, info.model.backbone, info.model.height, info.model.width) == (
        name, "resnet50", 256, 128)
    assert info.model.stages == (1, 2, 3, 4) and info.model.label() == name and info.config is None
    assert _same_state(again.state_dict(), model.state_dict())
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    torch.testing.assert_close(FeatureExtractor(path, device="cpu")(x), FeatureExtractor(model, device="cpu")(x))
    if name == "rga_sc":  # the order is not in the weights: sc (the public code's) unless told
        assert load_model(path, hints={"variant": "rga_cs"}).rga_modules()[0].order == "cs"
        with pytest.raises(CheckpointError, match="spatial and channel attention; --model rga_s has not"):
            load_model(path, hints={"variant": "rga_s"})


def test_bare_state_dict_input_size_and_bad_files(model, tmp_path):
    from rga.checkpoint import load_model

    # a 64x32 model: 16x8 maps at stage 1, which a 2:1 input of 64x32 gives
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    info = load_model(tmp_path / "bare.pth", with_info=True)[1]
    assert (info.kind, info.model.height, info.model.width, info.model.backbone) == ("state_dict", 64, 32,
                                                                                     "resnet18")
    # a 3:1 input cannot be guessed: the error asks for the size, the hint fixes it
    m3 = build_model("rga_s", 4, height=96, width=32, pretrained=False, backbone="resnet18")
    torch.save({"state_dict": m3.state_dict()}, tmp_path / "tall.pth")
    with pytest.raises(CheckpointError, match="pass the --height and --width"):
        load_model(tmp_path / "tall.pth")
    assert load_model(tmp_path / "tall.pth", hints={"height": 96, "width": 32}).height == 96
    with pytest.raises(CheckpointError, match="does not give"):
        load_model(tmp_path / "tall.pth", hints={"height": 64, "width": 32})
    with pytest.raises(CheckpointError, match=r"contradict stages=\(2, 3\) \(the weights have \(1, 2, 3, 4\)\)"):
        load_model(tmp_path / "tall.pth", hints={"height": 96, "width": 32, "stages": (2, 3)})
    # not a re-id network, a newer format, a config contradicting the weights
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a ResNet"):
        load_model(tmp_path / "other.pth")
    from rga.config import RunConfig
    torch.save({"format_version": 99, "config": {}, "model": model.state_dict()}, tmp_path / "new.pth")
    with pytest.raises(CheckpointError, match="format 99"):
        load_model(tmp_path / "new.pth")
    cfg = RunConfig().to_dict()  # ResNet-50 256x128: not this network
    torch.save({"format_version": 2, "config": cfg, "num_classes": 5, "model": model.state_dict()},
               tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="does not fit the rga_sc / resnet50 256x128 network"):
        load_model(tmp_path / "wrong.pth")
