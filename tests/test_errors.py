"""rga.errors.run_cli: a reader that stops early ends a command quietly; other broken pipes stay errors."""
import subprocess
import sys
from pathlib import Path

from rga.errors import EXIT_CLOSED_PIPE, EXIT_USAGE, run_cli

ROOT = Path(__file__).resolve().parents[1]

# prints far more than a pipe buffer holds, so the writer meets the closed pipe
LISTING = """
import sys
from rga.errors import run_cli

def listing():
    for i in range(200000):
        print(f"row {i}")

sys.exit(run_cli("listing", listing))
"""


def test_closed_pipe_ends_a_listing_quietly():
    r = subprocess.run(f"{sys.executable} -c '{LISTING}' | head -n 2; echo \"rc=${{PIPESTATUS[0]}}\"",
                       shell=True, executable="/bin/bash", cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert lines[:2] == ["row 0", "row 1"], r.stdout
    assert lines[-1] == f"rc={EXIT_CLOSED_PIPE}", r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr and "error" not in r.stderr, r.stderr


def test_a_broken_pipe_elsewhere_is_still_an_error(capsys):
    def fails():
        raise BrokenPipeError(32, "Broken pipe")  # e.g. a socket; stdout itself is fine

    assert run_cli("prog", fails) == EXIT_USAGE
    assert "prog: error: Broken pipe" in capsys.readouterr().err
