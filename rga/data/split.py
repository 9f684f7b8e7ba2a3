"""A validation split carved from the training identities, for choosing a recipe without the test split.

``validation_split(ds, n)`` holds out ``n`` training identities (a fixed draw, the same for every run
and seed, so recipes are compared on the same images) and returns a new :class:`ReidDataset` whose
``train`` is the other identities (relabelled 0..K-1) and whose ``query`` / ``gallery`` are the
held-out ones, split as the synthetic sets split their test identities: an identity's first image
(in file-name order) in each camera is its query there, its other images are the gallery. Queries
without a gallery image of the same identity from another camera (which the Market-1501 protocol
cannot score) are dropped. The test split (``ds.query`` / ``ds.gallery``) is not in the result at
all, so an evaluation of it cannot read a test image.

``rga.train --val-ids N`` uses it: training and every evaluation of the run then see only the
training folder.
"""
from __future__ import annotations

import random
from typing import List, Tuple

from .datasets import Item, ReidDataset

#: the draw of the held-out identities does not depend on the run's seed: every run that names
#: the same --val-ids is scored on the same validation images
SPLIT_SEED = 20221


def held_out_ids(train: List[Item], n: int) -> List[int]:
    """The ``n`` training ids held out for validation (sorted)."""
    pids = sorted({p for _, p, _ in train})
    if not 1 <= n <= len(pids) - 2:
        raise ValueError(f"val_ids must be between 1 and {len(pids) - 2} (the training split has "
                         f"{len(pids)} identities and needs at least 2 left to train on), got {n}")
    return sorted(random.Random(SPLIT_SEED).sample(pids, n))


def split_queries(items: List[Item]) -> Tuple[List[Item], List[Item]]:
    """(query, gallery) of some identities' images: the first image of each (id, camera) is a query."""
    query, gallery, seen = [], [], set()
    for item in sorted(items, key=lambda it: it[0]):
        key = (item[1], item[2])
        (gallery if key in seen else query).append(item)
        seen.add(key)
    cams_of = {}
    for _, p, c in gallery:
        cams_of.setdefault(p, set()).add(c)
    query = [q for q in query if cams_of.get(q[1], set()) - {q[2]}]
    return query, gallery


def validation_split(ds: ReidDataset, n: int) -> ReidDataset:
    """A dataset of ``ds``'s training images only: ``n`` identities held out as query / gallery."""
    held = set(held_out_ids(ds.train, n))
    train = [it for it in ds.train if it[1] not in held]
    query, gallery = split_queries([it for it in ds.train if it[1] in held])
    if not query:
        raise ValueError(f"the {n} held-out identities give no query with a cross-camera match")
    return ReidDataset(f"{ds.name}[val {n} ids]", ds.root, train, query, gallery, relabel=True,
                       verbose=False, notes=list(ds.notes) + [
                           f"validation split: {n} training identities held out as {len(query)} queries and "
                           f"{len(gallery)} gallery images; the test split is not used"])
