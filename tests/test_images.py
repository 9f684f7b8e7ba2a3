"""rga.data.read_image in every mode PIL writes (scaled to 8-bit RGB, or refused by name), and the
whole-dataset check (rga.data.check_dataset)."""
import io

import numpy as np
import pytest
from PIL import Image

from rga.data import ImageReadError, check_dataset, read_image
from rga.data.datasets import ReidDataset
from rga.errors import DatasetCheckError

H, W = 16, 24
FORMATS = ("PNG", "TIFF", "JPEG", "BMP", "GIF", "WEBP")
# lossy formats or palettes: mean absolute error allowed against the expected pixels
TOLERANCE = {"JPEG": 6.0, "WEBP": 6.0, "GIF": 20.0}


def gradient():
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 10, y * 15, (x + y) * 5], -1).astype(np.uint8)


def gray8():
    return (np.mgrid[0:H, 0:W][1] * 11).astype(np.uint8)  # 0..253


def sources():
    """(mode, PIL image, expected 8-bit RGB array or None = must be refused)."""
    rgb = Image.fromarray(gradient())
    g = gray8()
    g_rgb = np.repeat(g[..., None], 3, -1)
    out = []
    for mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        im = rgb.convert(mode) if mode != "HSV" else rgb.convert("RGB").convert("HSV")
        out.append((mode, im, np.asarray(im.convert("RGB"))))  # 8-bit: PIL's conversion is the truth
    g16 = g.astype(np.uint16) * 257  # the same picture at 16 bits: must come back as g
    for mode in ("I;16", "I;16B"):
        out.append((mode, Image.frombytes(mode, (W, H), g16.astype(">u2" if mode.endswith("B") else "<u2").tobytes()),
                    g_rgb))
    out.append(("F", Image.fromarray(g.astype(np.float32) / 255.0, mode="F"), g_rgb))  # floats in [0, 1]
    out.append(("F>1", Image.fromarray(g.astype(np.float32), mode="F"), None))          # 0..253: unknown scale
    nan = g.astype(np.float32) / 255.0
    nan[0, 0] = np.nan
    out.append(("F-nan", Image.fromarray(nan, mode="F"), None))
    out.append(("I", Image.fromarray(g16.astype(np.int32), mode="I"), None))            # 32-bit integers
    return out


HIGH_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
SOURCES = sources()


@pytest.mark.parametrize("mode,im,expected", SOURCES, ids=[c[0] for c in SOURCES])
def test_every_mode_pil_writes(tmp_path, mode, im, expected):
    """Each mode in each format PIL writes it in. A file PIL reads back in an 8-bit mode must give
    PIL's own RGB conversion; one in a high-bit mode the scaled picture, or a refusal naming the
    file and its mode."""
    written = []
    for fmt in FORMATS:
        buf = io.BytesIO()
        try:
            im.save(buf, format=fmt)
        except (OSError, ValueError, KeyError):
            continue  # PIL does not write this mode in this format
        path = tmp_path / f"img.{fmt.lower()}"
        path.write_bytes(buf.getvalue())
        with Image.open(path) as f:
            file_mode = f.mode
            pil_rgb = None if file_mode in HIGH_BIT else np.asarray(f.convert("RGB"))
        written.append((fmt, file_mode))
        if pil_rgb is None and expected is None:
            with pytest.raises(ImageReadError, match=rf"img\.{fmt.lower()}: .*mode {file_mode}"):
                read_image(path)
            continue
        out = read_image(path)
        assert out.mode == "RGB" and out.size == (W, H), fmt
        want = pil_rgb if pil_rgb is not None else expected
        err = np.abs(np.asarray(out).astype(int) - want.astype(int)).max()
        assert err <= (0 if pil_rgb is not None else 1), f"{mode} as {fmt} (read back as {file_mode}): max error {err}"
    assert any(m == mode.split(">")[0].split("-")[0] or mode in ("RGBX", "HSV") for _, m in written), written


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    """The issue's case: a 16-bit PNG used to come out almost all 255."""
    g16 = (np.arange(H * W).reshape(H, W) * (65535 // (H * W - 1))).astype(np.uint16)
    p = tmp_path / "deep.png"
    Image.frombytes("I;16", (W, H), g16.astype("<u2").tobytes()).save(p)
    out = np.asarray(read_image(p))[..., 0].astype(int)
    np.testing.assert_allclose(out, np.rint(g16 / 257.0), atol=1)
    assert (out == 255).mean() < 0.01 and out.min() == 0


def test_float_tiff_in_unit_range(tmp_path):
    """The issue's case: a float TIFF used to come out all black."""
    a = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    p = tmp_path / "f.tiff"
    Image.fromarray(a, mode="F").save(p)
    out = np.asarray(read_image(p))[..., 0].astype(int)
    np.testing.assert_allclose(out, np.rint(a * 255), atol=1)


def _dataset(tmp_path, n_bad=0, empty=()):
    items = {}
    for split in ("train", "query", "gallery"):
        items[split] = []
        if split in empty:
            continue
        for i in range(3):
            p = tmp_path / f"{split}_{i}.jpg"
            Image.fromarray(gradient()).save(p)
            items[split].append((str(p), i, 1 if split == "gallery" else 0))  # cross-camera matches
    bad = []
    for i in range(n_bad):
        p = tmp_path / f"gallery_bad{i}.jpg"
        p.write_bytes(b"not an image" if i % 2 == 0 else (tmp_path / "train_0.jpg").read_bytes()[:200])  # junk, truncated
        items["gallery"].append((str(p), 9, 1))
        bad.append(p)
    return ReidDataset("toy", str(tmp_path), items["train"], items["query"], items["gallery"], verbose=False), bad


def test_check_dataset_passes_and_counts(tmp_path):
    ds, _ = _dataset(tmp_path)
    assert check_dataset(ds)["images"] == 9


def test_check_dataset_names_bad_images_and_empty_splits_in_one_message(tmp_path):
    ds, bad = _dataset(tmp_path, n_bad=7, empty=("query",))
    with pytest.raises(DatasetCheckError) as e:
        check_dataset(ds)
    msg = str(e.value)
    assert "\n" not in msg and "empty split(s): query" in msg and "7 unreadable image(s) of 13" in msg
    assert str(bad[0]) in msg and str(bad[1]) in msg and "Truncated" in msg and "and 2 more" in msg
    assert sorted(p for p, _ in e.value.bad["gallery"]) == sorted(map(str, bad))
    # only the splits asked for (rga.evaluate checks query and gallery)
    (tmp_path / "b").mkdir()
    ds2, _ = _dataset(tmp_path / "b", empty=("train",))
    assert check_dataset(ds2, ("query", "gallery"))["images"] == 6


# ------------------------------------------------------------------------------
# EXIF orientation
# ------------------------------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    from rga.data import read_image

    portrait = np.zeros((40, 20, 3), np.uint8)
    portrait[:10] = 255  # white at the top
    sideways = Image.fromarray(portrait).transpose(Image.Transpose.ROTATE_90)  # stored 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    sideways.save(tmp_path / "side.jpg", exif=exif.tobytes(), quality=95)
    for draft in (False, True):
        im = read_image(tmp_path / "side.jpg", draft=draft)
        a = np.asarray(im).astype(float)
        assert im.size[0] < im.size[1], im.size  # portrait again
        assert a[: a.shape[0] // 5].mean() > 200 and a[-a.shape[0] // 5:].mean() < 50
