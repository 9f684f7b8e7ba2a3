"""Checkpoints: atomic writes, finding the latest, and the RNG states a resumed run needs."""
from __future__ import annotations

import os
import pickle
import random
import re
import secrets
from pathlib import Path

import numpy as np
import torch

CKPT_PATTERN = re.compile(r"^checkpoint_ep(\d+)\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours. The message says which and why."""


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_ep{epoch:04d}.pth"


TMP_SUFFIX = ".tmp"


def temp_name_for(path: Path) -> Path:
    """A fresh temporary name next to `path`: `.NAME.PID-RANDOM.tmp` (hidden; a run folder's
    leftovers of this form are removed at the next start, see rga.runfolder)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def atomic_save(obj, path) -> Path:
    """torch.save to a temp file in the same folder, fsync it, os.replace it onto `path`, fsync the
    folder. A crash at any point leaves either the old file or the new one, never half of one.

    The file gets the usual permissions (0666 less the umask, like any file this process writes).
    A failed write (disk full, file too large, no permission) is a CheckpointError naming the file
    and the operating system's reason; the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name_for(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
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
        from .errors import describe_os_error, find_os_error

        os_err = find_os_error(e)
        if os_err is None:
            raise
        raise CheckpointError(f"could not write checkpoint {path}: {describe_os_error(os_err)}") from e
    try:  # make the rename itself durable (not possible on every OS / filesystem)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


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
    """The model's state_dict from one of our checkpoints or from a bare state_dict."""
    sd = state.get("model", state)
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
