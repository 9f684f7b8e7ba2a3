"""rga.runfolder (lock, stale takeover, leftover temp files, the resume rule), rga.errors (the one
`error:` mapping) and the file-level guarantees of rga.checkpoint.atomic_save."""
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from rga.checkpoint import CheckpointError, atomic_save, load_checkpoint
from testkit import read_only_folder
from rga.errors import RunFolderError, find_os_error, run_cli, user_message
from rga.runfolder import LOCK_NAME, RunFolder, check_output_file, clean_temp_files, resume_checkpoint


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    a = RunFolder(tmp_path / "run").acquire()
    info = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and "command" in info
    with pytest.raises(RunFolderError, match=rf"in use by another run: PID {os.getpid()}"):
        RunFolder(tmp_path / "run").acquire()
    a.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # a clean end leaves no lock file
    with RunFolder(tmp_path / "run") as b:  # free again
        assert b.locked and not b.stale


HOLDER = textwrap.dedent("""
    import fcntl, json, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "command": "holder"}).encode())
    print("locked", flush=True)
    time.sleep(60)
""")


def test_lock_held_by_another_process_then_stale_after_kill(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"PID {proc.pid} .*holder"):
            RunFolder(run).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    # the killed holder left its lock file behind: stale, taken over, and reported
    with RunFolder(run) as f:
        assert f.stale.get("pid") == proc.pid
        assert any(f"PID {proc.pid}" in n and "took over" in n for n in f.notes())
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_leftover_temp_files_are_removed_on_acquire(tmp_path):
    run = tmp_path / "run"
    (run / "metrics").mkdir(parents=True)
    left = [run / ".rga-tmp-checkpoint_ep0003.pth.123-abcd0123.tmp", run / ".rga-tmp-config.json.9-00ff00ff.tmp",
            run / "metrics" / ".rga-tmp-epoch_0002.json.77-12345678.tmp"]
    # a user's own temporary files are never ours to remove (issue 15, case 4)
    keep = [run / "checkpoint_ep0002.pth", run / "notes.tmp", run / ".notes.tmp", run / ".config.json.tmp",
            run / "train.log"]
    for p in left + keep:
        p.write_bytes(b"x" * 10)
    with RunFolder(run) as f:
        assert sorted(f.removed_temp) == sorted(left)
        assert any("leftover temporary" in n for n in f.notes())
    assert not any(p.exists() for p in left) and all(p.exists() for p in keep)
    assert clean_temp_files(run) == []


def test_folder_that_is_a_file_or_not_writable(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(RunFolderError, match="exists and is not a folder"):
        RunFolder(f).acquire()
    with pytest.raises(RunFolderError, match="cannot create run folder .*afile is a file, not a folder"):
        RunFolder(f / "sub").acquire()
    with pytest.raises(RunFolderError, match="is not writable: Permission denied"):
        RunFolder(read_only_folder(tmp_path)).acquire()


def test_resume_rule(tmp_path):
    run = tmp_path / "E"
    run.mkdir()
    assert resume_checkpoint(run, None) is None and resume_checkpoint(run, "auto") is None
    for e in (1, 2, 3):
        (run / f"checkpoint_ep{e:04d}.pth").write_bytes(b"x")
    newest = run / "checkpoint_ep0003.pth"
    assert resume_checkpoint(run, "auto") == newest
    assert resume_checkpoint(run, str(newest)) == newest  # the newest, by path: continues
    with pytest.raises(RunFolderError, match="already holds checkpoints .*--resume auto"):
        resume_checkpoint(run, None)
    # an older one is refused: it would overwrite ep2 and leave ep3 as a stale "latest"
    with pytest.raises(RunFolderError, match=r"newer checkpoints \(checkpoint_ep0002.pth, checkpoint_ep0003.pth\).*"
                                             r"--output-dir NEW_FOLDER --resume"):
        resume_checkpoint(run, str(run / "checkpoint_ep0001.pth"))
    # into a new folder: a branch, allowed; into a folder of another run: refused
    assert resume_checkpoint(tmp_path / "F", str(run / "checkpoint_ep0001.pth")) == run / "checkpoint_ep0001.pth"
    other = tmp_path / "G"
    other.mkdir()
    (other / "checkpoint_ep0005.pth").write_bytes(b"x")
    with pytest.raises(RunFolderError, match="checkpoints of another run"):
        resume_checkpoint(other, str(newest))


def test_check_output_file(tmp_path):
    assert check_output_file(tmp_path / "new" / "m.json") == tmp_path / "new" / "m.json"
    assert list((tmp_path / "new").iterdir()) == []  # the probe is removed
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunFolderError, match="afile is a file, not a folder"):
        check_output_file(tmp_path / "afile" / "sub" / "m.json")
    with pytest.raises(RunFolderError, match="it is a folder"):
        check_output_file(tmp_path)
    with pytest.raises(RunFolderError, match="Permission denied"):
        check_output_file(os.path.join(read_only_folder(tmp_path), "m.json"))


