"""Reading images as 8-bit RGB, whatever PIL mode they come in.

``PIL.Image.convert("RGB")`` is right for 8-bit modes (1, L, LA, P, PA, RGB, RGBA, RGBX, CMYK,
YCbCr, LAB, HSV, ...) but clips high bit depths: a 16-bit PNG comes out almost all 255, a float
TIFF almost all 0. Here those are scaled instead, or refused by name when their scale is unknown:

- 16-bit integer (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``; and ``I`` from a PNG, as older
  Pillows open 16-bit PNGs): the full range 0..65535 maps onto 0..255 (value / 257, rounded);
- 32-bit float (``F``): values in [0, 1] map onto 0..255; anything else (NaN, negative, above
  1) is refused, since its scale cannot be told from the file;
- 32-bit integer (``I`` from TIFF and others): refused (no known scale);
- any other mode: PIL's conversion to RGB.
"""
from __future__ import annotations

import numpy as np

from ..errors import ImageReadError, UnsupportedImageError  # noqa: F401 - re-exported

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _gray_to_rgb(gray8: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(gray8, dtype=np.uint8), mode="L").convert("RGB")


def to_rgb8(im):
    """A decoded PIL image -> an 8-bit PIL RGB image (see the module docstring); raises
    UnsupportedImageError for images whose scale is unknown."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and im.format == "PNG"):
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):  # pragma: no cover - not a 16-bit image after all
            raise UnsupportedImageError(f"mode {mode} pixels outside 0..65535 (min {a.min()}, max {a.max()})")
        return _gray_to_rgb((a * 255 + 32767) // 65535)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if a.size and not np.isfinite(a).all():
            raise UnsupportedImageError("32-bit float pixels (mode F) include NaN or infinity")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise UnsupportedImageError(f"32-bit float pixels (mode F) outside [0, 1] (min {lo:g}, max {hi:g}): "
                                        "their scale is unknown; save the image as 8-bit, or floats in [0, 1]")
        return _gray_to_rgb(np.rint(a * 255.0))
    if mode == "I":
        raise UnsupportedImageError("32-bit integer pixels (mode I): their scale is unknown; save the image as "
                                    "8-bit or 16-bit")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise UnsupportedImageError(f"cannot convert mode {mode} to RGB: {e}") from e


def read_image(path, *, draft: bool = False):
    """The image at `path` as an 8-bit PIL RGB image; any failure is an ImageReadError naming the file.

    draft=True lets JPEG decode at a reduced size (much faster; the whole file is still read and
    checked): for validating files, not for training."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if draft and im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            return to_rgb8(im)
    except UnsupportedImageError as e:
        raise ImageReadError(f"cannot use image {path}: {e}") from e
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
