"""Check a whole dataset before training or evaluating on it: every split non-empty, every image
readable and decodable (JPEGs at 1/8 size: fast, and the whole file is still read), and queries
the evaluation protocol can score (a gallery image of the same identity from another camera)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence, Tuple

from ..errors import DatasetCheckError
from .images import ImageReadError, read_image

SPLITS = ("train", "query", "gallery")
SHOWN = 5  # problems named in the error message; `python -m rga.data NAME ROOT` lists all


def _check_one(path: str):
    try:
        read_image(path, draft=True)
    except ImageReadError as e:
        text = str(e)
        prefix = f"{path}: "
        text = text.split(prefix, 1)[1] if prefix in text else text
        return text.replace(f" '{path}'", "")  # PIL repeats the path
    return None


def find_bad_images(paths: Sequence[str], threads: int = 0) -> List[Tuple[str, str]]:
    """[(path, reason)] for the images that cannot be read, in the order given. PIL releases the
    GIL while decoding, so a few threads help."""
    threads = threads or min(8, os.cpu_count() or 1)
    if threads <= 1 or len(paths) < 64:
        reasons = [_check_one(p) for p in paths]
    else:
        with ThreadPoolExecutor(threads) as pool:
            reasons = list(pool.map(_check_one, paths, chunksize=32))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def queries_without_cross_camera_match(query, gallery) -> int:
    """How many query items have no gallery item of their identity from another camera: the
    protocol leaves those out of every score (rga.metrics)."""
    cams: Dict[int, set] = {}
    for item in gallery:
        cams.setdefault(int(item[1]), set()).add(int(item[2]))
    return sum(1 for item in query if not (cams.get(int(item[1]), set()) - {int(item[2])}))


def check_dataset(dataset, splits: Sequence[str] = SPLITS, *, images: bool = True, threads: int = 0) -> Dict:
    """Raise DatasetCheckError (one message naming every problem kind and the first files) if a
    split is empty, an image cannot be read, or (query and gallery checked) no query has a gallery
    image of its identity from another camera. Returns {"images": N, "bad": {split: [(path, why)]},
    "queries_without_match": K} (bad is empty when it returns; K queries the protocol will skip,
    0 unless query and gallery are checked)."""
    problems: List[str] = []
    empty = [s for s in splits if not getattr(dataset, s)]
    if empty:
        root = getattr(dataset, "root", "?")
        problems.append(f"empty split(s): {', '.join(empty)} (no usable image under {root})")
    unmatched = 0
    if "query" in splits and "gallery" in splits and dataset.query and dataset.gallery:
        unmatched = queries_without_cross_camera_match(dataset.query, dataset.gallery)
        if unmatched == len(dataset.query):
            problems.append(f"none of the {unmatched} query images has a gallery image of its identity from another "
                            "camera, which the evaluation protocol needs (same-camera matches do not count): "
                            "nothing could be scored")
    bad: Dict[str, List[Tuple[str, str]]] = {}
    n = 0
    if images:
        for s in splits:
            paths = [item[0] for item in getattr(dataset, s)]
            n += len(paths)
            found = find_bad_images(paths, threads)
            if found:
                bad[s] = found
    n_bad = sum(len(v) for v in bad.values())
    if n_bad:
        listed = [(s, p, r) for s, items in bad.items() for p, r in items][:SHOWN]
        groups = {}
        for s, p, r in listed:
            groups.setdefault(s, []).append(f"{p} ({r})")
        text = "; ".join(f"{s}: {', '.join(g)}" for s, g in groups.items())
        more = f"; and {n_bad - SHOWN} more" if n_bad > SHOWN else ""
        problems.append(f"{n_bad} unreadable image(s) of {n}: {text}{more}")
    if problems:
        name = getattr(dataset, "name", "dataset")
        err = DatasetCheckError(f"dataset {name}: " + "; ".join(problems)
                                + (f" (fix or remove these files; `python -m rga.data {name} ROOT` lists all)"
                                   if n_bad else ""))
        err.bad = bad  # every unreadable file, per split
        raise err
    return {"images": n, "bad": bad, "queries_without_match": unmatched}


def unmatched_note(report: Dict, dataset) -> str:
    """A line for the log when some (not all) queries will be skipped by the protocol; "" if none."""
    k = report.get("queries_without_match", 0)
    if not k:
        return ""
    return (f"note: {k} of {len(dataset.query)} query images have no gallery image of their identity from another "
            "camera; the evaluation leaves them out")


# ------------------------------------------------------------------------------------------------
# the data a run trains on: a fingerprint recorded in its checkpoints, checked every epoch and on resume
# ------------------------------------------------------------------------------------------------

def data_fingerprint(ds) -> dict:
    """What identifies the data of `ds`, cheaply: a generated set's marker (its generator version
    and parameters, e.g. the seed); otherwise every image's path and size, hashed. Plain values
    only (it is stored in checkpoints)."""
    import hashlib
    import json

    marker = getattr(ds, "marker", None)
    if marker:
        try:
            return {"marker": marker, "params": json.loads(open(marker, encoding="utf-8").read())}
        except (OSError, ValueError):
            return {"marker": marker, "params": None}
    h = hashlib.sha256()
    count = 0
    for split in SPLITS:
        for item in getattr(ds, split):
            try:
                size = os.stat(item[0]).st_size
            except OSError:
                size = -1
            h.update(f"{split}\0{item[0]}\0{size}\n".encode())
            count += 1
    return {"images": count, "sha256": h.hexdigest()}


def describe_data_change(before: dict, now: dict) -> str | None:
    """None if the fingerprints agree, else what changed, in a few words."""
    if before == now:
        return None
    if "params" in before and "params" in now:
        if now["params"] is None:
            return f"{now['marker']} is gone or unreadable (the set was removed or is being regenerated)"
        old, new = before["params"] or {}, now["params"]
        diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
        return f"the generated set was replaced ({', '.join(diff) or 'regenerated'})"
    if "sha256" in before and "sha256" in now:
        return (f"its image files differ ({before['images']} images then, {now['images']} now; a file replaced, "
                "added or removed)")
    return "it is another kind of dataset"
