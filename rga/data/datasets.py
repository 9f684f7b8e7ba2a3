"""Re-id dataset parsers for the layouts users already have on disk.

Every parser returns a :class:`ReidDataset`: ``train``, ``query``, ``gallery`` are lists of
``(path, pid, camid)`` with 0-based integer camera ids; training ids are relabelled 0..K-1
(query/gallery ids keep their original values, which only need to be compared with each other).
Junk images (pid -1) are dropped everywhere; Market-style distractors (pid 0) are kept in the
gallery only. File names that do not parse are counted per split in ``dataset.unparsed`` and
reported with a warning, never dropped silently.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DatasetLayoutError  # noqa: F401 - re-exported

Item = Tuple[str, int, int]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


class ReidDataset:
    """train / query / gallery lists plus the numbers a trainer needs."""

    def __init__(self, name: str, root: str, train: List[Item], query: List[Item],
                 gallery: List[Item], unparsed: Optional[Dict[str, List[str]]] = None,
                 dropped: Optional[Dict[str, int]] = None, relabel: bool = True,
                 verbose: bool = True, notes: Sequence[str] = ()):
        self.name = name
        self.root = str(root)
        if relabel:
            train = relabel_items(train)
        self.train, self.query, self.gallery = train, query, gallery
        self.unparsed = {k: list(v) for k, v in (unparsed or {}).items() if v}
        self.num_unparsed = sum(len(v) for v in self.unparsed.values())
        self.dropped = dict(dropped or {})
        self.notes = list(notes)
        self.num_train_pids = len({p for _, p, _ in train})
        # max + 1 (not the count) so that camera ids can index an embedding table
        self.num_train_cams = (max(c for _, _, c in train) + 1) if train else 0
        self.num_train_imgs = len(train)
        if self.num_unparsed:
            detail = ", ".join(f"{k}: {len(v)} (e.g. {v[0]!r})" for k, v in self.unparsed.items())
            warnings.warn(f"{name}: {self.num_unparsed} image file names did not parse and were "
                          f"not used ({detail}); see dataset.unparsed", stacklevel=3)
        if verbose:
            print(self.summary())

    @staticmethod
    def _stats(items: List[Item]) -> Tuple[int, int, int]:
        return (len({p for _, p, _ in items}), len(items), len({c for _, _, c in items}))

    def summary(self) -> str:
        lines = [f"=> {self.name} ({self.root})",
                 "  subset  | # ids | # images | # cameras",
                 "  --------+-------+----------+----------"]
        for split in ("train", "query", "gallery"):
            n_ids, n_img, n_cam = self._stats(getattr(self, split))
            lines.append(f"  {split:<7} | {n_ids:5d} | {n_img:8d} | {n_cam:9d}")
        if self.num_unparsed:
            lines.append("  unparsed file names: " +
                         ", ".join(f"{k} {len(v)}" for k, v in self.unparsed.items()))
        dropped = {k: v for k, v in self.dropped.items() if v}
        if dropped:
            lines.append("  dropped: " + ", ".join(f"{k} {v}" for k, v in dropped.items()))
        lines.extend("  " + n for n in self.notes)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"ReidDataset({self.name!r}, train={len(self.train)}, query={len(self.query)}, "
                f"gallery={len(self.gallery)}, num_train_pids={self.num_train_pids})")


def relabel_items(items: List[Item]) -> List[Item]:
    """Map the ids in ``items`` to 0..K-1 in increasing order of the original id."""
    mapping = {p: i for i, p in enumerate(sorted({p for _, p, _ in items}))}
    return [(path, mapping[p], c) for path, p, c in items]


def _first_existing(candidates: Iterable[Path], required: Sequence[str]) -> Optional[Path]:
    for c in candidates:
        if all((c / r).exists() for r in required):
            return c
    return None


def _layout_error(what: str, root: Path, checked: Sequence[Path], layout: str) -> DatasetLayoutError:
    tried = "\n".join(f"  {p}" for p in checked)
    return DatasetLayoutError(f"{what} not found under {root}.\nChecked:\n{tried}\n{layout}")


# ---------------------------------------------------------------------------------------------
# Market-1501
# ---------------------------------------------------------------------------------------------
MARKET_LAYOUT = """Expected Market-1501 layout (either form):
  <root>/Market-1501-v15.09.15/bounding_box_train/0002_c1s1_000451_03.jpg ...
  <root>/Market-1501-v15.09.15/query/...
  <root>/Market-1501-v15.09.15/bounding_box_test/...
