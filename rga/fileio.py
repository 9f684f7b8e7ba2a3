"""Every file this package writes, and the safe reading of torch files: one leaf module.

Writing: :func:`atomic_write` writes through a temporary file in the target's folder
(``.rga-tmp-NAME.PID-RANDOM.tmp``: hidden, and marked as ours by :data:`TEMP_PREFIX`), fsyncs it,
``os.replace``-s it onto the target and fsyncs the folder. A crash at any point leaves either the
old file or the new one, never half of one; on a failure the temporary file is removed, the old
file stays, and the error names the file and the operating system's reason. The wrappers
:func:`write_bytes`, :func:`write_text`, :func:`write_json`, :func:`save_torch` and
:func:`save_figure` cover what the package writes (checkpoints, configs, metrics, indexes, figures).

Reading: :func:`load_torch` is ``torch.load(weights_only=True)`` behind checks that turn every way
a file can be wrong (missing, a folder, empty, text, a pickle that would run code) into one
message. This module imports nothing from ``rga`` but the leaf :mod:`rga.errors`.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import secrets
from pathlib import Path

from .errors import CheckpointError, FileWriteError, describe_os_error, find_os_error

#: the name prefix of this package's temporary files (a leftover one is safe to delete)
TEMP_PREFIX = ".rga-tmp-"
TEMP_SUFFIX = ".tmp"


def temp_path_for(path) -> Path:
    """A fresh temporary name next to `path`: ``.rga-tmp-NAME.PID-RANDOM.tmp``."""
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _fsync_folder(folder: Path) -> None:
    try:  # make the rename itself durable (not possible on every OS / filesystem)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path, write_fn, *, text: bool = False, pass_path: bool = False, what: str = "file",
                 error: type = FileWriteError) -> Path:
    """Write `path` atomically: ``write_fn(f)`` writes into an open temporary file object (binary,
    or text with ``text=True``), or with ``pass_path=True`` ``write_fn(tmp_path)`` writes the
    temporary path itself (for writers that only take a file name). Then fsync, ``os.replace``,
    fsync the folder.

    The file gets the usual permissions (0666 less the umask). A failure whose cause is an OSError
    (disk full, file too large, no permission, a file in the way) raises ``error`` ("could not
    write WHAT PATH: reason"); any other failure propagates as it is. Either way the temporary
    file is gone and an existing `path` is untouched."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            if pass_path:
                os.close(fd)
                write_fn(tmp)
                fd = os.open(tmp, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            else:
                with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as f:
                    write_fn(f)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    except Exception as e:  # noqa: BLE001 - an OS failure gets its root cause in the message
        os_err = find_os_error(e)
        if os_err is None:
            raise
        raise error(f"could not write {what} {path}: {describe_os_error(os_err)}") from e
    _fsync_folder(path.parent)
    return path


def write_bytes(data: bytes, path, **kw) -> Path:
    return atomic_write(path, lambda f: f.write(data), **kw)


def write_text(text: str, path, **kw) -> Path:
    return atomic_write(path, lambda f: f.write(text), text=True, **kw)


def write_json(obj, path, **kw) -> Path:
    """Indented, keys sorted, non-JSON values as str(), one trailing newline."""
    return write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path, **kw)


def append_line(line: str, path, **kw) -> Path:
    """One line more at the end of a text file (metrics.jsonl), by rewriting the whole file
    atomically: a failed or killed write leaves the old lines whole."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    return write_text(old + line.rstrip("\n") + "\n", path, **kw)


def save_torch(obj, path, *, what: str = "checkpoint", error: type = CheckpointError) -> Path:
    """torch.save, atomically (a failed write is ``error`` naming the file and the reason)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), what=what, error=error)


def save_figure(fig, path, **kw) -> Path:
    """A matplotlib figure (closed afterwards) or a PIL image, written atomically in the format of
    the file's suffix; ``kw`` go to ``savefig`` (e.g. dpi)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if hasattr(fig, "savefig"):
        import matplotlib.pyplot as plt

        try:
            return atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kw), what="figure")
        finally:
            plt.close(fig)
    return atomic_write(path, lambda f: fig.save(f, format={"jpg": "JPEG"}.get(fmt, fmt.upper())), what="figure")


# ----------------------------------------------------------------------------------------------
# checkpoint files in a run folder (checkpoint_epNNNN.pth), by name
# ----------------------------------------------------------------------------------------------

CKPT_PATTERN = re.compile(r"^checkpoint_ep(\d+)\.pth$")


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_ep{epoch:04d}.pth"


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


# ----------------------------------------------------------------------------------------------
# safe reading
# ----------------------------------------------------------------------------------------------

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


def load_torch(path, map_location="cpu", *, what: str = "checkpoint", error: type = CheckpointError) -> dict:
    """A dict saved by torch.save, read with ``weights_only=True`` (loading never runs code from
    the file). Every problem is ``error`` with a message naming the file and what is wrong."""
    import torch

    path = Path(path)
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if path.is_dir():
        hint = " (or --resume auto with --output-dir)" if what == "checkpoint" else ""
        raise error(f"{path} is a folder; give a {what} file{hint}")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise error(f"could not read {what} {path}: the file is empty")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        # torch.save writes a zip archive (or, in its legacy format, a pickle starting with 0x80)
        kind = "a text file" if _looks_like_text(head) else "an unknown format"
        raise error(f"could not read {what} {path}: not a PyTorch checkpoint ({kind}, "
                    f"starting with {head[:16]!r})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise error(f"could not read {what} {path}: refused: {_refusal_reason(e)}") from e
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
        raise error(f"could not read {what} {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise error(f"{path} does not hold a {what} dict (got {type(state).__name__})")
    return state


def extract_model_state(state: dict) -> dict:
    """The model's state_dict from one of our checkpoints (``model``), a public training script's
    (``state_dict``) or a bare state_dict (a torchvision file), with the wrapper prefixes of
    DistributedDataParallel (``module.``) and torch.compile (``_orig_mod.``) stripped: the one
    reader of model weights in a checkpoint (rga.checkpoint and rga.models.load_imagenet_weights)."""
    import torch

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
