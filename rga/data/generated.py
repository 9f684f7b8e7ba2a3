"""A generated dataset on disk, whatever draws its images (rga.data.synthetic, rga.data.synthetic_scenes):
the Market-1501 layout with a mask per image (:func:`write_generated`, identities and cameras
planned by :func:`plan`), the marker file that says which generator and parameters made it
(:func:`marker_json`), and the cache (:func:`build_generated`): generate once under a lock (several
processes may ask at once), reuse while the marker matches, regenerate into a temporary folder and
swap it in when it does not, and never replace a set that a live dataset object is using
(``ROOT/.NAME.inuse``)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

SPLIT_DIRS = ("bounding_box_train", "query", "bounding_box_test")


def mask_path(image_path: str) -> str:
    """The mask PNG of a synthetic image: <dir>/masks/<split>/<stem>.png."""
    p = Path(image_path)
    return str(p.parent.parent / "masks" / p.parent.name / (p.stem + ".png"))



def plan(cfg) -> List[Tuple[int, int, bool]]:
    """(pid, camera, is_test) assignments: which cameras see which identity and how often (`cfg`: the
    fields of rga.data.synthetic.SyntheticConfig)."""
    out = []
    for pid in range(1, cfg.num_train_ids + cfg.num_test_ids + 1):
        r = np.random.default_rng([int(cfg.seed), 3, int(pid)])
        k = int(r.integers(cfg.min_cams_per_id, cfg.max_cams_per_id + 1))
        cams = np.sort(r.choice(cfg.num_cameras, size=k, replace=False))
        for c in cams:
            n = int(r.integers(cfg.min_imgs_per_cam, cfg.max_imgs_per_cam + 1))
            out += [(pid, int(c), pid > cfg.num_train_ids)] * n
    return out


RenderFn = Callable[[int, int, int], Tuple[np.ndarray, np.ndarray]]
DistractorFn = Callable[[int], Tuple[np.ndarray, np.ndarray, int]]


def write_generated(out_dir, cfg, render: RenderFn, distractor: DistractorFn,
                    marker_text: str, marker: str) -> Path:
    """Write a generated dataset into ``out_dir`` (which must not exist yet), in the Market-1501
    layout with a mask per image: ``render(pid, camera, k)`` gives the k-th (1-based) image of an
    identity in a camera and its mask, ``distractor(i)`` the i-th gallery distractor (pid 0) and
    its camera. Identities and cameras follow ``plan(cfg)``; a test identity's first image in each
    camera is its query there, the others go to the gallery. The marker is written last."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    for d in SPLIT_DIRS:
        (out_dir / d).mkdir()
        (out_dir / "masks" / d).mkdir(parents=True)
    frame = [0] * cfg.num_cameras
    seen_query = set()

    def write(split_dir: str, pid: int, c: int, img: np.ndarray, mask: np.ndarray) -> None:
        frame[c] += 1
        stem = f"{pid:04d}_c{c + 1}s1_{frame[c]:06d}_00"
        Image.fromarray(img).save(out_dir / split_dir / f"{stem}.jpg", quality=cfg.jpeg_quality)
        Image.fromarray(mask).save(out_dir / "masks" / split_dir / f"{stem}.png")

    counter: Dict[Tuple[int, int], int] = {}
    for pid, c, is_test in plan(cfg):
        k = counter[(pid, c)] = counter.get((pid, c), 0) + 1
        img, mask = render(pid, c, k)
        if not is_test:
            split = "bounding_box_train"
        elif (pid, c) not in seen_query:
            seen_query.add((pid, c))
            split = "query"
        else:
            split = "bounding_box_test"
        write(split, pid, c, img, mask)
    for i in range(cfg.num_distractors):
        img, mask, c = distractor(i)
        write("bounding_box_test", 0, c, img, mask)
    (out_dir / marker).write_text(marker_text)
    return out_dir