or the three folders directly in <root> (<root>/bounding_box_train, <root>/query,
<root>/bounding_box_test). Names: <pid>_c<camera>s<sequence>_<frame>_<box>.jpg, pid -1 = junk
(dropped), pid 0 = distractor (kept in the gallery), cameras numbered from 1."""
MARKET_SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
_MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)s\d+_\d+_\d+\.(?:jpe?g|png)$", re.IGNORECASE)


def parse_market_name(name: str) -> Optional[Tuple[int, int]]:
    """(pid, 0-based camid) from a Market-1501 file name, or None if it does not parse."""
    m = _MARKET_RE.match(name)
    if not m:
        return None
    pid, cam = int(m.group(1)), int(m.group(2))
    if cam < 1 or pid < -1:
        return None
    return pid, cam - 1


def find_market_dir(root) -> Path:
    root = Path(root).expanduser()
    candidates = [root, root / "Market-1501-v15.09.15", root / "market1501",
                  root / "market1501" / "Market-1501-v15.09.15", root / "Market-1501"]
    found = _first_existing(candidates, list(MARKET_SPLITS.values()))
    if found is None:
        raise _layout_error("Market-1501 folders (bounding_box_train, query, bounding_box_test)",
                            root, candidates, MARKET_LAYOUT)
    return found


def _scan_market_folder(folder: Path, split: str, unparsed: Dict[str, List[str]],
                        dropped: Dict[str, int]) -> List[Item]:
    items = []
    for name in sorted(os.listdir(folder)):
        if not name.lower().endswith(IMAGE_EXTS):
            dropped["non-image files"] = dropped.get("non-image files", 0) + 1
            continue
        parsed = parse_market_name(name)
        if parsed is None:
            unparsed.setdefault(split, []).append(name)
            continue
        pid, camid = parsed
        if pid == -1:
            dropped["junk (pid -1)"] = dropped.get("junk (pid -1)", 0) + 1
            continue
        if pid == 0 and split != "gallery":
            dropped[f"distractors (pid 0) in {split}"] = \
                dropped.get(f"distractors (pid 0) in {split}", 0) + 1
            continue
        items.append((str(folder / name), pid, camid))
    return items


def load_market1501(root, name: str = "market1501", verbose: bool = True,
                    notes: Sequence[str] = ()) -> ReidDataset:
    base = find_market_dir(root)
    unparsed: Dict[str, List[str]] = {}
    dropped: Dict[str, int] = {}
    splits = {s: _scan_market_folder(base / d, s, unparsed, dropped)
              for s, d in MARKET_SPLITS.items()}
    return ReidDataset(name, base, splits["train"], splits["query"], splits["gallery"],
                       unparsed=unparsed, dropped=dropped, verbose=verbose, notes=notes)


# ---------------------------------------------------------------------------------------------
# CUHK03, new (767/700) protocol
# ---------------------------------------------------------------------------------------------
CUHK03_LAYOUT = """Expected CUHK03 layout (new 767/700 protocol, Zhong et al. 2017):
  <root>/cuhk03_release/cuhk-03.mat                      (MATLAB v7.3 / HDF5)
  <root>/cuhk03_new_protocol_config_labeled.mat
  <root>/cuhk03_new_protocol_config_detected.mat
