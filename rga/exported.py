"""Reading a file written by rga.export: its metadata, the scan for pickled entries, and running it
(ONNX Runtime; ``torch.export.load``), without the model code of this package.

A ``.pt2`` is scanned before ``torch.export.load`` (which unpickles without ``weights_only``):
weights or constants marked ``use_pickle``, or embedded files that ``torch.load(weights_only=True)``
refuses, are refused by name unless the caller trusts the file (``trust_pickles``). Truncated or
damaged files are named as such.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ExportError, UntrustedFileError

METADATA_KEY = "rga_export"


def first_line(e: BaseException, lines: int = 2, limit: int = 400) -> str:
    """The exception's type and first lines (torch.export puts the violated guard on the second)."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines()[:lines] if line.strip())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def onnx_module():
    """The onnx package, or an ExportError that says how to install it."""
    try:
        import onnx
    except ImportError as e:
        raise ExportError("ONNX files need the onnx package: pip install 'rga-kernels[deploy]' "
                          "(onnx, onnxruntime, onnxscript)") from e
    return onnx


def read_metadata(path) -> dict:
    """The export metadata of an exported file: its ``FILE.json``, else the embedded copy."""
    path = Path(path)
    side = Path(str(path) + ".json")
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ExportError(f"{side} is not export metadata (not JSON: {e})") from e
        if not isinstance(meta, dict):
            raise ExportError(f"{side} is not export metadata (a JSON {type(meta).__name__}, not an object)")
        return meta
    if path.suffix == ".onnx":
        try:
            proto = onnx_module().load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise ExportError(f"{path} is not a complete ONNX model (truncated or damaged?): {first_line(e)}") from e
        for entry in proto.metadata_props:
            if entry.key == METADATA_KEY:
                return json.loads(entry.value)
    else:
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                for name in z.namelist():
                    if name.endswith(f"extra/{METADATA_KEY}.json"):
                        return json.loads(z.read(name))
        except zipfile.BadZipFile as e:
            raise ExportError(f"{path} is not a complete .pt2 archive (truncated or damaged?): {e}") from e
    raise ExportError(f"{path} carries no rga export metadata (no {side.name}); was it written by rga.export?")


def find_pickles_in_pt2(path) -> list:
    """The entries of a .pt2 archive that ``torch.export.load`` would unpickle with
    ``weights_only=False`` (running any code they reference): weights or constants marked
    ``use_pickle`` in the archive's payload configs, and every embedded torch.save file (sample
    inputs, legacy weights) that ``torch.load(weights_only=True)`` refuses. rga.export never
    writes either kind. Raises ExportError for a file that is not a readable archive."""
    import io
    import pickle
    import zipfile

    found = []
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith("_config.json") and "/data/" in f"/{name}":
                    try:
                        config = json.loads(z.read(name)).get("config", {})
                    except (ValueError, AttributeError) as e:
                        raise ExportError(f"{path}: {name} is not a payload config ({e})") from e
                    found += [f"{name}: {key}" for key, entry in config.items()
                              if isinstance(entry, dict) and entry.get("use_pickle")]
                elif name.endswith(".pt") or name.endswith(".pkl"):
                    try:
                        torch.load(io.BytesIO(z.read(name)), weights_only=True)
                    except pickle.UnpicklingError:
                        found.append(name)
                    except Exception:  # noqa: BLE001 - unreadable for another reason: still refused
                        found.append(name)
    except zipfile.BadZipFile as e:
        raise ExportError(f"{path} is not a complete .pt2 archive (truncated or damaged?): {e}") from e
    return found


def check_pt2_safe(path, trust_pickles: bool = False) -> None:
    """Refuse (UntrustedFileError) a .pt2 whose loading would unpickle objects, unless the caller
    trusts the file (``--trust-pickles``)."""
    if trust_pickles:
        return
    found = find_pickles_in_pt2(path)
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise UntrustedFileError(f"{path} holds pickled entries ({shown}); torch.export.load would unpickle them "
                                 "without weights_only, which runs any code they reference. rga.export never "
                                 "writes these; load the file only if you trust where it came from "
                                 "(--trust-pickles)")


def load_exported(path, *, trust_pickles: bool = False):
    """A callable ``fn(batch: Tensor (N, 3, H, W)) -> Tensor (N, D)`` for an exported file, and its
    metadata. ``.onnx``: ONNX Runtime on the CPU execution provider; otherwise ``torch.export.load``,
    after :func:`check_pt2_safe` (a .pt2 with pickled entries is refused unless ``trust_pickles``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    meta = read_metadata(path)
    if meta.get("format") == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ExportError("running an ONNX model needs onnxruntime: pip install 'rga-kernels[deploy]'") from e
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - a truncated or damaged file
            raise ExportError(f"{path} cannot be loaded by ONNX Runtime (truncated or damaged?): "
                              f"{first_line(e)}") from e

        def run(batch: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {meta["input"]: batch.float().numpy()})[0])
    else:
        check_pt2_safe(path, trust_pickles)
        try:
            module = torch.export.load(str(path)).module()
        except Exception as e:  # noqa: BLE001 - a damaged archive
            raise ExportError(f"{path} cannot be loaded by torch.export.load: {first_line(e)}") from e

        def run(batch: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(batch.float())
    return run, meta
