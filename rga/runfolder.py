"""Run folders: one run at a time per folder, leftovers cleaned, and the rule for resuming.

- :class:`RunFolder` holds an exclusive lock on ``OUTPUT/.rga-run.lock`` for the whole run
  (``fcntl.flock``; the file names the holder: PID, host, start time, command). A second run into
  the same folder stops with a RunFolderError naming that PID. The kernel drops the lock when its
  process dies, however it dies, so the lock of a killed run is stale by construction: the next
  run takes it over and says whose it was. Creating the lock file is also the check that the
  folder is a writable folder, before any work is done.
- With the lock held, leftover temporary files of an interrupted atomic write are removed: nobody
  else can be writing them. Only the names rga.fileio gives its temporary files
  (``.rga-tmp-NAME.PID-XXXX.tmp``, :data:`rga.fileio.TEMP_PREFIX`) are touched, never a user's
  file (a ``.notes.tmp`` stays).
- :func:`resume_checkpoint` is the resume rule. A run may write checkpoints into a folder only if
  it continues that folder's newest checkpoint (``--resume auto`` or that file's path), or if the
  folder holds none. Resuming an older checkpoint into the folder is refused (it would overwrite
  the newer epochs and leave a stale "latest"); branch into a new folder instead:
  ``--output-dir NEW --resume OLD_FOLDER/checkpoint_epNNNN.pth``.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import re
import socket
import sys
from pathlib import Path

from .checkpoint import CKPT_PATTERN, list_checkpoints
from .errors import RunFolderError, describe_os_error
from .fileio import TEMP_PREFIX, TEMP_SUFFIX, temp_path_for

LOCK_NAME = ".rga-run.lock"
# temporary files of rga.fileio.atomic_write: .rga-tmp-NAME.PID-RANDOM.tmp, and nothing else
TEMP_PATTERN = re.compile(r"^" + re.escape(TEMP_PREFIX) + r".+\.\d+-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")
TEMP_SUBFOLDERS = ("", "metrics")

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: fall back to the PID check alone
    fcntl = None


def _holder_text(info: dict) -> str:
    if not info:
        return "an unknown process"
    parts = [f"PID {info.get('pid', '?')}"]
    if info.get("host") and info.get("host") != socket.gethostname():
        parts.append(f"on {info['host']}")
    if info.get("started"):
        parts.append(f"started {info['started']}")
    text = " ".join(parts)
    if info.get("command"):
        text += f" ({info['command'][:120]})"
    return text


def _read_info(fd) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        raw += chunk
    try:
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        info = {"pid": "?", "command": raw[:80].decode("utf-8", "replace")}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, TypeError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _file_in_the_way(path: Path):
    """The nearest existing ancestor of `path` (or path itself) when it is not a folder."""
    for p in [path, *path.parents]:
        if p.exists():
            return None if p.is_dir() else p
    return None


def clean_temp_files(folder) -> list:
    """Remove leftover temporary files of interrupted atomic writes in a run folder (and its
    metrics/ folder). Call only while holding the folder's lock. Returns the removed paths."""
    removed = []
    for sub in TEMP_SUBFOLDERS:
        d = Path(folder) / sub if sub else Path(folder)
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if TEMP_PATTERN.match(p.name) and p.is_file() and not p.is_symlink():
                try:
                    p.unlink()
                    removed.append(p)
                except FileNotFoundError:
                    pass
    return removed


