"""The import graph of the packages: rga has no import loop (lazy imports inside functions
included), its foundations are leaves, and rga_kernels never imports rga; and no module of either
package is over MAX_LINES lines (a longer one holds more than one job: split it)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: modules that import nothing from rga but each other, in this order (errors imports nothing)
LEAVES = ("rga.errors", "rga.value_parsers", "rga.registry", "rga.fileio", "rga.presets")
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set:
    """The modules of this repository that `path` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from . import config` imports rga.config; `from .cli import X` is cut back to rga.cli
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def graph(package: str) -> dict:
    files = {module_name(p): p for p in (ROOT / package).rglob("*.py")}
    edges = {}
    for name, path in files.items():
        targets = set()
        for mod in imports_of(path):
            while mod and mod not in files:
                mod = mod.rpartition(".")[0]
            if mod and mod != name:
                targets.add(mod)
        edges[name] = targets
    return edges


def find_cycle(edges: dict):
    """One import loop as a list of modules, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            # a package's __init__ importing its own submodules is not a loop back to it
            if n.startswith(m + ".") or m == n:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_rga_has_no_import_loop():
    cycle = find_cycle(graph("rga"))
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_foundations_are_leaves():
    edges = graph("rga")
    for i, leaf in enumerate(LEAVES):
        allowed = set(LEAVES[:i]) | {"rga"}
        assert edges[leaf] <= allowed, f"{leaf} imports {sorted(edges[leaf] - allowed)}"


def test_rga_kernels_never_imports_rga():
    for path in (ROOT / "rga_kernels").rglob("*.py"):
        bad = sorted(m for m in imports_of(path) if m == "rga" or m.startswith("rga."))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_module_is_over_max_lines():
    long = {}
    for package in ("rga", "rga_kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                long[str(path.relative_to(ROOT))] = n
    assert not long, f"over {MAX_LINES} lines: {long}"
