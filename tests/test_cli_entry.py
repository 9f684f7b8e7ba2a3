"""The `python -m rga.X` commands start cleanly: no runpy "found in sys.modules" warning.

runpy imports a module's parent package before it runs the module as ``__main__``; when the
package has already imported the module (``rga/__init__.py`` used to import ``rga.models``), the
module runs a second time and runpy prints a RuntimeWarning that a new user reads as an error.
"""
import os
import re
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout=180):
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    # -W always: show every RuntimeWarning, whatever the caller's warning filters say
    return subprocess.run([sys.executable, "-W", "always::RuntimeWarning", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def documented_commands():
    """Every `python -m NAME` of the README and docs/ whose NAME is one of ours."""
    names = set()
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        names.update(re.findall(r"python -m ((?:rga|rga_kernels)(?:\.\w+)+)", path.read_text()))
    return sorted(names)


def test_models_params_prints_the_table_without_runpy_warning():
    r = _run(["-m", "rga.models", "--params"])
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" not in r.stderr and "found in sys.modules" not in r.stderr, r.stderr
    assert "| model | name | ours (M) | paper Table 3 (M) | delta (M) |" in r.stdout
    assert "| Baseline | `baseline` | 25.05 | 25.1 | -0.05 |" in r.stdout


def test_no_documented_command_is_imported_before_runpy_runs_it():
    """runpy's condition for every documented command: after importing the parent package (what
    runpy does first), the module to run is not in sys.modules yet. One fresh interpreter per
    parent package, so one parent's imports cannot hide or fake another's."""
    commands = documented_commands()
    assert {"rga.models", "rga.train", "rga.visualize", "rga_kernels.info"} <= set(commands), commands
    targets = {}  # parent package -> the modules runpy would run after importing it
    for name in commands:
        spec = importlib.util.find_spec(name)
        assert spec is not None, f"the docs run `python -m {name}`, which does not exist"
        if spec.submodule_search_locations is not None:  # a package runs as NAME.__main__
            targets.setdefault(name, []).append(name + ".__main__")
        else:
            targets.setdefault(name.rpartition(".")[0], []).append(name)
    for parent, mods in sorted(targets.items()):
        code = (f"import sys, {parent}\n"
                f"print([m for m in {mods!r} if m in sys.modules])")
        r = _run(["-c", code])
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == "[]", f"imported by {parent}: {r.stdout}"


def readme_command_lines():
    """(module, subcommand or None) of every `python -m rga…` in the README: the subcommand is the
    bare word after the module (`build`, `ranks`, `showcase`, `table1|table2` gives each)."""
    found = set()
    for mod, rest in re.findall(r"python -m ((?:rga|rga_kernels)(?:\.\w+)+)([^\n`]*)", (ROOT / "README.md").read_text()):
        first = rest.split()[0] if rest.split() else ""
        words = [w for w in first.split("|") if re.fullmatch(r"[a-z][a-z0-9_]*", w)]
        if words:
            found.update((mod, w) for w in words)
        else:
            found.add((mod, None))
    return sorted(found, key=lambda t: (t[0], t[1] or ""))


def test_every_readme_command_answers_help():
    """Each `python -m rga…` line of the README exists as written: `--help` prints its usage, exit 0."""
    commands = readme_command_lines()
    assert ("rga.train", None) in commands and ("rga.search", "query") in commands, commands
    for mod, sub in commands:
        r = _run(["-m", mod] + ([sub] if sub else []) + ["--help"], timeout=300)
        where = f"python -m {mod} {sub or ''} --help"
        assert r.returncode == 0, f"{where}: {r.stderr[-2000:]}"
        if mod.startswith("rga."):
            assert "usage:" in r.stdout, f"{where} printed no usage: {r.stdout[:500]}"
