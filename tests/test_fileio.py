"""rga.fileio: the one atomic writer (the old file survives a failed write, the error names the file
and the reason, no temporary file is left) and the safe torch loader."""
import errno
import json
import os

import pytest
import torch

from rga.errors import CheckpointError, FileWriteError, ReidError
from rga.fileio import TEMP_PREFIX, atomic_write, load_torch, save_torch, temp_path_for, write_json, write_text
from testkit import read_only_folder


def test_writes_replace_and_leave_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "m.json"
    write_json({"b": 1, "a": [1, 2]}, path)
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1} and path.read_text().endswith("}\n")
    write_text("new\n", path)
    assert path.read_text() == "new\n"
    assert os.listdir(path.parent) == ["m.json"]
    assert temp_path_for(path).name.startswith(TEMP_PREFIX + "m.json.")


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")

    def boom(f):
        f.write(b"half")
        raise ValueError("not an OS failure")

    with pytest.raises(ValueError, match="not an OS failure"):  # a bug keeps its own exception
        atomic_write(path, boom)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["x.txt"]

    def full(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(FileWriteError, match=r"could not write file .*x\.txt: No space left on device \(ENOSPC\)"):
        atomic_write(path, full)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["x.txt"]


def test_an_unwritable_folder_is_a_user_error_naming_the_file(tmp_path):
    target = os.path.join(read_only_folder(tmp_path), "f.txt")
    with pytest.raises(FileWriteError) as e:
        write_text("x", target)
    assert isinstance(e.value, ReidError) and "f.txt" in str(e.value)


def test_pass_path_writers_and_the_safe_loader(tmp_path):
    path = tmp_path / "t.pth"
    atomic_write(path, lambda tmp: torch.save({"w": torch.ones(2)}, tmp), pass_path=True)
    assert torch.equal(load_torch(path)["w"], torch.ones(2))
    save_torch({"w": torch.zeros(1)}, path)
    assert torch.equal(load_torch(path)["w"], torch.zeros(1))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_torch(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_torch(tmp_path / "text.pth")


# ------------------------------------------------------------------------------
# a JSON lines file grows atomically
# ------------------------------------------------------------------------------

def test_metrics_jsonl_keeps_its_lines_when_a_write_fails(tmp_path, monkeypatch):
    """metrics.jsonl grows by rewriting it atomically (it was appended to in place)."""
    from rga import fileio
    from rga.errors import FileWriteError

    path = tmp_path / "metrics.jsonl"
    fileio.append_line('{"epoch": 1}', path)
    fileio.append_line('{"epoch": 2}\n', path)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", full_disk)
    with pytest.raises(FileWriteError, match=r"could not write JSON lines file .*metrics.jsonl: No space left"):
        fileio.append_line('{"epoch": 3}', path, what="JSON lines file")
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
