"""Search a gallery of person crops with a trained (or exported) re-id model.

    python -m rga.search build runs/quick data/synthetic/bounding_box_test --index gallery.npz
    python -m rga.search query gallery.npz q1.jpg q2.jpg --model runs/quick --top 10 [--json] [--plot q.png]

``build`` extracts L2-normalized features of every image under GALLERY_DIR (recursively; .jpg,
.jpeg, .png, .bmp, .webp) in batches with a progress bar and writes an index file: features,
paths, and the person id / camera when the file names carry them (Market-1501 style
``0001_c1s1_000151_01.jpg``, or any ``<pid>_c<camera>...`` name). An image that cannot be read is
named on stderr, counted, recorded in the index and skipped. MODEL is a run folder or checkpoint
of ``rga.train``, or a file written by ``rga.export`` (``.onnx``, run in ONNX Runtime; ``.pt2``,
run by ``torch.export.load``).

``query`` extracts the query images' features with ``--model`` (required: an index never loads a
model on its own) and ranks the gallery by cosine similarity: an exact search, by a torch matrix
product by default or by ``faiss.IndexFlatIP`` (``pip install faiss-cpu``; ``--backend auto``
takes it for galleries of 100,000 images and more). The model must be the one that built the
index: the index stores its fingerprint (kind, architecture, input size, feature size and a
SHA-256 of the weights, or of the exported file), and another model is refused.
``--plot FILE`` draws each query and its top matches (matplotlib).

The index file is an ``.npz`` written atomically, without pickled objects, and read with
``allow_pickle=False``: arrays ``features`` (N, D) float32, ``paths`` (unicode), ``pids``,
``camids`` (int64, -1 where unknown) and ``meta`` (a JSON object: format version, the model's
path and fingerprint, input size, counts, skipped files). Loading checks it: finite features of
unit length, consistent arrays. A ``.pt2`` model outside the accepted layout is refused unless
``--trust-pickles`` (see rga.exported.read_pt2_entries). An existing ``--index`` that is not an
index is replaced only with ``--force``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cli import flag_type
from .value_parsers import positive_int
from .errors import SearchError, run_cli
from .extractor import FeatureExtractor
from .fileio import atomic_write
from .metrics import same_camera_matches

INDEX_VERSION = 2  # 2: the model's fingerprint in meta; features checked on load
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SEARCH_BACKENDS = ("auto", "torch", "faiss")
POSITIVE_INT = flag_type(positive_int)
FAISS_AUTO_MIN = 100_000  # --backend auto uses faiss (when installed) from this gallery size on
_LOOSE_NAME = re.compile(r"^(-?\d+)_c(\d+)", re.IGNORECASE)


def parse_name(path) -> tuple[int, int]:
    """(pid, 0-based camid) from a file name, (-1, -1) when it carries none."""
    from .data.datasets import parse_market_name

    name = Path(path).name
    parsed = parse_market_name(name)
    if parsed is None:
        m = _LOOSE_NAME.match(name)
        if m and int(m.group(2)) >= 1:
            parsed = int(m.group(1)), int(m.group(2)) - 1
    return parsed if parsed is not None else (-1, -1)


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SearchError(f"gallery folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------

@dataclass
class GalleryIndex:
    features: torch.Tensor  # (N, D) float32, unit rows
    paths: list
    pids: np.ndarray
    camids: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def save(self, path) -> Path:
        """Write the index (atomically) as an .npz of plain arrays."""
        meta = dict(self.meta, index_version=INDEX_VERSION, size=len(self), dim=int(self.features.shape[1]))
        # a file object: np.savez adds no ".npz" to the name
        return atomic_write(path, lambda f: np.savez(
            f, features=self.features.numpy().astype(np.float32), paths=np.array(self.paths, dtype=np.str_),
            pids=self.pids.astype(np.int64), camids=self.camids.astype(np.int64), meta=np.array(json.dumps(meta))),
            what="index", error=SearchError)

    @classmethod
    def load(cls, path) -> "GalleryIndex":
        path = Path(path)
        if not path.is_file():
            raise SearchError(f"index file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001
            raise SearchError(f"{path} is not an index written by rga.search build: {type(e).__name__}: {e}") from e
        missing = {"features", "paths", "pids", "camids", "meta"} - set(arrays)
        if missing:
            raise SearchError(f"{path} is not an index written by rga.search build (missing {sorted(missing)})")
        try:
            meta = json.loads(str(arrays["meta"]))
        except ValueError as e:
            raise SearchError(f"{path}: its meta is not JSON ({e})") from e
        if not isinstance(meta, dict):
            raise SearchError(f"{path}: its meta is a JSON {type(meta).__name__}, not an object; "
                              "not an index written by rga.search build")
        version = meta.get("index_version")
        if version != INDEX_VERSION:
            raise SearchError(f"{path}: index format version {version}, this rga.search reads version {INDEX_VERSION} "
                              "(rebuild the index with rga.search build)")
        if not np.issubdtype(arrays["features"].dtype, np.floating):
            raise SearchError(f"{path}: features of type {arrays['features'].dtype}, expected floats")
        feats = torch.from_numpy(arrays["features"].astype(np.float32))
        n = feats.shape[0]
        if feats.dim() != 2 or not (len(arrays["paths"]) == len(arrays["pids"]) == len(arrays["camids"]) == n):
            raise SearchError(f"{path}: inconsistent index (features {tuple(feats.shape)}, "
                              f"{len(arrays['paths'])} paths)")
        check_index_features(feats, path)
        return cls(feats, [str(p) for p in arrays["paths"]], arrays["pids"], arrays["camids"], meta)


    def search(self, queries: torch.Tensor, top: int = 10, backend: str = "auto"):
        """(similarities (Q, k), indices (Q, k)) of the k = min(top, N) most similar gallery
        entries per query, best first (cosine similarity: features are unit vectors)."""
        return search(self.features, queries, top=top, backend=backend)


def check_index_features(feats: torch.Tensor, where="the index", tol: float = 1e-3) -> None:
    """SearchError unless every feature row is finite and of unit length (rga.search build writes
    L2-normalized features; anything else would rank by similarities that mean nothing)."""
    if feats.numel() == 0:
        return
    bad = (~torch.isfinite(feats)).any(1)
    if bool(bad.any()):
        raise SearchError(f"{where}: {int(bad.sum())} of {len(feats)} features hold NaN or Inf; "
                          "the index is damaged (rebuild it)")
    norms = feats.double().norm(dim=1)
    off = (norms - 1).abs() > tol
    if bool(off.any()):
        raise SearchError(f"{where}: {int(off.sum())} of {len(feats)} features are not of unit length (norms "
                          f"{float(norms.min()):.4g} to {float(norms.max()):.4g}); rga.search build writes "
                          "L2-normalized features: the index is damaged or not ours (rebuild it)")


def _state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a model's state_dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(fm: FeatureExtractor, feature_dim: int) -> dict:
    """What an index records of the model that built it (see :func:`check_fingerprint`): kind,
    architecture, input size, feature size and a SHA-256 of the weights (PyTorch models) or of
    the exported file."""
    if fm.model is not None:
        net = fm.model
        arch = f"{getattr(net, 'variant', type(net).__name__)}/{getattr(net, 'arch', '?')}"
        digest = _state_dict_sha256(net)
    else:
        meta = fm.meta or {}
        arch, digest = f"{meta.get('variant')}/{meta.get('backbone')}", _file_sha256(fm.source)
    return {"kind": fm.kind, "arch": arch, "height": fm.height, "width": fm.width, "feature_dim": int(feature_dim),
            "weights_sha256": digest}


def check_fingerprint(index: "GalleryIndex", model: FeatureExtractor, index_path="the index") -> None:
    """SearchError unless `model` is the model that built `index` (same kind, architecture, input
    size and weights): features of another model live in another space, and ranking them against
    the index would give confident nonsense."""
    want = index.meta.get("fingerprint")
    if not isinstance(want, dict):
        raise SearchError(f"{index_path} records no model fingerprint; rebuild it with rga.search build")
    have = model_fingerprint(model, index.features.shape[1])
    differ = [f"{k} {want.get(k)!r} vs {have[k]!r}" for k in ("kind", "arch", "height", "width")
              if want.get(k) != have[k]]
    if not differ and want.get("weights_sha256") != have["weights_sha256"]:
        differ.append(f"weights sha256 {str(want.get('weights_sha256'))[:12]}... vs {have['weights_sha256'][:12]}...")
    if differ:
        raise SearchError(f"--model {model.source} is not the model that built {index_path} "
                          f"({index.meta.get('model', '?')}): {'; '.join(differ)}. Query with that model, or "
                          "rebuild the index with this one")


def resolve_backend(backend: str, size: int) -> str:
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"backend must be one of {SEARCH_BACKENDS}, got {backend!r}")
    if backend == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError as e:
            raise SearchError("--backend faiss needs faiss: pip install faiss-cpu (or 'rga-kernels[faiss]')") from e
        return "faiss"
    if backend == "auto" and size >= FAISS_AUTO_MIN:
        try:
            import faiss  # noqa: F401

            return "faiss"
        except ImportError:
            pass
    return "torch"


def search(gallery: torch.Tensor, queries: torch.Tensor, top: int = 10, backend: str = "auto",
           chunk: int = 1024):
    """Exact inner-product top-k of ``queries`` (Q, D) against ``gallery`` (N, D)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive int, got {top!r}")
    if gallery.dim() != 2 or queries.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} do not match the gallery {tuple(gallery.shape)}: "
                         "both must be (rows, D) with the same D (features of the same model)")
    if gallery.shape[0] == 0:
        raise SearchError("the gallery index is empty")
    k = min(top, gallery.shape[0])
    gallery, queries = gallery.float().contiguous(), queries.float().contiguous()
    if resolve_backend(backend, gallery.shape[0]) == "faiss":
        import faiss

        index = faiss.IndexFlatIP(gallery.shape[1])
        index.add(gallery.numpy())
        sims, idx = index.search(queries.numpy(), k)
        return torch.from_numpy(sims), torch.from_numpy(idx.astype(np.int64))
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        s, i = torch.topk(queries[start:start + chunk] @ gallery.T, k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def build_index(model, gallery_dir, *, batch_size: int = 64, device=None, progress: bool = False,
                trust_pickles: bool = False) -> GalleryIndex:
    """Features of every image under ``gallery_dir`` with ``model`` (a run folder, checkpoint,
    exported file or a :class:`rga.FeatureExtractor`)."""
    fm = model if isinstance(model, FeatureExtractor) else FeatureExtractor(model, device=device,
                                                                             trust_pickles=trust_pickles)
    paths = list_images(gallery_dir)
    if not paths:
        raise SearchError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {gallery_dir}")
    t0 = time.perf_counter()
    feats, kept, skipped = fm.extract_files(paths, batch_size=batch_size, progress=progress)
    if not kept:
        raise SearchError(f"none of the {len(paths)} images under {gallery_dir} could be read")
    ids = np.array([parse_name(p) for p in kept], dtype=np.int64).reshape(-1, 2)
    if not bool(torch.isfinite(feats).all()):
        raise SearchError(f"the model {fm.source} gives non-finite features (NaN or Inf): diverged weights?")
    meta = {"model": str(Path(fm.source).resolve()), "model_kind": fm.kind, "height": fm.height, "width": fm.width,
            "fingerprint": model_fingerprint(fm, feats.shape[1]), "normalized": True,
            "gallery_dir": str(Path(gallery_dir).resolve()), "found": len(paths), "skipped": len(skipped),
            "skipped_files": [{"path": p, "reason": r} for p, r in skipped],
            "seconds": round(time.perf_counter() - t0, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return GalleryIndex(feats, [str(Path(p).resolve()) for p in kept], ids[:, 0], ids[:, 1], meta)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

def rank(index: GalleryIndex, model: FeatureExtractor, images, *, top: int = 10, backend: str = "auto",
         cross_camera: bool = False, batch_size: int = 64) -> tuple[list[dict], list]:
    """Ranked results for each readable query image, and the skipped [(path, reason)].

    ``cross_camera``: leave out gallery images of the query's own identity and camera (the
    Market-1501 protocol), for queries whose names carry both."""
    feats, kept, skipped = model.extract_files(list(images), batch_size=batch_size)
    if not kept:
        return [], skipped
    extra = 0
    qids = [parse_name(p) for p in kept]
    everything = np.arange(len(index))
    if cross_camera:  # fetch enough candidates to fill `top` after the removal
        extra = max((int(same_camera_matches(everything, pid, cam, index.pids, index.camids).sum())
                     for pid, cam in set(qids)), default=0)
    sims, idx = index.search(feats, top=top + extra, backend=backend)
    results = []
    for q, (path, (qpid, qcam)) in enumerate(zip(kept, qids)):
        rows = []
        found = [(s, i) for s, i in zip(sims[q].tolist(), idx[q].tolist()) if i >= 0]
        drop = (same_camera_matches([i for _, i in found], qpid, qcam, index.pids, index.camids) if cross_camera
                else np.zeros(len(found), dtype=bool))
        for (s, i), dropped in zip(found, drop):
            if dropped:
                continue
            gpid, gcam = int(index.pids[i]), int(index.camids[i])
            rows.append({"rank": len(rows) + 1, "path": index.paths[i], "similarity": round(float(s), 6),
                         "pid": gpid if gcam >= 0 else None, "camid": gcam if gcam >= 0 else None})
            if len(rows) == top:
                break
        results.append({"query": path, "pid": qpid if qcam >= 0 else None, "camid": qcam if qcam >= 0 else None,
                        "results": rows})
    return results, skipped


def top1_share(results: list[dict]) -> tuple[int, int]:
    """(queries whose best match has their identity, queries with a known identity)."""
    known = [r for r in results if r["pid"] is not None and r["results"]]
    hits = sum(1 for r in known if r["results"][0]["pid"] == r["pid"])
    return hits, len(known)


def plot_results(results: list[dict], out, *, top: int = 10) -> Path:
    """One row per query: the query, then its top matches with their cosine similarity, drawn by
    rga.visualize's ranked-sheet drawer (a green frame for the same identity, red for another, blue
    where the file names carry no identity). Needs Pillow only."""
    from .vis.ranks import rank_sheet

    queries = [(r["query"], r["pid"], None if r.get("camid") is None else r["camid"] + 1) for r in results]
    ranked = [[(hit["path"], hit["pid"], hit["similarity"]) for hit in r["results"][:top]] for r in results]
    return Path(rank_sheet(queries, ranked, out, title=f"top {top} per query", metric="cosine similarity",
                           lower_is_closer=False)["path"])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rga.search", description="Index a gallery of person crops and query it.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="extract gallery features into an index file")
    b.add_argument("model", metavar="MODEL", help="run folder or checkpoint of rga.train, or an exported .onnx / .pt2")
    b.add_argument("gallery", metavar="GALLERY_DIR", help="folder of gallery images (searched recursively)")
    b.add_argument("--index", required=True, metavar="FILE", help="index file to write (.npz)")
    b.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    b.add_argument("--device", help="cpu or cuda (PyTorch models; default: cuda when available)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--trust-pickles", action="store_true",
                   help="load a .pt2 model outside the accepted layout (pickled entries can run code: trusted files only)")
    b.add_argument("--force", action="store_true",
                   help="replace an existing --index that is not an index (a checkpoint, a model, another file)")
    q = sub.add_parser("query", help="rank the gallery for query images")
    q.add_argument("index", metavar="FILE", help="index file written by build")
    q.add_argument("images", metavar="IMAGE", nargs="+", help="query images")
    q.add_argument("--top", type=POSITIVE_INT, default=10, help="results per query (default 10)")
    q.add_argument("--json", action="store_true", help="print the results as JSON")
    q.add_argument("--model", required=True,
                   help="the model that built the index (run folder, checkpoint, .onnx or .pt2); checked against "
                        "the fingerprint the index stores")
    q.add_argument("--trust-pickles", action="store_true",
                   help="load a .pt2 model outside the accepted layout (pickled entries can run code: trusted files only)")
    q.add_argument("--backend", choices=SEARCH_BACKENDS, default="auto",
                   help=f"exact search by torch or faiss.IndexFlatIP (auto: faiss from {FAISS_AUTO_MIN:,} images when installed)")
    q.add_argument("--cross-camera", action="store_true",
                   help="leave out gallery images of the query's own identity and camera (Market-1501 protocol)")
    q.add_argument("--plot", metavar="PNG", help="draw the queries and their top matches (needs matplotlib)")
    q.add_argument("--device", help="cpu or cuda (PyTorch models)")
    return p


def _cmd_build(args) -> int:
    from .runfolder import check_output_file

    check_output_file(args.index, "index", force=args.force)  # before extracting any feature
    index = build_index(args.model, args.gallery, batch_size=args.batch_size, device=args.device,
                        progress=not args.no_progress and sys.stderr.isatty(), trust_pickles=args.trust_pickles)
    path = index.save(args.index)
    m = index.meta
    print(f"indexed {len(index)} of {m['found']} images ({m['skipped']} unreadable, skipped) from {args.gallery} "
          f"in {m['seconds']:.1f} s: {index.features.shape[1]}-d features, "
          f"{int(np.sum(index.pids >= 0))} with identities in their names; wrote {path}")
    return 0


def _cmd_query(args) -> int:
    index = GalleryIndex.load(args.index)
    model = FeatureExtractor(args.model, device=args.device, trust_pickles=args.trust_pickles)
    check_fingerprint(index, model, args.index)
    results, skipped = rank(index, model, args.images, top=args.top, backend=args.backend,
                            cross_camera=args.cross_camera)
    if skipped:
        print(f"{len(skipped)} of {len(args.images)} query images unreadable, skipped", file=sys.stderr)
    if not results:
        raise SearchError("no readable query image")
    hits, known = top1_share(results)
    if args.json:
        print(json.dumps({"index": str(args.index), "top": args.top, "queries": results,
                          "skipped": [{"path": p, "reason": r} for p, r in skipped],
                          "top1_same_identity": {"hits": hits, "queries_with_identity": known}}, indent=1))
    else:
        for r in results:
            ident = f"  (id {r['pid']}, camera {r['camid'] + 1})" if r["pid"] is not None else ""
            print(f"query {r['query']}{ident}")
            for hit in r["results"]:
                tag = f"  id {hit['pid']}, camera {hit['camid'] + 1}" if hit["pid"] is not None else ""
                print(f"  {hit['rank']:>3}  {hit['similarity']:+.4f}  {hit['path']}{tag}")
        if known:
            print(f"top-1 same identity: {hits}/{known} = {hits / known:.1%} of the queries with an identity in their name")
    if args.plot:
        print(f"wrote {plot_results(results, args.plot, top=args.top)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("rga.search", _cmd_build if args.command == "build" else _cmd_query, args,
                   user_errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