def marker_json(cfg, version: int, **extra) -> str:
    """The marker file's text: the generator's version, `extra` (e.g. its name) and every parameter."""
    return json.dumps({"generator_version": version, **extra, **dataclasses.asdict(cfg)},
                      sort_keys=True, indent=1) + "\n"


def _lock(f) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no inter-process lock
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed


def make_config(cls, what: str, kw: Dict):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(kw) - fields
    if unknown:
        raise TypeError(f"unknown {what} dataset options {sorted(unknown)}; "
                        f"valid: {sorted(fields)}")
    cfg = cls(**kw)
    cfg.validate()
    return cfg


def _refuse_if_in_use(root: Path, dirname: str, target: Path) -> None:
    """DatasetInUseError if a dataset object of a live process holds ``<root>/.<dirname>.inuse``
    (shared, :func:`_hold_in_use`): the set may not be replaced under it."""
    from ..errors import DatasetInUseError

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no inter-process lock
        return
    with open(root / f".{dirname}.inuse", "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetInUseError(f"refusing to replace {target}: a training run (or another process) is using "
                                    "it; wait for it to end, or generate the new set under another root") from None


def _hold_in_use(root: Path, dirname: str, ds) -> None:
    """Hold a shared lock on ``<root>/.<dirname>.inuse`` for as long as `ds` lives."""
    import weakref

    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return
    f = open(root / f".{dirname}.inuse", "a")
    fcntl.flock(f.fileno(), fcntl.LOCK_SH)
    weakref.finalize(ds, f.close)


def build_generated(root, cfg, dirname: str, marker_name: str, wanted: str,
                    generate: Callable[[Path], Path], name: str, verbose: bool = True):
    """Load <root>/<dirname>, generating it first (``generate(tmp_folder)``) if it is missing or its
    marker file differs from ``wanted`` (another generator version or other parameters)."""
    from .datasets import load_market1501

    root = Path(root).expanduser()
    target = root / dirname
    marker = target / marker_name

    def up_to_date() -> bool:
        return marker.exists() and marker.read_text() == wanted

    leftovers = list(root.glob(f".{dirname}.tmp-*")) if root.is_dir() else []
    if not up_to_date() or leftovers:
        root.mkdir(parents=True, exist_ok=True)
        # several processes (e.g. distributed ranks) may get here at once: one generates, the
        # others wait for the lock and then find the dataset ready
        with open(root / f".{dirname}.lock", "w") as lock:
            _lock(lock)
            # with the lock held nobody is generating: a temporary folder is a killed run's leftover
            for old in root.glob(f".{dirname}.tmp-*"):
                shutil.rmtree(old, ignore_errors=True)
            if not up_to_date():
                if target.exists():
                    _refuse_if_in_use(root, dirname, target)  # before generating, and again before replacing
                if target.exists() and not marker.exists():
                    raise FileExistsError(
                        f"{target} exists but has no {marker_name}: not generated by this project "
                        f"(or interrupted); remove it to regenerate")
                tmp = root / f".{dirname}.tmp-{os.getpid()}"
                if tmp.exists():
                    shutil.rmtree(tmp)
                if verbose:
                    print(f"=> generating the {name} dataset in {target} ({cfg})")
                generate(tmp)
                if target.exists():  # ours (it has the marker), made with other parameters
                    _refuse_if_in_use(root, dirname, target)
                    shutil.rmtree(target)
                os.replace(tmp, target)
    notes = [f"{name}: seed {cfg.seed}, {cfg.height}x{cfg.width}, masks in {target}/masks"]
    ds = load_market1501(target, name=name, verbose=verbose, notes=notes)
    ds.config = cfg
    ds.mask_dir = str(target / "masks")
    ds.marker = str(marker)  # what rga.data.check.data_fingerprint reads
    _hold_in_use(root, dirname, ds)  # while ds lives, the set is not replaced
    return ds
