"""rga.evaluate's user-facing failures on a tiny finished run: the query and gallery are checked, and
the output file probed, before any work; each failure is one `error:` line with exit code 2.
(Its metrics and checkpoint kinds: tests/test_train.py.)"""
from rga import evaluate as reval
from testkit import broken_copy, one_error_line


def test_evaluate_checks_query_and_gallery_first(market_copy, two_epoch_run, tmp_path, capsys):
    root, expected = broken_copy(market_copy, tmp_path, "bad_gallery")
    assert reval.main(["--checkpoint", str(two_epoch_run), "--dataset", "market1501", "--data-root", str(root),
                       "--workers", "0", "--threads", "1", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert expected in one_error_line(captured.err) and "R1" not in captured.out


def test_evaluate_errors_are_one_line_with_exit_2(two_epoch_run, tmp_path, capsys):
    common = ["--workers", "0", "--threads", "1", "--no-progress"]
    (tmp_path / "a_file").write_text("x")
    unwritable = tmp_path / "a_file" / "m.json"
    assert reval.main(["--checkpoint", str(two_epoch_run), "--output", str(unwritable), *common]) == 2
    captured = capsys.readouterr()
    assert f"cannot write {unwritable}: {tmp_path / 'a_file'} is a file, not a folder" in one_error_line(captured.err)
    assert "R1" not in captured.out  # refused before the work, not after printing the metrics
    text = tmp_path / "notes.pth"
    text.write_text("hello, I am not a checkpoint\n")
    assert reval.main(["--checkpoint", str(text), *common]) == 2
    assert "not a PyTorch checkpoint (a text file" in one_error_line(capsys.readouterr().err)
