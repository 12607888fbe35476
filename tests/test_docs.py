"""Every relative link in the README, docs/ and the published results' pages points at a file that
exists, and, with an anchor, at a heading of that file (GitHub's slugs)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "results").glob("*/README.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slugs(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens,
    a repeated heading numbered."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings_that_exist(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest):
            broken.append(f"{target}: no heading #{anchor}")
    assert broken == [], broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_fences_open_and_close_on_lines_of_their_own(page):
    """A fence is ``` with at most a language name, alone on its line, and each one opened is closed: a
    closing fence with text after it (```` ``` So the probe ````) is no fence, and the rest of the page
    renders as code."""
    fences = [(n, line) for n, line in enumerate(page.read_text().splitlines(), start=1) if line.lstrip().startswith("```")]
    bad = [f"line {n}: {line.strip()}" for n, line in fences if not re.fullmatch(r"\s*```[\w+-]*\s*", line)]
    assert bad == [], bad
    assert len(fences) % 2 == 0, f"{len(fences)} fences: one is not closed"