class RunFolder:
    """An exclusive lock on a run folder, held from acquire() to release() (or a with block).

    After acquire(): ``stale`` is the holder info of a previous run that died holding the lock
    (empty if none), ``removed_temp`` the leftover temporary files that were deleted."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock_path = self.path / LOCK_NAME
        self._fd = None
        self.stale: dict = {}
        self.removed_temp: list = []

    # ------------------------------------------------------------------ acquire / release
    def _make_folder(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"run folder {self.path} exists and is not a folder; choose another --output-dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            blocker = _file_in_the_way(self.path)
            if blocker is not None:
                raise RunFolderError(f"cannot create run folder {self.path}: {blocker} is a file, not a folder") from e
            raise RunFolderError(f"cannot create run folder {self.path}: {describe_os_error(e)}") from e

    def _open_lock(self) -> int:
        try:
            return os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise RunFolderError(f"run folder {self.path} is not writable: {describe_os_error(e)}") from e

    def acquire(self) -> "RunFolder":
        if self._fd is not None:
            return self
        self._make_folder()
        for _ in range(100):
            fd = self._open_lock()
            try:
                if not self._lock(fd):
                    info = _read_info(fd)
                    raise RunFolderError(f"run folder {self.path} is in use by another run: {_holder_text(info)}; "
                                         "wait for it to end, or choose another --output-dir")
                # the previous holder removes the file when it releases: make sure ours is still it
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        else:  # pragma: no cover - 100 lost races in a row
            raise RunFolderError(f"could not lock run folder {self.path}: the lock file keeps changing")
        self._fd = fd
        try:
            self.stale = _read_info(fd)
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode())
            os.fsync(fd)
            self.removed_temp = clean_temp_files(self.path)
        except OSError as e:
            self.release()
            raise RunFolderError(f"run folder {self.path} is not writable: {describe_os_error(e)}") from e
        return self

    def _lock(self, fd) -> bool:
        """Take the lock without waiting; False if another process holds it."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise RunFolderError(f"could not lock run folder {self.path}: {describe_os_error(e)}") from e
        # no flock here (or on this filesystem): the holder's PID decides
        info = _read_info(fd)
        if info.get("host") == socket.gethostname() and info.get("pid") != os.getpid() and _pid_alive(info.get("pid")):
            return False
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_path)  # while still locked: see the inode check in acquire()
        except OSError:
            pass
        try:
            os.close(self._fd)  # drops the lock
        finally:
            self._fd = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunFolder":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def notes(self) -> list:
        """Lines for the run's log: a taken-over stale lock, removed temporary files."""
        out = []
        if self.stale:
            out.append(f"note: took over the lock of a run that ended without releasing it ({_holder_text(self.stale)})")
        if self.removed_temp:
            out.append(f"note: removed {len(self.removed_temp)} leftover temporary file(s) of an interrupted write: "
                       + ", ".join(p.name for p in self.removed_temp[:5]) + (" ..." if len(self.removed_temp) > 5 else ""))
        return out


def acquire_run_folder(path, rt=None):
    """For rga.train: rank 0 takes the folder's lock; under torchrun every rank learns whether it
    did (so all of them stop with the same error). Returns the RunFolder (None on other ranks)."""
    is_main = rt is None or rt.is_main
    folder, err = None, None
    if is_main:
        try:
            folder = RunFolder(path).acquire()
            try:  # a config.json there that is not a run's (a user's own file) is not replaced
                check_overwrite(Path(path) / "config.json", "config", flag="")
            except RunFolderError:
                folder.release()
                raise
        except RunFolderError as e:
            err = str(e)
    if rt is not None and rt.distributed:
        import torch.distributed as dist

        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise RunFolderError(err)
    return folder


