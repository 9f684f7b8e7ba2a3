"""User-facing failures and the one place that turns them into `PROG: error: ...` and exit code 2.

Every exception this package raises for a failure the user can fix is defined here, under one base,
:class:`ReidError`; each keeps the built-in class it always had (ValueError, RuntimeError, OSError,
...) as a second base, so existing ``except`` clauses still catch it. This module imports nothing
from ``rga``: it is a leaf that every layer may import.

The command lines (rga.train, rga.evaluate, rga.export, rga.search, rga.visualize, python -m
rga.data) call :func:`run_cli`. A failure the
user can fix (a bad flag, a missing or unreadable file, a full disk, a folder in use, a diverged
loss) prints one line on stderr that keeps the root cause, and the command exits with code 2.
Anything else is a bug: it keeps its traceback (exit 1). ``RGA_TRACEBACK=1`` in the environment
shows the traceback of the handled failures too. A reader that stops early (``... --list | head``)
ends the command quietly (:func:`closed_pipe`), not with a BrokenPipeError traceback.
"""
from __future__ import annotations

import errno
import os
import sys

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, what a C tool's `... | head` ends with


class ReidError(Exception):
    """Base of this package's user-facing errors: the message says what is wrong and why."""


class UsageError(ReidError, ValueError):
    """A bad flag, flag combination or input: the CLI prints the message and exits with code 2."""


class ConfigError(ReidError, ValueError):
    """A bad key or value in a flag, preset, config file or checkpoint config."""


