"""Checkpoints: atomic writes, finding the latest, the RNG states a resumed run needs, and
``load_model``: the network of any checkpoint we can read, rebuilt from the file alone.

Checkpoint layouts that load_model reads:

* format 2 (rga.train now): ``format_version``, ``config`` (``RunConfig.to_dict()``),
  ``num_classes``, ``model`` (the state_dict), plus the training state (optimizer, ...);
* format 1 (rga.train before the typed config): the same with ``config`` = the flat argparse
  namespace (``arch``, ``backbone``, ``height``, ...) and no ``format_version``;
* the public RGA code's training script: ``{'state_dict', 'epoch', 'best_top1', 'optimizer'}``
  (weights saved from ``nn.DataParallel`` carry a ``module.`` prefix); and a bare state_dict. Their
  architecture is read from the weights (backbone, stages, RGA-S / RGA-C / both, relation /
  original / embedding, number of classes, input size); what the weights cannot say (the order of
  RGA-SC vs RGA-CS, ratios other than 8, a non-2:1 input) comes from ``hints``.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import re
import secrets
from pathlib import Path

from dataclasses import dataclass, replace

import numpy as np
import torch

from .config import ARCH_FIELDS, FORMAT_VERSION, ConfigError, ModelConfig, RunConfig, from_legacy

CKPT_PATTERN = re.compile(r"^checkpoint_ep(\d+)\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours. The message says which and why."""


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_ep{epoch:04d}.pth"


# Every temporary file this package writes starts with this prefix, so a folder's clean-up
# (rga.runfolder.clean_temp_files) can never take a user's own file for one of ours.
TEMP_PREFIX = ".rga-tmp-"


def temp_name_for(path: Path) -> Path:
    """A fresh temporary name next to `path`: `.rga-tmp-PID-RANDOM-NAME` (hidden; the name keeps
    the target's suffix, which some writers read to pick a format)."""
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


def _fsync_folder(folder: Path) -> None:
    try:  # make a rename durable (not possible on every OS / filesystem)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write(path, write, *, what: str = "file", error=None) -> Path:
    """Write `path` atomically: ``write(f)`` fills a temporary file in the target's folder
    (``temp_name_for``), given as a binary file object ``f`` open for writing (a writer that wants
    a path may write to ``f.name``; writing through ``f`` is better: the OS's reason for a failed
    write then reaches the message, where C++ writers give a bare "iostream error"). The file is
    fsynced and renamed over `path` (then the folder is fsynced). A crash at any point leaves the
    old file or the new one, never half of one.

    A failure that has an OSError in its chain (disk full, no permission, a file where a folder
    should be) removes the temporary file, leaves the old `path` as it was and raises `error`
    (default OutputWriteError) "could not write WHAT PATH: REASON"; any other failure removes the
    temporary file and propagates unchanged."""
    from .errors import OutputWriteError, describe_os_error, find_os_error

    path = Path(path)
    tmp = None
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name_for(path)
        f = open(tmp, "xb")  # O_EXCL; 0666 less the umask
        try:
            with f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except Exception as e:  # noqa: BLE001 - an OS failure gets its root cause in the message
        os_err = find_os_error(e)
        if os_err is None:
            raise
        if isinstance(os_err, (FileExistsError, NotADirectoryError)):
            from .runfolder import _file_in_the_way

            blocker = _file_in_the_way(path.parent)
            if blocker is not None:
                raise (error or OutputWriteError)(f"could not write {what} {path}: {blocker} is a file, "
                                                  "not a folder") from e
        reason = describe_os_error(os_err)
        if tmp is not None:
            reason = reason.replace(str(tmp), str(path))
        raise (error or OutputWriteError)(f"could not write {what} {path}: {reason}") from e
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path, text: str, *, what: str = "file", error=None) -> Path:
    """`text` (UTF-8) into `path` through :func:`atomic_write`."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), what=what, error=error)


def atomic_save_figure(fig, path, *, dpi: int = 100, error=None) -> Path:
    """A matplotlib figure into `path` (format from its suffix, PNG without one) through
    :func:`atomic_write`."""
    fmt = Path(path).suffix[1:].lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format=fmt), what="figure", error=error)


def atomic_save(obj, path) -> Path:
    """torch.save through :func:`atomic_write`: the old checkpoint or the new one, never half of one.

    The file gets the usual permissions (0666 less the umask, like any file this process writes).
    A failed write (disk full, file too large, no permission) is a CheckpointError naming the file
    and the operating system's reason; the temporary file is removed."""
    return atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint", error=CheckpointError)


