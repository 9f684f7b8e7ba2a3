"""Export a trained re-id model for deployment: ONNX or a torch.export ExportedProgram.

    python -m rga.export runs/quick --format onnx --dynamic-batch            # runs/quick/checkpoint_ep0014.onnx
    python -m rga.export runs/quick --format exported-program --out m.pt2 --dynamic-batch

What is exported is the feature extractor, the model ``FeatureExtractor`` runs: the eval-mode
network from preprocessed images (N, 3, H, W) (resized, ToTensor, ImageNet mean/std, as
``rga.transforms.build_test_transform``) to features (N, D), L2-normalized unless
``--no-normalize``. Before tracing, a copy of the model is prepared: every conv + batch norm pair
of the ResNet trunk is folded into one conv, and the RGA modules run their fused path with the
``torch`` backend (the factorized relation embedding in plain matmuls, eval-mode batch norms
folded into the weights), so the file holds only standard ops and runs without this package
(ONNX Runtime; ``torch.export.load``). A checkpoint trained with the reference RGA path exports
the same way: both paths compute the same function of the same parameters.

Next to the file, ``FILE.json`` (also embedded: ONNX ``metadata_props["rga_export"]``,
ExportedProgram extra file ``rga_export.json``) records the input size, mean/std, feature size,
batch mode, the exporter used and the source checkpoint, so a runtime can preprocess without
this package. Reading such a file back (metadata, the .pt2 allow-list, running it) is ``rga.exported``;
its names are importable from here too.

ONNX exporters: ``--exporter auto`` (the default) uses the torch.export-based ("dynamo") exporter,
the default and maintained one since torch 2.9 (the TorchScript exporter is deprecated), and
falls back to the TorchScript exporter only if the dynamo export fails, saying why.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ExportError, find_os_error, run_cli
from .exported import (METADATA_KEY, check_pt2_safe, first_line, load_exported, load_pt2_program,  # noqa: F401
                       onnx_module, read_metadata, read_pt2_entries)
from .fileio import atomic_write, write_text

FORMATS = ("onnx", "exported-program")
SUFFIXES = {"onnx": ".onnx", "exported-program": ".pt2"}
EXPORTERS = ("auto", "dynamo", "torchscript")
METADATA_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "images", "features"
MAX_BATCH = 4096  # upper bound of the dynamic batch dimension (torch.export wants a finite range to reason with)


# ----------------------------------------------------------------------------------------------
# The model to export
# ----------------------------------------------------------------------------------------------

class FeatureModel(nn.Module):
    """Preprocessed images (N, 3, H, W) -> features (N, D), L2-normalized if ``normalize``."""

    def __init__(self, model: nn.Module, normalize: bool = True):
        super().__init__()
        self.model = model
        self.normalize = normalize
        self.height, self.width = int(model.height), int(model.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.model(images)
        return F.normalize(feats, dim=1) if self.normalize else feats


def fold_batch_norms(backbone: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d of a torchvision-named ResNet trunk into the conv before
    it (in place; the BN becomes an Identity). Returns the number of folded pairs."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [("conv1", "bn1")]
    folded = 0
    for parent in [backbone] + [m for m in backbone.modules() if hasattr(m, "conv1") and m is not backbone]:
        names = pairs + [("conv2", "bn2"), ("conv3", "bn3")] if parent is not backbone else pairs
        for conv_name, bn_name in names:
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
                folded += 1
        down = getattr(parent, "downsample", None)
        if (isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[0], nn.Conv2d)
                and type(down[1]) is nn.BatchNorm2d and down[1].track_running_stats):
            parent.downsample = nn.Sequential(fuse_conv_bn_eval(down[0], down[1]), nn.Identity())
            folded += 1
    return folded


def prepare_for_export(model: nn.Module, *, normalize: bool = True, feat: str | None = None) -> FeatureModel:
    """An eval-mode, CPU, float32 copy of ``model`` ready to trace (``model`` is not changed):
    trunk batch norms folded, RGA modules on the fused path with the plain-PyTorch backend."""
    if isinstance(model, FeatureModel):
        return model
    if not isinstance(model, nn.Module) or not hasattr(model, "backbone") or not hasattr(model, "height"):
        raise TypeError(f"expected a model from rga.build_model (or a run folder / checkpoint), got {type(model).__name__}")
    m = copy.deepcopy(model).cpu().float().eval()
    if feat is not None:
        m.neck_feat = feat
    if hasattr(m, "rga_modules") and m.rga_modules():
        m.fused = "torch"  # plain aten ops: the exported file needs no rga_kernels op
    fold_batch_norms(m.backbone)
    # the fused path keeps some BN statistics as views of one shared buffer (for in-place training
    # updates); an exported file wants independent tensors (torch.export.save would store groups)
    for mod in m.modules():
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf._base is not None:
                setattr(mod, name, buf.clone())
    for p in m.parameters():
        p.requires_grad_(False)
    return FeatureModel(m, normalize).eval()


def _example(fm: FeatureModel, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, fm.height, fm.width, generator=torch.Generator().manual_seed(0))


def _dynamic_batch_shapes():
    from torch.export import Dim

    return ({0: Dim("batch", min=1, max=MAX_BATCH)},)


# ----------------------------------------------------------------------------------------------
# Exporters
# ----------------------------------------------------------------------------------------------

def export_program(model: nn.Module, *, dynamic_batch: bool = True, batch_size: int = 1,
                   normalize: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` of the prepared feature model. ``dynamic_batch``: one program for any batch
    size in 1..4096; else the batch is fixed at ``batch_size``."""
    fm = prepare_for_export(model, normalize=normalize)
    # a dynamic batch is traced at 2: torch.export specializes an example size of 1
    example = _example(fm, 2 if dynamic_batch else batch_size)
    try:
        return torch.export.export(fm, (example,), dynamic_shapes=_dynamic_batch_shapes() if dynamic_batch else None)
    except Exception as e:  # noqa: BLE001 - reported with the step that failed
        raise ExportError(f"torch.export of the {'dynamic-batch ' if dynamic_batch else ''}feature model failed: "
                          f"{first_line(e)}") from e


