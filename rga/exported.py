"""Reading a file written by rga.export: its metadata, the scan for pickled entries, and running it
(ONNX Runtime; ``torch.export.load``), without the model code of this package.

A ``.pt2`` is accepted by an allow-list, not scanned for what is bad: the archive must have the
layout this torch's ``torch.export.save`` writes (one top folder; the fixed version entries; one
model ``models/model.json``; its weights and constants configs; tensor storages ``weight_N`` /
``tensor_N`` that the configs name, none ``use_pickle``; the sample inputs; our ``extra`` JSON), the
JSON entries must parse to the expected schema (graph nodes ATen / prims / operator / math calls
only, shape expressions of the shape language only, no guard code), and every other entry (an older
layout, pickled or opaque objects, files of any other name) is refused by name unless the caller
trusts the file (``trust_pickles``). Accepted files are then loaded from an in-memory copy without
the sample inputs, so no entry is ever unpickled. Truncated or damaged files are named as such.
"""
from __future__ import annotations

import json
import re
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


# ----------------------------------------------------------------------------------------------
# .pt2: what is accepted (an allow-list), and a load that never unpickles
# ----------------------------------------------------------------------------------------------

#: the fixed entries of the archive layout torch.export.save writes (under one top folder)
PT2_FIXED = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id")
#: the one model's entries: its graph (JSON), its payload configs (JSON), its sample inputs (a torch.save
#: file that is never read: the load below replaces it by nothing), our metadata (JSON)
PT2_MODEL_JSON = "models/model.json"
PT2_CONFIGS = {"data/weights/model_weights_config.json": "weight_",
               "data/constants/model_constants_config.json": "tensor_"}
PT2_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
PT2_EXTRA = f"extra/{METADATA_KEY}.json"
#: graph node targets accepted: ATen / prims operators, Python's arithmetic, comparison and item
#: operators (symbolic shapes), math functions; never operator.call / attrgetter / methodcaller
PT2_TARGET = re.compile(r"^(torch\.ops\.(aten|prims)\.\w+(\.\w+)?|math\.[a-z]\w*|_operator\.(add|sub|mul|truediv|"
                        r"floordiv|mod|pow|neg|pos|abs|getitem|eq|ne|lt|le|gt|ge|and_|or_|not_|invert))$")
#: the names a shape expression (read with sympy.sympify, which evaluates it) may use
PT2_EXPR_NAMES = frozenset(
    "Symbol Integer Rational Float Add Mul Pow Max Min Abs FloorDiv CeilDiv CleanDiv Mod PythonMod "
    "ModularIndexing Where IntTrueDiv FloatTrueDiv TruncToInt And Or Not Eq Ne Lt Le Gt Ge Equality "
    "Unequality StrictLessThan LessThan StrictGreaterThan GreaterThan true false True False oo zoo "
    "positive negative nonnegative nonpositive integer real finite".split())
PT2_EXPR_CHARS = re.compile(r"^[\w\s'+\-*/%(),.<>=!]*$")


def _pt2_refusal(path, entry, why) -> UntrustedFileError:
    return UntrustedFileError(
        f"{path} is not a .pt2 this package accepts: {entry} {why}. Accepted is only the archive layout "
        f"torch {torch.__version__.split('+')[0]} writes, each entry a tensor storage or JSON of the expected "
        "schema (nothing that is unpickled); load the file only if you trust where it came from (--trust-pickles)")


def _check_expr(path, entry, text: str) -> None:
    """A shape expression: sympy.sympify evaluates it, so only names of the shape language and
    symbols (s0, s77, ...) pass; no attribute access, no underscores of Python internals."""
    names = set(re.findall(r"[A-Za-z_]\w*", re.sub(r"\d+\.\d+(e[-+]?\d+)?", "", text)))
    bad = [n for n in names if n not in PT2_EXPR_NAMES and not re.fullmatch(r"[a-z]{1,3}\d+", n)]
    if not PT2_EXPR_CHARS.match(text) or "__" in text or re.search(r"\.(?!\d)", text) or bad:
        raise _pt2_refusal(path, entry, f"holds a shape expression that is not one: {text[:80]!r}")


