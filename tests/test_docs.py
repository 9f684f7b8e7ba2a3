"""The README and docs/: short, no dangling file reference or link, the README's tables equal to their sources."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: folders of this repository whose files the docs name in running text (`rga/engine.py`)
TRACKED = ("rga", "rga_kernels", "csrc", "tests", "bench", "docs", "tools", "configs", ".ci")


def anchors(page: Path) -> set:
    """GitHub's heading anchors of a markdown page: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def prose(page: Path) -> str:
    """The page without its fenced code blocks (commands there name run folders, not repository files)."""
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.S)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_every_link_resolves():
    bad = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def test_every_named_file_exists():
    pattern = r"(?<![\w./-])((?:%s)/[\w./-]*\w)(?![\w<{*])" % "|".join(re.escape(t) for t in TRACKED)
    bad = []
    for page in PAGES:
        for name in set(re.findall(pattern, prose(page))):
            if not (ROOT / name).exists():
                bad.append(f"{page.relative_to(ROOT)}: {name}")
    assert not bad, "\n".join(bad)


def test_readme_showcase_table_is_the_one_the_command_wrote():
    """The README's showcase table is the runner's table (docs/figures/showcase/showcase.md), not a copy that drifts."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Does RGA help here?"):]
    table = section[:section.index("\n## ")]
    rows = re.findall(r"^\| (Baseline|RGA-\w+) \| (\d of \d) \| ([\d.]+ ± [\d.]+) \| ([\d.]+ ± [\d.]+) \|$", table, re.M)
    # the finished rows (a row with no finished seed is not shown), each as the runner wrote it
    assert 1 <= len(rows) <= 4 and len(rows) == len(re.findall(r"^\| (Baseline|RGA-\w+) \|", table, re.M)), rows
    source = (ROOT / "docs" / "figures" / "showcase" / "showcase.md").read_text()
    for model, seeds, r1, m_ap in rows:
        assert re.search(rf"^\| \w+ \| {re.escape(model)} \| {seeds} \| {re.escape(r1)} \| {re.escape(m_ap)} \|", source,
                         re.M), f"{model}: README says R1 {r1}, mAP {m_ap} ({seeds}); showcase.md says otherwise"
