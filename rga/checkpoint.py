"""Checkpoints: atomic writes, finding the latest, and the RNG states a resumed run needs."""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

CKPT_PATTERN = re.compile(r"^checkpoint_ep(\d+)\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours. The message says which and why."""


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_ep{epoch:04d}.pth"


def atomic_save(obj, path) -> Path:
    """torch.save to a temp file in the same folder, fsync it, os.replace it onto `path`, fsync the
    folder. A crash at any point leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    try:
        # weights_only=True: a checkpoint is tensors and plain values (the RNG states are stored as
        # such, see capture_rng_state), so loading one never runs code from the file.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not read checkpoint {path}: not a file of tensors and plain values "
                              f"(other Python objects are not loaded: they could run code): {first}") from e
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
        raise CheckpointError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (got {type(state).__name__})")
    return state


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