def list_checkpoints(folder) -> list:
    """[(epoch, path)] of checkpoint_epNNNN.pth files in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CKPT_PATTERN.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(folder):
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint file as given, or the newest checkpoint in a run folder."""
    path = Path(path)
    if path.is_dir():
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint_epNNNN.pth in {path}")
        return latest
    return path


def prune_checkpoints(folder, keep: int) -> None:
    """Delete all but the newest `keep` checkpoint_epNNNN.pth files (keep <= 0: keep all)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(folder)[:-keep]:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a checkpoint file (or --resume auto with --output-dir)")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise CheckpointError(f"could not read checkpoint {path}: the file is empty")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        # torch.save writes a zip archive (or, in its legacy format, a pickle starting with 0x80)
        kind = "a text file" if _looks_like_text(head) else "an unknown format"
        raise CheckpointError(f"could not read checkpoint {path}: not a PyTorch checkpoint ({kind}, "
                              f"starting with {head[:16]!r})")
    try:
        # weights_only=True: a checkpoint is tensors and plain values (the RNG states are stored as
        # such, see capture_rng_state), so loading one never runs code from the file.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"could not read checkpoint {path}: refused: {_refusal_reason(e)}") from e
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
        raise CheckpointError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (got {type(state).__name__})")
    return state


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 32 or c in (9, 10, 13) for c in head)


def _refusal_reason(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in our words (torch's own message ends
    with advice to retry with weights_only=False, which would run the code in question)."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL ([\w.<>]+)", text) or re.search(r"GLOBAL ([\w.<>]+)", text)
    what = f"the Python object '{m.group(1)}'" if m else "a Python object other than tensors and plain values"
    return (f"it references {what}, and unpickling it would run code from the file. Checkpoints of this "
            "package hold only tensors and plain values and are read with torch.load(weights_only=True); "
            "a file that needs more is not one of ours (or has been tampered with)")


def extract_model_state(state: dict) -> dict:
    """The model's state_dict from one of our checkpoints (``model``), a public training script's
    (``state_dict``) or a bare state_dict."""
    sd = state.get("model", state.get("state_dict", state))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("checkpoint holds no model state_dict")
    # strip wrappers: DistributedDataParallel ("module.") and torch.compile ("_orig_mod.")
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _numpy_state_to_plain(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_from_plain(state):
    if isinstance(state, dict):
        keys = state["keys"].numpy() if hasattr(state["keys"], "numpy") else np.asarray(state["keys"])
        return (state["name"], keys.astype(np.uint32), state["pos"], state["has_gauss"], state["cached_gaussian"])
    return state  # a legacy tuple


def capture_rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain values (weights_only-safe)."""
    state = {"python": random.getstate(), "numpy": _numpy_state_to_plain(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------------------------
# load_model: the network of a checkpoint, from the file alone
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelCheckpoint:
    """What a checkpoint says about its network (read by read_model_checkpoint)."""
    path: Path | None
    kind: str                 # "rga.train format 2", "rga.train format 1", "public training script", "state_dict"
    model: ModelConfig        # the architecture (and the run's pretrained / fused settings)
    num_classes: int
    state: dict               # the model's state_dict, wrapper prefixes stripped
    epoch: int | None
    config: RunConfig | None  # the whole run's config, for checkpoints of rga.train
    raw: dict                 # everything the file holds


def _public_input_size(hw: int, stage: int, hints: dict):
    """(height, width) whose stage-`stage` feature map has `hw` positions: the hinted size, else
    256x128 (the public code's), else the 2:1 size (a multiple of 16) that fits."""
    from .models import stage_sizes

    def fits(h, w):
        sh, sw = stage_sizes(h, w)[stage - 1]
        return sh * sw == hw

    if "height" in hints or "width" in hints:
        h, w = hints.get("height", 256), hints.get("width", 128)
        if not fits(h, w):
            raise CheckpointError(f"the checkpoint's stage-{stage} attention is for {hw} positions, which a "
                                  f"{h}x{w} input does not give; pass the --height and --width it was trained at")
        return h, w
    for h, w in [(256, 128)] + [(2 * w, w) for w in range(16, 1025, 16)]:
        if fits(h, w):
            return h, w
    raise CheckpointError(f"cannot tell the input size of this checkpoint (stage-{stage} attention for {hw} "
                          "positions); pass the --height and --width it was trained at")


def infer_model_config(state: dict, hints: dict | None = None):
    """(ModelConfig, num_classes) of a ResNet(+RGA) state_dict without a saved config (the public
    training script's files, bare state_dicts). ``hints``: architecture fields the weights do not
    determine (``variant`` for the order of a two-branch model, ratios, height/width)."""
    hints = dict(hints or {})
    if "cls.weight" not in state or "backbone.conv1.weight" not in state:
        raise CheckpointError("not a ResNet + RGA re-id state_dict (no backbone.conv1.weight / cls.weight); "
                              "expected the weights of rga.models.ResNetRGA or of the public RGA code's model")
    num_classes = int(state["cls.weight"].shape[0])
    values = {k: v for k, v in hints.items() if k in ARCH_FIELDS}
    values.setdefault("backbone", "resnet50" if "backbone.layer1.0.conv3.weight" in state else "resnet18")
    stages = tuple(i for i in range(1, 5) if any(k.startswith(f"backbone.rga_att{i}.") for k in state))
    if not stages:
        values.update(variant="baseline")
        values.setdefault("height", 256)
        values.setdefault("width", 128)
        return replace(ModelConfig(), **values), num_classes
    att = f"backbone.rga_att{stages[0]}."
    spatial = any(k.startswith(att) and "_spatial." in k for k in state)
    channel = any(k.startswith(att) and "_channel." in k for k in state)
    if spatial and channel:
        variant = values.get("variant", "rga_sc")  # the order is not in the weights; the public code's is sc
        if variant not in ("rga_sc", "rga_cs", "rga_s_par_c"):
            raise CheckpointError(f"the checkpoint has spatial and channel attention; --model {variant} has not")
    else:
        variant = "rga_s" if spatial else "rga_c"
        if values.get("variant", variant) != variant:
            raise CheckpointError(f"the checkpoint's attention is {variant}, not {values['variant']}")
    branch = "spatial" if spatial else "channel"
    values["variant"] = variant
    values["stages"] = stages
    values["use_relation"] = f"{att}gg_{branch}.0.weight" in state
    values["use_original"] = f"{att}gx_{branch}.0.weight" in state
    if values["use_relation"]:  # without relations there are no theta / phi: the embedding is moot
        values["embedding"] = ("asymmetric" if f"{att}phi_{branch}.0.weight" in state else
                               "symmetric" if f"{att}theta_{branch}.0.weight" in state else "none")
    if spatial and values["use_relation"]:
        hw = int(state[f"{att}gg_spatial.0.weight"].shape[1]) // 2
    elif channel:
        key = next(f"{att}{n}_channel.0.weight" for n in ("gx", "theta", "phi", "gg")
                   if f"{att}{n}_channel.0.weight" in state)
        hw = int(state[key].shape[1]) // (2 if "gg_" in key else 1)
    else:  # spatial attention from the original feature alone: the weights do not depend on H, W
        hw = None
    if hw is None:
        values.setdefault("height", 256)
        values.setdefault("width", 128)
    else:
        values["height"], values["width"] = _public_input_size(hw, stages[0], values)
    hinted = {k: v for k, v in hints.items() if k in ("stages", "use_relation", "use_original", "embedding")}
    differ = [f"{k}={v!r} (the weights have {values[k]!r})" for k, v in hinted.items()
              if (tuple(v) if k == "stages" else v) != values[k]]
    if differ:
        raise CheckpointError("the checkpoint's weights contradict " + ", ".join(differ))
    try:
        return replace(ModelConfig(), **values), num_classes
    except TypeError as e:
        raise CheckpointError(f"bad architecture hint: {e}") from None


def read_model_checkpoint(source, *, hints: dict | None = None) -> ModelCheckpoint:
    """Read a checkpoint file, a run folder (its newest checkpoint) or an already-loaded checkpoint
    dict, and say which network it holds. For checkpoints that record their architecture,
    ``hints`` must agree with it (a CheckpointError names the fields that differ)."""
    hints = dict(hints or {})
    if isinstance(source, dict):
        path, raw = None, source
    else:
        path = resolve_checkpoint(source)
        raw = load_checkpoint(path)
    where = str(path) if path is not None else "the checkpoint"
    state = extract_model_state(raw)
    version = raw.get("format_version")
    saved = raw.get("config")
    try:
        if version is not None:
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise CheckpointError(f"{where} has checkpoint format {version!r}; this version of rga reads "
                                      f"formats 1 to {FORMAT_VERSION} (update rga)")
            config, kind = RunConfig.from_dict(saved, f"{where}: config"), f"rga.train format {version}"
        elif isinstance(saved, dict) and saved:
            config, kind = from_legacy(saved), "rga.train format 1"
        else:
            config, kind = None, ("public training script" if "state_dict" in raw else "state_dict")
    except ConfigError as e:
        raise CheckpointError(f"{where}: its saved config cannot be read: {e}") from e
    if config is not None:
        model_cfg = config.model
        num_classes = raw.get("num_classes")
        if num_classes is None:
            raise CheckpointError(f"{where} has a config but no num_classes")
        differ = {k: (getattr(model_cfg, k), v) for k, v in hints.items()
                  if k in ARCH_FIELDS and getattr(model_cfg, k) != v}
        if differ:
            raise CheckpointError(f"{where} holds a {model_cfg.label()} network; "
                                  + ", ".join(f"{k}={v!r} differs from its {k}={old!r}" for k, (old, v) in differ.items())
                                  + ". The architecture comes from the checkpoint: drop these options")
    else:
        model_cfg, num_classes = infer_model_config(state, hints)
    epoch = raw.get("epoch")
    return ModelCheckpoint(path=path, kind=kind, model=model_cfg, num_classes=int(num_classes), state=state,
                           epoch=int(epoch) if isinstance(epoch, (int, float)) else None, config=config, raw=raw)


def load_model(source, *, fused=None, neck_feat: str = "bn", hints: dict | None = None, with_info: bool = False):
    """The network of a checkpoint, rebuilt from the file alone, weights loaded (strict), in eval mode.

    source: a checkpoint file (any layout in this module's docstring), a run folder of rga.train
    (its newest checkpoint), a loaded checkpoint dict, or a ModelCheckpoint.
    fused: the RGA path (True, False or a backend name); default: fused if the run trained fused.
    hints: architecture fields for files that do not record them (see infer_model_config).
    with_info: also return the ModelCheckpoint (path, kind, configs, epoch, raw contents).
    """
    info = source if isinstance(source, ModelCheckpoint) else read_model_checkpoint(source, hints=hints)
    if fused is None:
        fused = bool(info.model.fused)  # a backend named at training time may not exist here: auto
    where = str(info.path) if info.path is not None else "the checkpoint"
    try:
        model = info.model.build(info.num_classes, pretrained=False, neck_feat=neck_feat, fused=fused)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where}: cannot build its network ({info.model.label()}): {e}") from e
    try:
        model.load_state_dict(info.state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{where} ({info.kind}) does not fit the {info.model.label()} / "
                              f"{info.model.backbone} {info.model.height}x{info.model.width} network it "
                              f"describes: {' '.join(first[:3])}") from e
    model.eval()
    return (model, info) if with_info else model