def test_atomic_save_uses_the_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_save({"a": 1}, tmp_path / "c.pth")
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o644


def test_atomic_save_names_the_os_error_and_leaves_no_temp_file(tmp_path):
    """A write that runs out of room (here: RLIMIT_FSIZE, the same path as a full disk)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, old_limit[1]))
    try:
        with pytest.raises(CheckpointError, match=r"could not write checkpoint .*c.pth: File too large \(EFBIG\)"):
            atomic_save({"w": torch.zeros(1_000_000)}, tmp_path / "c.pth")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert list(tmp_path.iterdir()) == []


def test_refused_pickle_says_why(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo never",))

    bad = tmp_path / "bad.pth"
    torch.save({"epoch": 1, "x": Payload()}, bad)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    msg = str(e.value)
    assert "refused" in msg and "would run code" in msg and "system" in msg
    assert "weights_only=False" not in msg and "\n" not in msg


@pytest.mark.parametrize("content,kind", [(b"hello\n", "a text file"), (b"epoch 3\n", "a text file"),
                                          (b"", "the file is empty"), (b"\x00\x01\x02garbage", "unknown format")])
def test_not_a_checkpoint_is_named_as_such(tmp_path, content, kind):
    p = tmp_path / "c.pth"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=kind):
        load_checkpoint(p)


def test_run_cli_mapping(capsys):
    def boom(exc):
        raise exc

    full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    full.__context__ = OSError(28, "No space left on device")
    assert find_os_error(full).errno == 28
    for exc, text in [(RunFolderError("folder in use"), "folder in use"),
                      (PermissionError(13, "Permission denied", "/x/y"), "Permission denied (EACCES): /x/y"),
                      (full, "No space left on device (ENOSPC)"),
                      (FloatingPointError("loss became nan"), "loss became nan"),
                      (OSError("Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most "
                               "recent call last):\n  File x\nrga.data.images.ImageReadError: cannot read image a.jpg"),
                       "rga.data.images.ImageReadError: cannot read image a.jpg")]:
        assert run_cli("prog", boom, exc) == 2
        err = capsys.readouterr().err
        assert err == f"prog: error: {text}\n" if text.endswith("a.jpg") else err.startswith(f"prog: error: {text}")
        assert err.count("\n") == 1
    assert user_message(KeyError("bug")) is None
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_cli("prog", boom, KeyError("bug"))
    assert run_cli("prog", boom, KeyboardInterrupt(), interrupted_hint="resume later") == 130
    assert "interrupted; resume later" in capsys.readouterr().err


def test_start_up_clean_up_leaves_a_users_temporary_files(tmp_path):
    from rga.runfolder import RunFolder

    mine = tmp_path / "mydir"
    mine.mkdir()
    notes = mine / ".notes.tmp"
    notes.write_text("my notes")
    ours = mine / ".rga-tmp-checkpoint_ep0001.pth.4242-0badf00d.tmp"
    ours.write_bytes(b"half a checkpoint")
    with RunFolder(mine) as f:
        assert f.removed_temp == [ours]
    assert notes.read_text() == "my notes" and not ours.exists()
