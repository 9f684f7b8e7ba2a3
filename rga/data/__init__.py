"""Datasets: ``build_dataset(name, root, **kw)`` and the image-reading ``ImageDataset``.

Names: "synthetic" (default; generated under root on first use), "synthetic_scenes" (people at
random scale and position in cluttered scenes with other people and occluders; generated too),
"market1501",
"cuhk03" (kw variant="labeled"|"detected"; or the names "cuhk03_labeled" / "cuhk03_detected"),
"msmt17" (kw version="V1"|"V2", auto-detected by default). See docs/data.md.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from .datasets import (CUHK03_LAYOUT, MARKET_LAYOUT, MSMT17_LAYOUT, DatasetLayoutError, Item,
                       ReidDataset, load_cuhk03, load_market1501, load_msmt17, parse_market_name,
                       relabel_items)
from .check import check_dataset, find_bad_images
from .images import ImageReadError, UnsupportedImageError, read_image, to_rgb8
from .generated import mask_path
from .synthetic import SyntheticConfig, build_synthetic, generate_synthetic
from .synthetic_scenes import SceneConfig, build_synthetic_scenes, generate_scenes

__all__ = [
    "build_dataset", "DATASETS", "ImageDataset", "ImageReadError", "read_image", "ReidDataset",
    "DatasetLayoutError", "load_market1501", "load_cuhk03", "load_msmt17", "build_synthetic",
    "generate_synthetic", "SyntheticConfig", "mask_path", "parse_market_name", "relabel_items",
    "check_dataset", "find_bad_images", "to_rgb8", "UnsupportedImageError", "SceneConfig",
    "build_synthetic_scenes", "generate_scenes",
]


def _cuhk03(variant: str) -> Callable[..., ReidDataset]:
    def load(root, verbose=True, **kw):
        if "variant" in kw and kw["variant"] != variant:
            raise ValueError(f"cuhk03_{variant} called with variant={kw['variant']!r}")
        kw.pop("variant", None)
        return load_cuhk03(root, variant=variant, verbose=verbose, **kw)
    return load


#: name -> loader(root, verbose=True, **kw); a flat table, as in torchreid
DATASETS: Dict[str, Callable[..., ReidDataset]] = {
    "synthetic": build_synthetic,
    "synthetic_scenes": build_synthetic_scenes,
    "market1501": load_market1501,
    "cuhk03": load_cuhk03,
    "cuhk03_labeled": _cuhk03("labeled"),
    "cuhk03_detected": _cuhk03("detected"),
    "msmt17": load_msmt17,
}
_ALIASES = {"market": "market1501", "market-1501": "market1501", "msmt": "msmt17",
            "cuhk03-np": "cuhk03"}


def build_dataset(name: str = "synthetic", root: str = "data", verbose: bool = True,
                  **kw) -> ReidDataset:
    """Load (or, for "synthetic" and "synthetic_scenes", generate on first use) a dataset under ``root``.

    Unknown keyword arguments raise TypeError (they are never silently ignored).
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[key](root, verbose=verbose, **kw)


try:  # a torch Dataset when torch is there; the class works without it too
    from torch.utils.data import Dataset as _Base
except ImportError:  # pragma: no cover
    _Base = object


class ImageDataset(_Base):
    """items: (path, pid, camid) triples. Returns (transform(PIL RGB image), pid, camid, path)."""

    def __init__(self, items: Sequence[Item], transform: Optional[Callable] = None):
        self.items: List[Item] = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, pid, camid = self.items[index]
        img = read_image(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, pid, camid, path