def _check_graph(path, entry, graph) -> None:
    """The ExportedProgram JSON: an object of torch's schema, no guard code, every node an ATen /
    prims / operator / math call, every shape expression one of the shape language."""
    expected = {"graph_module", "opset_version", "range_constraints", "schema_version", "verifiers"}
    if not isinstance(graph, dict) or not expected <= set(graph):
        raise _pt2_refusal(path, entry, "is not an ExportedProgram (JSON of another schema)")
    if graph.get("guards_code"):
        raise _pt2_refusal(path, entry, "holds guard code")
    for key in graph["range_constraints"] or {}:
        _check_expr(path, entry, key)
    module = graph["graph_module"]
    inner = module.get("graph") if isinstance(module, dict) else None
    nodes = inner.get("nodes") if isinstance(inner, dict) else None
    if not isinstance(nodes, list):
        raise _pt2_refusal(path, entry, "has no graph nodes")
    for node in nodes:
        target = node.get("target") if isinstance(node, dict) else None
        if not isinstance(target, str) or not PT2_TARGET.match(target):
            raise _pt2_refusal(path, entry, f"calls {str(target)[:80]!r}, not an ATen operator")
    stack = [graph]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str":
                    _check_expr(path, entry, str(value))
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _check_payload_config(path, entry, config, prefix: str) -> set:
    """A weights/constants config: every entry a plain tensor storage (``weight_N`` / ``tensor_N``,
    ``use_pickle`` false, with its tensor_meta). Returns the storage names it refers to."""
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise _pt2_refusal(path, entry, "is not a payload config (JSON of another schema)")
    names = set()
    for key, item in config["config"].items():
        name = item.get("path_name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not re.fullmatch(re.escape(prefix) + r"\d+", name):
            raise _pt2_refusal(path, entry, f"stores {key!r} as {str(name)[:60]!r}, not a tensor storage")
        if item.get("use_pickle") is not False or not isinstance(item.get("tensor_meta"), dict):
            raise _pt2_refusal(path, entry, f"stores {key!r} pickled, not as a tensor storage")
        names.add(name)
    return names


def read_pt2_entries(path) -> tuple[dict, str]:
    """The entries of a .pt2 archive, checked against the allow-list (module docstring): ({name
    without the top folder: bytes}, the top folder). Raises UntrustedFileError naming the first
    entry outside it, ExportError for a file that is not a readable archive."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            raw = {info.filename: z.read(info) for info in z.infolist() if not info.is_dir()}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ExportError(f"{path} is not a complete .pt2 archive (truncated or damaged?): {e}") from e
    tops = {name.split("/", 1)[0] for name in raw}
    if len(tops) != 1 or any("/" not in name for name in raw):
        raise _pt2_refusal(path, "the archive", "is not one folder of entries (another or an older layout)")
    top = tops.pop() + "/"
    entries = {name[len(top):]: data for name, data in raw.items()}
    parsed = {}
    for name in (PT2_MODEL_JSON, *PT2_CONFIGS, PT2_EXTRA):
        if name not in entries:
            if name == PT2_EXTRA:
                continue
            raise _pt2_refusal(path, name, "is missing")
        try:
            parsed[name] = json.loads(entries[name])
        except (ValueError, UnicodeDecodeError) as e:
            raise _pt2_refusal(path, name, f"is not JSON ({e})") from e
    _check_graph(path, PT2_MODEL_JSON, parsed[PT2_MODEL_JSON])
    storages = set()
    for name, prefix in PT2_CONFIGS.items():
        folder = name.rsplit("/", 1)[0]
        storages |= {f"{folder}/{n}" for n in _check_payload_config(path, name, parsed[name], prefix)}
    if PT2_EXTRA in parsed and not isinstance(parsed[PT2_EXTRA], dict):
        raise _pt2_refusal(path, PT2_EXTRA, "is not a JSON object")
    known = set(PT2_FIXED) | {PT2_MODEL_JSON, PT2_SAMPLE_INPUTS, PT2_EXTRA} | set(PT2_CONFIGS) | storages
    for name in entries:
        if name not in known:
            raise _pt2_refusal(path, name, "is not part of the accepted layout")
    return entries, top


def load_pt2_program(path):
    """``torch.export.load`` of a .pt2 that passed :func:`read_pt2_entries`, from an in-memory copy
    whose sample inputs (the archive's one torch.save file) are left empty: every weight and
    constant is read as a raw tensor storage, nothing is unpickled."""
    import io
    import zipfile

    entries, top = read_pt2_entries(path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(top + name, b"" if name == PT2_SAMPLE_INPUTS else data)
    buffer.seek(0)
    return torch.export.load(buffer)


def check_pt2_safe(path, trust_pickles: bool = False) -> None:
    """Refuse (UntrustedFileError) a .pt2 outside the accepted layout (:func:`read_pt2_entries`),
    unless the caller trusts the file (``--trust-pickles``)."""
    if not trust_pickles:
        read_pt2_entries(path)


def _one_size(dim):
    """A dimension of a model input as an int, or None where it is symbolic (a dynamic batch)."""
    return dim if isinstance(dim, int) and not isinstance(dim, bool) else None


def _fit_to_file(run, shape, path, meta):
    """``run`` for the input shape the file itself takes (N, 3, H, W): an H x W that differs from the
    metadata's is an error naming both; a fixed batch N (an export without --dynamic-batch) is fed
    N images at a time, the last chunk padded by repeating its last image and the padding dropped."""
    shape = list(shape)
    if len(shape) != 4:
        raise ExportError(f"{path} takes inputs of shape {shape}, not (batch, 3, height, width)")
    batch, (height, width) = _one_size(shape[0]), (_one_size(shape[2]), _one_size(shape[3]))
    said = (meta.get("height"), meta.get("width"))
    if (height, width) != said:
        raise ExportError(f"{path} takes {height}x{width} images but its metadata says {said[0]}x{said[1]}: "
                          f"the {path.name}.json beside it does not belong to this model")
    if batch is None:
        return run

    def run_fixed(images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            pad = batch - len(chunk)
            if pad:
                chunk = torch.cat([chunk, chunk[-1:].expand(pad, *chunk.shape[1:])])
            out.append(run(chunk)[:batch - pad])
        return torch.cat(out) if out else run(images)

    return run_fixed


def load_exported(path, *, trust_pickles: bool = False):
    """A callable ``fn(batch: Tensor (N, 3, H, W)) -> Tensor (N, D)`` for an exported file, and its
    metadata. ``.onnx``: ONNX Runtime on the CPU execution provider; otherwise the allow-listed load
    of :func:`load_pt2_program` (``torch.export.load`` itself only with ``trust_pickles``). Any N
    works: a file exported with a fixed batch is run that many images at a time."""
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
        (entry,) = session.get_inputs()[:1]

        def run(batch: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {entry.name: batch.float().numpy()})[0])
        shape = entry.shape
    else:
        try:
            program = torch.export.load(str(path)) if trust_pickles else load_pt2_program(path)
            module = program.module()
        except (UntrustedFileError, ExportError):
            raise
        except Exception as e:  # noqa: BLE001 - a damaged archive
            raise ExportError(f"{path} cannot be loaded by torch.export.load: {first_line(e)}") from e
        user_input = program.graph_signature.user_inputs[0]
        node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_input)
        shape = node.meta["val"].shape

        def run(batch: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(batch.float())
    return _fit_to_file(run, shape, path, meta), meta