def metadata(fm: FeatureModel, *, fmt: str, dynamic_batch: bool, batch_size: int, exporter: str,
             source: str | None = None, opset: int | None = None) -> dict:
    from .transforms import IMAGENET_MEAN, IMAGENET_STD

    inner = fm.model
    return {
        "rga_export": METADATA_VERSION, "format": fmt, "exporter": exporter, "opset": opset,
        "input": INPUT_NAME, "output": OUTPUT_NAME,
        "input_shape": ["batch" if dynamic_batch else batch_size, 3, fm.height, fm.width],
        "dynamic_batch": dynamic_batch, "height": fm.height, "width": fm.width,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "input_range": "RGB in [0, 1], then (x - mean) / std",
        "feature_dim": int(getattr(inner, "feature_dim", 0)) or None, "normalized": fm.normalize,
        "feat": getattr(inner, "neck_feat", None), "variant": getattr(inner, "variant", None),
        "backbone": getattr(inner, "arch", None), "source": source, "torch": torch.__version__,
    }


def _export_onnx_dynamo(fm, program, path, dynamic_batch, batch_size, opset):
    try:
        import onnxscript  # noqa: F401  - the dynamo exporter's translator
    except ImportError as e:
        raise ExportError("the dynamo ONNX exporter needs onnxscript: pip install onnxscript") from e
    if program is None:
        program = export_program(fm, dynamic_batch=dynamic_batch, batch_size=batch_size)
    example = _example(fm, 2 if dynamic_batch else batch_size)
    kwargs = {} if opset is None else {"opset_version": opset}
    try:
        torch.onnx.export(program, (example,), str(path), dynamo=True, external_data=False, optimize=True,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"the dynamo ONNX exporter failed: {first_line(e)}") from e


def _export_onnx_torchscript(fm, path, dynamic_batch, batch_size, opset):
    example = _example(fm, 2 if dynamic_batch else batch_size)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice and the tracer's shape-check warnings
            torch.onnx.export(fm, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset or 17,
                              do_constant_folding=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"the TorchScript ONNX exporter failed: {first_line(e)}") from e


