"""Image transforms for re-id training and testing, written on PIL and torch alone (no torchvision).

Training follows the paper's recipe as the public code runs it (Section 4.1): random crop
(Random2DTranslation: with probability 0.5 enlarge to 1.125·H × 1.125·W and crop a random H×W
window, else resize to H×W), horizontal flip, normalise, random erasing. The other crop,
``crop="pad"``, resizes to H×W, zero-pads and crops back (what many re-id code bases do). Every random choice is drawn
from Python's `random` module, which the checkpoint saves and DataLoader workers re-seed, so runs
are reproducible and resumable.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self):
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


def _to_pil(img) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB") if img.mode != "RGB" else img
    if isinstance(img, np.ndarray):
        return Image.fromarray(img).convert("RGB")
    raise TypeError(f"expected a PIL image or a numpy array, got {type(img).__name__}")


class Resize:
    """Resize to exactly (height, width), bilinear."""

    def __init__(self, height: int, width: int):
        self.size = (int(height), int(width))

    def __call__(self, img):
        img = _to_pil(img)
        h, w = self.size
        if img.size == (w, h):
            return img
        return img.resize((w, h), Image.BILINEAR)

    def __repr__(self):
        return f"Resize{self.size}"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img):
        img = _to_pil(img)
        if random.random() < self.p:
            return img.transpose(Image.FLIP_LEFT_RIGHT)
        return img

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class RandomTranslate:
    """Zero-pad by `padding` pixels on every side, then crop a random window of the original size.

    This is the "random cropping" of the paper, as the public re-id code bases do it: the content
    moves by up to `padding` pixels in each direction.
    """

    def __init__(self, padding: int = 10):
        self.padding = int(padding)

    def __call__(self, img):
        img = _to_pil(img)
        if self.padding <= 0:
            return img
        w, h = img.size
        padded = ImageOps.expand(img, border=self.padding, fill=0)
        x0 = random.randint(0, 2 * self.padding)
        y0 = random.randint(0, 2 * self.padding)
        return padded.crop((x0, y0, x0 + w, y0 + h))

    def __repr__(self):
        return f"RandomTranslate(padding={self.padding})"


class Random2DTranslation:
    """With probability `p`, resize to round(scale·W) × round(scale·H) and crop a random H×W window;
    otherwise resize to H×W. The "random cropping" of the public RGA code (scale 1.125, p 0.5); it
    includes the resize, so it replaces `Resize` in a pipeline."""

    def __init__(self, height: int, width: int, p: float = 0.5, scale: float = 1.125):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if scale < 1.0:
            raise ValueError(f"scale must be >= 1, got {scale}")
        self.height, self.width, self.p, self.scale = int(height), int(width), float(p), float(scale)

    def __call__(self, img):
        img = _to_pil(img)
        if random.uniform(0, 1) >= self.p:
            return Resize(self.height, self.width)(img)
        big_w, big_h = int(round(self.width * self.scale)), int(round(self.height * self.scale))
        img = img.resize((big_w, big_h), Image.BILINEAR)
        x0 = int(round(random.uniform(0, big_w - self.width)))
        y0 = int(round(random.uniform(0, big_h - self.height)))
        return img.crop((x0, y0, x0 + self.width, y0 + self.height))

    def __repr__(self):
        return f"Random2DTranslation({self.height}x{self.width}, p={self.p}, scale={self.scale})"


class ToTensor:
    """PIL RGB image -> float32 tensor (3, H, W) in [0, 1]."""

    def __call__(self, img):
        arr = np.asarray(_to_pil(img), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)

    def __repr__(self):
        return "ToTensor()"


class Normalize:
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def __repr__(self):
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class RandomErasing:
    """Random erasing (Zhong et al., 2020) on a normalised tensor.

    With probability `p`, a rectangle covering a fraction in [sl, sh] of the image with aspect ratio
    in [r1, 1/r1] is filled with `value` (per channel). The fill is 0 here because the tensor is
    already normalised, i.e. the rectangle becomes the dataset mean colour.
    """

    def __init__(self, p: float = 0.5, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3, value=0.0,
                 attempts: int = 100):
        self.p, self.sl, self.sh, self.r1, self.value, self.attempts = p, sl, sh, r1, value, attempts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if random.random() >= self.p:
            return x
        _, h, w = x.shape
        area = h * w
        for _ in range(self.attempts):
            target = random.uniform(self.sl, self.sh) * area
            aspect = random.uniform(self.r1, 1.0 / self.r1)
            eh = int(round(math.sqrt(target * aspect)))
            ew = int(round(math.sqrt(target / aspect)))
            if 0 < eh < h and 0 < ew < w:
                y0 = random.randint(0, h - eh)
                x0 = random.randint(0, w - ew)
                x = x.clone()
                x[:, y0:y0 + eh, x0:x0 + ew] = self.value
                return x
        return x

    def __repr__(self):
        return f"RandomErasing(p={self.p}, sl={self.sl}, sh={self.sh}, r1={self.r1})"


CROPS = ("random2d", "pad", "none")


def build_train_transform(height: int = 256, width: int = 128, *, flip: float = 0.5, crop: str = "random2d",
                          crop_prob: float = 0.5, pad: int = 10, erasing: float = 0.5) -> Compose:
    """The paper's training augmentation. crop: "random2d" (Random2DTranslation with probability
    crop_prob, the public code's), "pad" (zero-pad by `pad` px, crop back) or "none". Set
    flip/erasing to 0 to switch a step off."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if crop == "random2d" and crop_prob > 0:
        steps = [Random2DTranslation(height, width, p=crop_prob)]
    else:
        steps = [Resize(height, width)]
    if flip > 0:
        steps.append(RandomHorizontalFlip(flip))
    if crop == "pad" and pad > 0:
        steps.append(RandomTranslate(pad))
    steps += [ToTensor(), Normalize()]
    if erasing > 0:
        steps.append(RandomErasing(p=erasing))
    return Compose(steps)


def build_test_transform(height: int = 256, width: int = 128) -> Compose:
    return Compose([Resize(height, width), ToTensor(), Normalize()])
