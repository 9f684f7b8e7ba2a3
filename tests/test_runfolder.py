"""rga.runfolder (lock, stale takeover, leftover temp files, the resume rule, outputs that never
overwrite inputs), alone and through the commands, rga.errors (the one `error:` mapping) and the
file-level guarantees of rga.checkpoint.atomic_save."""
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch

from rga.checkpoint import CheckpointError, atomic_save, load_checkpoint
from testkit import REPO, SUBPROCESS_ENV, one_error_line, read_only_folder, tiny_run_args, train_tiny
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


# ------------------------------------------------------------------------------
# the rules through the commands: one run per folder, the resume rule, outputs over inputs
# ------------------------------------------------------------------------------

def test_second_run_into_a_busy_folder_is_refused_then_a_killed_run_is_taken_over(data_root, tmp_path, capsys):
    out = tmp_path / "D"
    argv = tiny_run_args(data_root, out, "--epochs", "500", dataset="synthetic", pretrained=None)
    first = subprocess.Popen([sys.executable, "-m", "rga.train", *argv],
                             env=SUBPROCESS_ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".rga-run.lock").exists() or not (out / ".rga-run.lock").read_text().strip():
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the first run took no lock in 120 s"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "rga.train", *argv],
                                env=SUBPROCESS_ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        line = one_error_line(second.stderr)
        assert f"{out} is in use by another run: PID {first.pid}" in line and "--output-dir" in line
        assert first.poll() is None  # the first run goes on
        while not list(out.glob("checkpoint_ep*.pth")):
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        first.stderr.close()
    # killed: its lock file stays, as would a half-written checkpoint's temporary file
    leftover = out / ".rga-tmp-checkpoint_ep0099.pth.12345-0000dead.tmp"
    leftover.write_bytes(b"x" * 1000)
    assert (out / ".rga-run.lock").exists()
    capsys.readouterr()
    assert train_tiny(data_root, out, "--epochs", "1", "--resume", "auto") == 0  # nothing left to train
    log = (out / "train.log").read_text()
    assert f"took over the lock of a run that ended without releasing it (PID {first.pid}" in log
    assert "leftover temporary file(s) of an interrupted write" in log and leftover.name in log
    assert not leftover.exists() and not list(out.glob(".rga-tmp-*"))
    assert not (out / ".rga-run.lock").exists()  # released at the end
    assert log.count("took over the lock") == 1 and "in use by another run" not in log


def test_resuming_an_older_checkpoint_is_refused_and_branches_into_a_new_folder(data_root, two_epoch_run, tmp_path,
                                                                                  capsys):
    run2 = two_epoch_run
    before = {p.name: p.read_bytes() for p in run2.glob("checkpoint_ep*.pth")}
    assert sorted(before) == ["checkpoint_ep0001.pth", "checkpoint_ep0002.pth"]
    ep1 = run2 / "checkpoint_ep0001.pth"
    capsys.readouterr()
    assert train_tiny(data_root, run2, "--epochs", "2", "--keep-checkpoints", "1", "--resume", str(ep1)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds newer checkpoints (checkpoint_ep0002.pth)" in line and f"--output-dir NEW_FOLDER --resume {ep1}" in line
    assert {p.name: p.read_bytes() for p in run2.glob("checkpoint_ep*.pth")} == before  # nothing touched
    # the branch: a new folder, resumed from ep1, replays ep2 exactly; the old folder is untouched
    branch = tmp_path / "F"
    assert train_tiny(data_root, branch, "--epochs", "2", "--keep-checkpoints", "1", "--resume", str(ep1)) == 0
    assert sorted(p.name for p in branch.glob("checkpoint_ep*.pth")) == ["checkpoint_ep0002.pth"]
    a = torch.load(branch / "checkpoint_ep0002.pth", weights_only=False)["model"]
    b = torch.load(run2 / "checkpoint_ep0002.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {p.name: p.read_bytes() for p in run2.glob("checkpoint_ep*.pth")} == before
    # the newest, by path, continues in place like --resume auto
    assert train_tiny(data_root, branch, "--epochs", "2", "--resume", str(branch / "checkpoint_ep0002.pth")) == 0


@pytest.mark.parametrize("command", ["export", "search", "evaluate"])
def test_an_output_over_a_checkpoint_is_refused(tiny_checkpoint, gallery, command, capsys):
    from rga.evaluate import main as evaluate_main
    from rga.export import main as export_main
    from rga.search import main as search_main

    ckpt = tiny_checkpoint / "checkpoint_ep0001.pth"
    before = ckpt.read_bytes()
    if command == "export":
        code = export_main([str(tiny_checkpoint), "--format", "exported-program", "--out", str(ckpt), "--no-check"])
    elif command == "search":
        code = search_main(["build", str(tiny_checkpoint), str(gallery), "--index", str(ckpt), "--no-progress"])
    else:
        code = evaluate_main(["--checkpoint", str(tiny_checkpoint), "--output", str(ckpt)])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"refusing to overwrite {ckpt}: it is a checkpoint" in line and "--force" in line, line
    assert ckpt.read_bytes() == before


def test_an_output_of_its_own_kind_is_replaced_and_force_replaces_any(tiny_checkpoint, gallery, tmp_path, capsys):
    from rga.search import main as search_main

    index = tmp_path / "i.npz"
    for _ in range(2):  # an index over an index: no --force needed
        assert search_main(["build", str(tiny_checkpoint), str(gallery), "--index", str(index), "--no-progress"]) == 0
    notes = tmp_path / "notes.npz"
    notes.write_text("mine")
    assert search_main(["build", str(tiny_checkpoint), str(gallery), "--index", str(notes), "--no-progress"]) == 2
    assert "it is a file rga did not write" in capsys.readouterr().err and notes.read_text() == "mine"
    assert search_main(["build", str(tiny_checkpoint), str(gallery), "--index", str(notes), "--no-progress",
                        "--force"]) == 0
    assert zipfile.is_zipfile(notes)


def test_train_keeps_a_users_config_json(data_root, tmp_path, capsys):
    import rga.train as rtrain

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}\n')
    assert rtrain.main(tiny_run_args(data_root, out, "--epochs", "1")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"refusing to overwrite {out / 'config.json'}" in line, line
    assert (out / "config.json").read_text() == '{"my": "settings"}\n'