def _finish_onnx(path: Path, meta: dict, name=None) -> dict:
    """Name the batch dimension, embed the metadata, run onnx.checker and save the model again at
    `path`; returns the metadata. `name`: the file's name in messages (`path` may be a temporary
    file)."""
    onnx = onnx_module()
    proto = onnx.load(str(path))
    tmp, path = path, name or path
    meta["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if meta["dynamic_batch"]:
        old = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
        if not old:
            raise ExportError(f"{path}: the exported ONNX model has a fixed batch "
                              f"({proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value}) though a dynamic one was asked for")
        for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param == old:
                    dim.dim_param = "batch"
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnx.checker rejected {path}: {first_line(e)}") from e
    onnx.save(proto, str(tmp))
    return meta


def export_onnx(model: nn.Module, path, *, dynamic_batch: bool = True, batch_size: int = 1, opset: int | None = None,
                exporter: str = "auto", normalize: bool = True, source: str | None = None,
                program: torch.export.ExportedProgram | None = None) -> dict:
    """Write ``model``'s feature extractor to ``path`` as ONNX; returns the metadata (also written
    to ``path.json`` and embedded). ``program``: an ExportedProgram of the same prepared model
    (from :func:`export_program`) to convert instead of tracing again (dynamo exporter only)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    _check_batch(batch_size)
    if opset is not None and not 7 <= opset <= 30:
        raise ValueError(f"opset must be an ONNX opset number (7..30), got {opset}")
    onnx_module()
    fm = prepare_for_export(model, normalize=normalize)
    path = Path(path)
    out = {}

    def write(tmp):  # the exporters write by path: rga.fileio.atomic_write's temporary file
        used, why = exporter, None
        if exporter in ("auto", "dynamo"):
            try:
                _export_onnx_dynamo(fm, program, tmp, dynamic_batch, batch_size, opset)
                used = "dynamo"
            except ExportError as e:
                if exporter == "dynamo" or find_os_error(e) is not None:
                    raise  # a file-system failure is the path's fault, not the exporter's: no fallback
                why = str(e).replace(str(tmp), str(path))
                warnings.warn(f"{why}; falling back to the TorchScript ONNX exporter", RuntimeWarning, stacklevel=3)
                used = "torchscript"
        if used == "torchscript":
            _export_onnx_torchscript(fm, tmp, dynamic_batch, batch_size, opset)
        meta = metadata(fm, fmt="onnx", dynamic_batch=dynamic_batch, batch_size=batch_size, exporter=used,
                        source=source, opset=opset)
        if why:
            meta["fallback_reason"] = why
        out["meta"] = _finish_onnx(tmp, meta, name=path)

    # the old file stays until the new one is complete and checked
    atomic_write(path, write, pass_path=True, what="ONNX model", error=ExportError)
    _write_sidecar(path, out["meta"])
    return out["meta"]


def save_program(program: torch.export.ExportedProgram, path, meta: dict) -> dict:
    path = Path(path)
    # serialized in memory, then written by Python: a failed write (a full disk) is then an
    # OSError; torch's C++ archive writer, given a file that fails, aborts the process
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
    atomic_write(path, lambda f: f.write(buffer.getbuffer()), what="ExportedProgram", error=ExportError)
    _write_sidecar(path, meta)
    return meta


def export_exported_program(model: nn.Module, path, *, dynamic_batch: bool = True, batch_size: int = 1,
                            normalize: bool = True, source: str | None = None,
                            program: torch.export.ExportedProgram | None = None) -> dict:
    """Write ``model``'s feature extractor to ``path`` with ``torch.export.save``; returns the metadata."""
    _check_batch(batch_size)
    fm = prepare_for_export(model, normalize=normalize)
    if program is None:
        program = export_program(fm, dynamic_batch=dynamic_batch, batch_size=batch_size)
    meta = metadata(fm, fmt="exported-program", dynamic_batch=dynamic_batch, batch_size=batch_size,
                    exporter="torch.export", source=source)
    return save_program(program, path, meta)


def _check_batch(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be an int in 1..{MAX_BATCH}, got {batch_size!r}")


def _write_sidecar(path: Path, meta: dict) -> None:
    write_text(json.dumps(meta, indent=2) + "\n", Path(str(path) + ".json"), what="export metadata", error=ExportError)


def check_exported(path, model: nn.Module, batch_sizes=(1, 7, 32), normalize: bool = True) -> float:
    """Max abs difference between the exported file (in its runtime) and ``model`` on random
    batches of the given sizes."""
    run, meta = load_exported(path)
    if not meta["dynamic_batch"]:
        batch_sizes = [meta["input_shape"][0]]
    fm = FeatureModel(copy.deepcopy(model).cpu().float().eval(), normalize)
    fm.model.neck_feat = meta.get("feat") or "bn"
    worst = 0.0
    for b in batch_sizes:
        x = torch.randn(b, 3, meta["height"], meta["width"], generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            expected = fm(x)
        got = run(x)
        if got.shape != expected.shape:
            raise ExportError(f"{path}: batch {b} gave features {tuple(got.shape)}, expected {tuple(expected.shape)}")
        worst = max(worst, float((got - expected).abs().max()))
    return worst


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def default_output(run, fmt: str) -> Path:
    from .checkpoint import resolve_checkpoint

    ckpt = Path(resolve_checkpoint(run))
    return ckpt.with_suffix(SUFFIXES[fmt])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rga.export",
                                description="Export a trained re-id feature extractor to ONNX or an ExportedProgram.")
    p.add_argument("run", metavar="RUN", help="run folder (its newest checkpoint) or checkpoint file of rga.train")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx or exported-program (.pt2)")
    p.add_argument("--out", metavar="FILE", help="output file (default: the checkpoint's name with .onnx / .pt2)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size 1..4096 (else fixed at --batch-size)")
    p.add_argument("--batch-size", type=int, default=1, help="the fixed batch size without --dynamic-batch (default 1)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="ONNX exporter: auto (dynamo, TorchScript if that fails), dynamo or torchscript")
    p.add_argument("--feat", choices=("bn", "pool"), default="bn", help="feature after the BN neck (bn) or before it")
    p.add_argument("--no-normalize", action="store_true", help="raw features (default: L2-normalized)")
    p.add_argument("--no-check", action="store_true", help="skip running the file against the PyTorch model")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out that is not an export (a checkpoint, a model, another file)")
    return p


def export_command(args) -> None:
    """python -m rga.export: export, describe, check against the PyTorch model."""
    _check_batch(args.batch_size)
    from .checkpoint import load_model
    from .runfolder import check_output_file

    model = load_model(args.run, neck_feat=args.feat)  # in eval mode
    out = Path(args.out) if args.out else default_output(args.run, args.format)
    check_output_file(out, "export", force=args.force)  # a folder, a read-only place, a file in the way or
    check_output_file(f"{out}.json", "export-metadata", force=args.force)  # one not ours: said now
    source = str(Path(args.run))
    t0 = time.perf_counter()
    common = dict(dynamic_batch=args.dynamic_batch, batch_size=args.batch_size, normalize=not args.no_normalize,
                  source=source)
    if args.format == "onnx":
        meta = export_onnx(model, out, opset=args.opset, exporter=args.exporter, **common)
    else:
        if args.opset is not None or args.exporter != "auto":
            raise ValueError("--opset and --exporter apply to --format onnx only")
        meta = export_exported_program(model, out, **common)
    took = time.perf_counter() - t0
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {out}.json in {took:.1f} s: "
          f"{meta['variant']} / {meta['backbone']}, input {meta['input_shape']}, {meta['feature_dim']}-d features"
          f"{', L2-normalized' if meta['normalized'] else ''}; exporter {meta['exporter']}"
          + (f", opset {meta['opset']}" if meta.get("opset") else ""))
    if meta.get("fallback_reason"):
        print(f"note: {meta['fallback_reason']}")
    if not args.no_check:
        err = check_exported(out, model, normalize=not args.no_normalize)
        runtime = "ONNX Runtime (CPU)" if args.format == "onnx" else "torch.export.load"
        print(f"check: {runtime} vs PyTorch, max abs difference {err:.2e} "
              f"(random batches of {'1, 7 and 32' if args.dynamic_batch else args.batch_size})")
        if err > 1e-3:
            raise ExportError(f"the exported model differs from the PyTorch model by {err:.2e}")


def main(argv=None) -> int:
    return run_cli("rga.export", export_command, build_parser().parse_args(argv),
                   user_errors=(ValueError, TypeError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
