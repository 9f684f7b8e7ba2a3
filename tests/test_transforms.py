"""rga.transforms: the public code's Random2DTranslation and the crop choice of the training transform."""
import random

import numpy as np
import pytest
from PIL import Image

from rga.transforms import (Random2DTranslation, RandomTranslate, Resize, build_train_transform)


def _image(h=100, w=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_random2d_translation_crops_the_enlarged_image():
    img = _image()
    t = Random2DTranslation(64, 32, p=1.0)
    big = np.asarray(img.resize((36, 72), Image.BILINEAR))  # round(1.125 x 32), round(1.125 x 64)
    offsets = set()
    for seed in range(40):
        random.seed(seed)
        out = np.asarray(t(img))
        assert out.shape == (64, 32, 3)
        hits = [(y, x) for y in range(9) for x in range(5) if np.array_equal(big[y:y + 64, x:x + 32], out)]
        assert hits, "the output is not a 64x32 window of the 1.125x image"
        offsets.add(hits[0])
    assert len(offsets) > 5  # the window moves


def test_random2d_translation_probability():
    img = _image()
    plain = np.asarray(Resize(64, 32)(img))
    never = Random2DTranslation(64, 32, p=0.0)
    assert all(np.array_equal(np.asarray(never(img)), plain) for _ in range(5))
    half = Random2DTranslation(64, 32, p=0.5)
    random.seed(0)
    same = sum(np.array_equal(np.asarray(half(img)), plain) for _ in range(400))
    assert 150 < same < 250  # about half resized only (a crop at offset 0 of the big image differs too)
    with pytest.raises(ValueError, match="p must be in"):
        Random2DTranslation(64, 32, p=1.5)


def test_train_transform_crop_choice():
    steps = build_train_transform(64, 32).transforms
    assert isinstance(steps[0], Random2DTranslation) and steps[0].p == 0.5  # the paper's default
    steps = build_train_transform(64, 32, crop="pad", pad=4).transforms
    assert isinstance(steps[0], Resize) and any(isinstance(s, RandomTranslate) and s.padding == 4 for s in steps)
    steps = build_train_transform(64, 32, crop="none").transforms
    assert isinstance(steps[0], Resize) and not any(isinstance(s, (RandomTranslate, Random2DTranslation))
                                                    for s in steps)
    assert tuple(build_train_transform(64, 32)(_image()).shape) == (3, 64, 32)
    with pytest.raises(ValueError, match="crop must be one of"):
        build_train_transform(64, 32, crop="zoom")
