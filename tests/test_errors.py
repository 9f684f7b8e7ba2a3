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


def _pipe_to_head(command: str, lines: int = 2):
    """Run `command | head -n LINES` in bash; (stdout, stderr, the command's exit code)."""
    r = subprocess.run(f"{command} | head -n {lines}; echo \"rc=${{PIPESTATUS[0]}}\"", shell=True,
                       executable="/bin/bash", cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout.splitlines()
    return out[:-1], r.stderr, int(out[-1].removeprefix("rc="))


def test_python_m_commands_end_quietly_without_run_cli():
    """`python -m rga.X` installs a hook (rga/__init__.py): a listing that prints past a closed pipe
    outside run_cli ends quietly too. argv[0] is "-m" while runpy imports the package; simulated here."""
    code = ("import sys; sys.argv[0] = '-m'; import rga; sys.argv[0] = 'x'\n"
            "for i in range(200000):\n    print(f'row {i}')")
    out, err, rc = _pipe_to_head(f'{sys.executable} -c "{code}"')
    assert out == ["row 0", "row 1"] and rc == EXIT_CLOSED_PIPE, (out, rc, err)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    # any other failure keeps its traceback
    r = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = '-m'; import rga; sys.argv[0] = 'x'; 1 / 0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "ZeroDivisionError" in r.stderr and "Traceback" in r.stderr


def test_experiments_listing_into_head_is_quiet(tmp_path):
    """The issue's case: `python -m rga.experiments showcase --list | head -n 2` (ends 0 or 141, never a traceback)."""
    out, err, rc = _pipe_to_head(f"{sys.executable} -m rga.experiments showcase --list --out {tmp_path} "
                                 f"--runs {tmp_path / 'runs'}")
    assert len(out) == 2 and out[0].startswith("baseline-seed0"), out
    assert rc in (0, EXIT_CLOSED_PIPE) and "Traceback" not in err and "BrokenPipe" not in err, (rc, err)