class CheckpointError(ReidError, RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours. The message says which and why."""


class FileWriteError(ReidError, OSError):
    """A file could not be written (rga.fileio): the message names the file and the OS reason."""


class ExportError(ReidError, RuntimeError):
    """An export or its check failed; the message says which step and why."""


class SearchError(ReidError, RuntimeError):
    """A bad index file, model or input; the message says which and why."""


class ImageReadError(ReidError, OSError):
    """An image could not be read; the message names the file."""


class UnsupportedImageError(ReidError, ValueError):
    """An image decodes but cannot be turned into 8-bit RGB without guessing its scale."""


class DatasetLayoutError(ReidError, FileNotFoundError):
    """A dataset folder or file is missing; the message shows the expected layout."""


class RunFolderError(ReidError):
    """The run folder cannot be used: not a folder, not writable, in use by another run, or a
    resume that would overwrite newer checkpoints."""


class DatasetCheckError(ReidError, ValueError):
    """The dataset cannot be trained or evaluated on: an empty split, unreadable images."""


class DatasetInUseError(ReidError, RuntimeError):
    """A generated dataset would be replaced while a run (or another process) is using it."""


class DatasetChangedError(ReidError, RuntimeError):
    """The data a run trains on changed under it, or since its checkpoint was written."""


class TrainingDivergedError(ReidError, FloatingPointError):
    """Training diverged: the loss became NaN, infinite or exploded, or a weight or batch-norm
    statistic is no longer finite."""


class DegenerateFeaturesError(ReidError, ValueError):
    """Features cannot be ranked: non-finite values, or all of them identical (every distance
    ties), so any number computed from them would be an artefact of the gallery order."""


class NoValidQueryError(ReidError, ValueError):
    """No query has a true match (same identity, another camera) in the gallery: the protocol
    cannot score anything."""


class UntrustedFileError(ReidError):
    """A file would run code when loaded (pickled entries), or does not belong with the model or
    index it is used with."""


def find_os_error(exc: BaseException):
    """The first OSError in `exc` and its chain (__cause__, then __context__), or None.

    torch.save reports a failed write (disk full, file too large) as a RuntimeError ("unexpected
    pos ...") whose context holds the OSError that says why."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def describe_os_error(e: OSError) -> str:
    """'No space left on device (ENOSPC): /path' style text for an OSError."""
    if e.strerror:
        code = errno.errorcode.get(e.errno, "")
        text = f"{e.strerror} ({code})" if code else e.strerror
        if e.filename is not None:
            text += f": {e.filename}"
        if getattr(e, "filename2", None) is not None:
            text += f" -> {e.filename2}"
        return text
    return str(e) or type(e).__name__


def _message(text) -> str:
    """The message as written, except an error re-raised by a DataLoader worker (its text is the
    worker's traceback), which is cut down to its last line: the original exception."""
    text = str(text).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and any(ln.startswith("Original Traceback") for ln in lines):
        return lines[-1]
    return text


def user_message(exc: BaseException, user_errors: tuple = ()):
    """The one-line message for a failure the user can act on, or None for a bug. ``user_errors``:
    more exception types a command treats as the user's (e.g. ValueError for rga.search)."""
    if isinstance(exc, (ReidError,) + tuple(user_errors)):
        return _message(exc.args[0] if exc.args else type(exc).__name__)
    if isinstance(exc, FloatingPointError):  # a diverged loss
        return _message(exc)
    if isinstance(exc, OSError):
        # our own OSError subclasses (ImageReadError, DatasetLayoutError) carry a full message
        if exc.strerror is None and exc.args:
            return _message(exc.args[0])
        return describe_os_error(exc)
    os_err = find_os_error(exc)
    if os_err is not None:  # e.g. torch.save's RuntimeError over a full disk
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"{describe_os_error(os_err)} (while: {first[:200]})"
    return None


def run_cli(prog: str, fn, *args, interrupted_hint: str = "", user_errors: tuple = (), **kwargs) -> int:
    """Call fn(*args, **kwargs); return its int result (0 if it returns none), or print `PROG: error:
    ...` and return 2 for a failure the user can fix (130 on Ctrl-C, 141 when stdout's reader has
    gone: :func:`closed_pipe`). Bugs propagate with their traceback. ``user_errors``: more exception
    types this command reports as the user's."""
    try:
        code = fn(*args, **kwargs)
        sys.stdout.flush()  # a closed pipe shows here at the latest, while it can still be handled
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted" + (f"; {interrupted_hint}" if interrupted_hint else "") + "\n")
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        if isinstance(e, BrokenPipeError) and stdout_closed():
            return closed_pipe()
        msg = user_message(e, user_errors)
        if msg is None or os.environ.get("RGA_TRACEBACK"):
            raise
        # one write with its newline: ranks of a distributed run share stderr, and a separate
        # newline write lets their lines run together
        sys.stderr.write(f"{prog}: error: {msg}\n")
        sys.stderr.flush()
        return EXIT_USAGE
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (a BrokenPipeError from elsewhere, e.g. a
    socket, stays an error). Asked of the descriptor: poll reports POLLERR on such a pipe."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _fd, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no descriptor (a captured stdout), no poll (Windows)
        return False


def closed_pipe() -> int:
    """The reader of stdout went away (``python -m rga.X --list | head -n 2``): stop quietly.

    stdout is pointed at /dev/null, so the interpreter's own flush at exit has nowhere to fail
    (it would print "Exception ignored ... BrokenPipeError"). Returns EXIT_CLOSED_PIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a descriptor
        pass
    return EXIT_CLOSED_PIPE


def install_closed_pipe_hook() -> None:
    """For the ``python -m rga.X`` commands (``rga/__init__.py`` calls this when runpy imports the
    package for one): a BrokenPipeError from a closed stdout that no ``run_cli`` caught, e.g. in a
    listing of ``python -m rga.experiments showcase --list | head -n 2``, ends the process quietly
    with EXIT_CLOSED_PIPE instead of a traceback. Every other exception goes to the previous hook.
    The stack has unwound (every ``finally`` ran) when the hook runs; the exit skips atexit handlers,
    as the SIGPIPE that a C tool dies of would."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, BrokenPipeError) and stdout_closed():
            closed_pipe()
            try:
                sys.stderr.flush()
            finally:
                os._exit(EXIT_CLOSED_PIPE)
        previous(kind, value, tb)

    sys.excepthook = hook