def resume_checkpoint(out_dir, resume):
    """The checkpoint a run into `out_dir` starts from (None: from scratch), by the resume rule.

    resume None: the folder must hold no checkpoint. "auto": its newest (None if none). A path:
    allowed when the folder holds no checkpoint (a new branch in a new folder) or when the path is
    the folder's newest checkpoint; otherwise RunFolderError (never overwrite newer epochs)."""
    found = list_checkpoints(out_dir)
    newest = found[-1][1] if found else None
    if resume == "auto":
        return newest
    if resume is None:
        if newest is not None:
            raise RunFolderError(f"{out_dir} already holds checkpoints (newest: {newest.name}); continue with "
                                 "--resume auto, or choose another --output-dir")
        return None
    path = Path(resume)
    if newest is None:
        return path
    try:
        same = path.exists() and os.path.samefile(path, newest)
    except OSError:
        same = False
    if same:
        return path
    m = CKPT_PATTERN.match(path.name)
    newer = [p.name for e, p in found if m is None or e > int(m.group(1))]
    in_folder = path.parent.exists() and os.path.samefile(path.parent, out_dir)
    why = (f"{out_dir} holds newer checkpoints ({', '.join(newer)}); "
           "resuming an older one here would overwrite them and leave a stale latest checkpoint"
           if in_folder else
           f"{out_dir} already holds checkpoints of another run (newest: {newest.name})")
    raise RunFolderError(f"--resume {path}: {why}. Continue the newest with --resume auto, or branch from "
                         f"{path.name} into a new folder: --output-dir NEW_FOLDER --resume {path}")


def _is_json_object_with(path: Path, keys) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def _is_zip_with(path: Path, names) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            present = set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return all(n in present for n in names)


#: the outputs that may replace an existing file, each recognized as one this package wrote:
#: an export (its FILE.json says its format), an index (its npz entries), metrics (rga.evaluate's keys),
#: a run's config.json (rga.train's keys)
OWN_OUTPUTS = {
    "export": ("an export of rga.export", lambda p: _is_json_object_with(Path(f"{p}.json"), ("format", "input_shape"))),
    "export-metadata": ("export metadata of rga.export", lambda p: _is_json_object_with(p, ("format", "input_shape"))),
    "index": ("an index of rga.search build", lambda p: _is_zip_with(p, ("features.npy", "meta.npy"))),
    "metrics": ("metrics of rga.evaluate", lambda p: _is_json_object_with(p, ("checkpoint", "mAP", "cmc"))),
    "config": ("a config.json of rga.train", lambda p: _is_json_object_with(p, ("model", "data", "optim"))
               or _is_json_object_with(p, ("arch", "backbone", "height"))),  # its sections, or an older flat one
}


def check_overwrite(path, kind: str, *, force: bool = False, flag: str = "--force") -> None:
    """Refuse (RunFolderError) to replace an existing `path` that is not a `kind` output this package
    wrote (:data:`OWN_OUTPUTS`): a checkpoint, a model file, a user's own file. ``force`` allows it."""
    path = Path(path)
    what, ours = OWN_OUTPUTS[kind]
    if force or not path.is_file() or ours(path):
        return
    if CKPT_PATTERN.match(path.name) or path.suffix in (".pth", ".pt", ".tar", ".ckpt"):
        found = "a checkpoint"
    elif path.suffix in (".onnx", ".pt2", ".safetensors"):
        found = "a model file"
    else:
        found = "a file rga did not write"
    hint = f"give another path, or {flag} to replace it" if flag else "move it away or give another folder"
    raise RunFolderError(f"refusing to overwrite {path}: it is {found}, not {what}; {hint}")


def check_output_file(path, kind: str | None = None, *, force: bool = False) -> Path:
    """Make sure a result file can be written at `path` before the work that produces it: creates
    its folder if needed and writes (then removes) a temporary file there. RunFolderError if not.
    With ``kind``, an existing file there must be such an output of this package
    (:func:`check_overwrite`) unless ``force``."""
    path = Path(path)
    if path.is_dir():
        raise RunFolderError(f"cannot write {path}: it is a folder")
    if kind is not None:
        check_overwrite(path, kind, force=force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = temp_path_for(path)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(probe)
    except OSError as e:
        blocker = _file_in_the_way(path.parent)
        if blocker is not None:
            raise RunFolderError(f"cannot write {path}: {blocker} is a file, not a folder") from e
        raise RunFolderError(f"cannot write {path}: {describe_os_error(e)}") from e
    return path
