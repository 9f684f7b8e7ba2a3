"""rga.FeatureExtractor: paths, images, arrays or tensors in; normalized features out."""
import numpy as np
import pytest
import torch
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


def test_uint8_tensor_is_pixels_and_gets_normalized(model, images):
    """A uint8 tensor (as torchvision.io.read_image gives) is raw pixels: resized, scaled and
    normalized like an array, never fed to the model as 0..255 values."""
    arrays, _ = images
    extract = FeatureExtractor(model, device="cpu")
    same_size = [np.ascontiguousarray(a[:H, :W]) for a in arrays]
    pixels = torch.from_numpy(np.stack(same_size)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    torch.testing.assert_close(extract(pixels), extract(same_size))
    torch.testing.assert_close(extract(pixels[1]), extract(same_size[1]))  # one (3, H, W) image
    other = torch.from_numpy(arrays[2]).permute(2, 0, 1)  # any size, like arrays
    torch.testing.assert_close(extract(other), extract(arrays[2]))
    with pytest.raises(TypeError, match="float .* or uint8"):
        extract(pixels.long())
    with pytest.raises(ValueError, match="uint8 tensor input must be"):
        extract(pixels[:, :1])