(<root> may also be a folder holding cuhk03/; the config files may sit in cuhk03_release/).
Images are extracted once to <root>/images_<labeled|detected>/*.png (or under cache_dir)."""


def _mat_str(x) -> str:
    """A string from whatever scipy.io.loadmat made of a MATLAB string inside a cell."""
    while isinstance(x, np.ndarray):
        if x.dtype.kind in "US":
            return "".join(str(v) for v in x.ravel())
        if x.size != 1:
            raise ValueError(f"expected one string, got an array of shape {x.shape}")
        x = x.ravel()[0]
    return str(x)


def _extract_cuhk03_images(mat_path: Path, variant: str, out_dir: Path) -> int:
    """Write every image of ``variant`` in cuhk-03.mat to ``out_dir`` as
    <pair>_<pid:03d>_<view>_<index:02d>.png (the names the new-protocol filelist uses)."""
    import h5py
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with h5py.File(mat_path, "r") as f:
        if variant not in f:
            raise DatasetLayoutError(f"{mat_path} has no '{variant}' cell array "
                                     f"(keys: {sorted(f.keys())})\n{CUHK03_LAYOUT}")
        for pair, pair_ref in enumerate(np.asarray(f[variant][()]).ravel()):
            refs = np.asarray(f[pair_ref][()]).T  # (num_pids, 10) after MATLAB's transpose
            for pid in range(refs.shape[0]):
                for k in range(refs.shape[1]):
                    img = np.asarray(f[refs[pid, k]][()])
                    if img.ndim != 3 or img.size == 0:  # empty cell: fewer than 10 images
                        continue
                    img = np.ascontiguousarray(img.T)  # (H, W, 3)
                    view = 1 if k < 5 else 2
                    name = f"{pair + 1}_{pid + 1:03d}_{view}_{k + 1:02d}.png"
                    Image.fromarray(img.astype(np.uint8)).save(out_dir / name)
                    n += 1
    return n


def load_cuhk03(root, variant: str = "labeled", cache_dir=None, verbose: bool = True
                ) -> ReidDataset:
    if variant not in ("labeled", "detected"):
        raise ValueError(f"CUHK03 variant must be 'labeled' or 'detected', got {variant!r}")
    root = Path(root).expanduser()
    cfg_name = f"cuhk03_new_protocol_config_{variant}.mat"
    bases = [root, root / "cuhk03"]
    base = _first_existing(bases, ["cuhk03_release/cuhk-03.mat"])
    if base is None:
        raise _layout_error("cuhk03_release/cuhk-03.mat", root, bases, CUHK03_LAYOUT)
    mat_path = base / "cuhk03_release" / "cuhk-03.mat"
    cfg_candidates = [base / cfg_name, base / "cuhk03_release" / cfg_name]
    cfg_path = next((p for p in cfg_candidates if p.exists()), None)
    if cfg_path is None:
        raise _layout_error(cfg_name, root, cfg_candidates, CUHK03_LAYOUT)

    img_dir = Path(cache_dir).expanduser() if cache_dir else base
    img_dir = img_dir / f"images_{variant}"
    marker = img_dir / ".extracted"
    if not marker.exists():
        if verbose:
            print(f"=> extracting CUHK03 {variant} images from {mat_path} to {img_dir} (once)")
        n = _extract_cuhk03_images(mat_path, variant, img_dir)
        marker.write_text(f"{n}\n")

    import scipy.io

    cfg = scipy.io.loadmat(str(cfg_path))
    missing_fields = [k for k in ("train_idx", "query_idx", "gallery_idx", "labels", "filelist")
                      if k not in cfg]
    if missing_fields:
        raise ValueError(f"{cfg_path} lacks fields {missing_fields}\n{CUHK03_LAYOUT}")
    labels = np.asarray(cfg["labels"]).ravel().astype(np.int64)
    filelist = [_mat_str(x) for x in np.asarray(cfg["filelist"], dtype=object).ravel()]
    cam_field = np.asarray(cfg["camId"]).ravel().astype(np.int64) if "camId" in cfg else None

    unparsed: Dict[str, List[str]] = {}
    missing: List[str] = []

    def take(split: str) -> List[Item]:
        items = []
        for i in np.asarray(cfg[f"{split}_idx"]).ravel().astype(np.int64) - 1:  # 1-based
            name = filelist[i]
            # camera = the view within the camera pair, from the name (<pair>_<pid>_<view>_<k>),
            # as in common practice; the camId field only when the name does not say
            parts = Path(name).stem.split("_")
            if len(parts) == 4 and parts[2].isdigit() and int(parts[2]) >= 1:
                camid = int(parts[2]) - 1
            elif cam_field is not None:
                camid = int(cam_field[i]) - 1
            else:
                unparsed.setdefault(split, []).append(name)
                continue
            path = img_dir / name
            if not path.exists():
                missing.append(name)
            items.append((str(path), int(labels[i]), camid))
        return items

    train, query, gallery = take("train"), take("query"), take("gallery")
    if missing:
        raise DatasetLayoutError(f"{len(missing)} images named in {cfg_path} are missing from "
                                 f"{img_dir} (e.g. {missing[:3]}); delete {img_dir} to re-extract."
                                 f"\n{CUHK03_LAYOUT}")
    return ReidDataset(f"cuhk03_{variant}", base, train, query, gallery, unparsed=unparsed,
                       verbose=verbose)


# ---------------------------------------------------------------------------------------------
# MSMT17 (V1 and V2)
# ---------------------------------------------------------------------------------------------
MSMT17_LAYOUT = """Expected MSMT17 layout (V1 or V2):
  <root>/MSMT17_V1/train/0000/0000_000_01_0303morning_0015_0.jpg ...
  <root>/MSMT17_V1/test/...
  <root>/MSMT17_V1/list_train.txt list_val.txt list_query.txt list_gallery.txt
(V2: MSMT17_V2/ with mask_train_v2/ and mask_test_v2/). Each list line: '<relative path> <pid>'.
<root> may also be the MSMT17_V* folder itself or hold msmt17/MSMT17_V*.
Training uses list_train + list_val (common practice)."""
_MSMT_DIRS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
_MSMT_LISTS = ["list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"]


def _read_msmt_list(list_path: Path, img_dir: Path, split: str,
                    unparsed: Dict[str, List[str]]) -> List[Item]:
    items = []
    with open(list_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            fields = line.split()
            rel = fields[0]
            parts = Path(rel).name.split("_")
            if (len(fields) != 2 or not fields[1].lstrip("-").isdigit() or len(parts) < 3
                    or not parts[2].isdigit() or int(parts[2]) < 1):
                unparsed.setdefault(split, []).append(line)
                continue
            items.append((str(img_dir / rel), int(fields[1]), int(parts[2]) - 1))
    return items


def load_msmt17(root, version: Optional[str] = None, check_files: bool = True,
                verbose: bool = True) -> ReidDataset:
    root = Path(root).expanduser()
    versions = [version.upper()] if version else ["V2", "V1"]
    for v in versions:
        if v not in _MSMT_DIRS:
            raise ValueError(f"MSMT17 version must be 'V1' or 'V2', got {version!r}")
    checked: List[Path] = []
    base, ver = None, None
    for v in versions:
        train_d, test_d = _MSMT_DIRS[v]
        cands = [root / f"MSMT17_{v}", root / "msmt17" / f"MSMT17_{v}", root]
        checked += [c for c in cands if c not in checked]
        base = _first_existing(cands, _MSMT_LISTS + [train_d, test_d])
        if base is not None:
            ver = v
            break
    if base is None:
        raise _layout_error("MSMT17 folders and list_*.txt files", root, checked, MSMT17_LAYOUT)
    train_dir, test_dir = (base / d for d in _MSMT_DIRS[ver])
    unparsed: Dict[str, List[str]] = {}
    train = (_read_msmt_list(base / "list_train.txt", train_dir, "train", unparsed)
             + _read_msmt_list(base / "list_val.txt", train_dir, "train", unparsed))
    query = _read_msmt_list(base / "list_query.txt", test_dir, "query", unparsed)
    gallery = _read_msmt_list(base / "list_gallery.txt", test_dir, "gallery", unparsed)
    dropped: Dict[str, int] = {}
    seen = set()
    uniq = []
    for it in train:  # an image listed in both train and val is used once
        if it[0] in seen:
            dropped["duplicate train/val entries"] = dropped.get("duplicate train/val entries", 0) + 1
            continue
        seen.add(it[0])
        uniq.append(it)
    train = uniq
    out = {}
    for split, items in (("train", train), ("query", query), ("gallery", gallery)):
        keep = [it for it in items if it[1] != -1]
        if len(keep) != len(items):
            dropped["junk (pid -1)"] = dropped.get("junk (pid -1)", 0) + len(items) - len(keep)
        out[split] = keep
    if check_files:
        missing = [p for items in out.values() for p, _, _ in items if not os.path.exists(p)]
        if missing:
            raise DatasetLayoutError(f"{len(missing)} images listed in {base}/list_*.txt are "
                                     f"missing (e.g. {missing[:3]})\n{MSMT17_LAYOUT}")
    return ReidDataset(f"msmt17_{ver.lower()}", base, out["train"], out["query"], out["gallery"],
                       unparsed=unparsed, dropped=dropped, verbose=verbose,
                       notes=["train = list_train + list_val (common practice)"])
