"""Every relative link in the README, docs/ and the published results' pages points at a file that
exists, and, with an anchor, at a heading of that file (GitHub's slugs); every `study` command in their
bash blocks parses."""

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


def documented_commands(page: Path) -> list[tuple[int, list[str]]]:
    """The `study` commands of a page's bash code blocks, indented ones too, as argument lists: continued lines
    joined, comments dropped, each command of a chain (`&&`, `;`, `&`, a pipe) apart, without its redirection
    or its environment (`OMP_NUM_THREADS=1 study run ...`), and `torchrun ... -m study run ...` as `study run ...`."""
    import shlex

    lines, in_bash, pending = [], False, None
    for n, line in enumerate(page.read_text().splitlines(), start=1):
        if line.strip().startswith("```"):
            in_bash = not in_bash and line.strip() in ("```bash", "```sh", "```shell")
            continue
        if not in_bash:
            continue
        text = "" if line.lstrip().startswith("#") else line.split(" #", 1)[0].strip()
        start, joined = pending if pending is not None else (n, "")
        pending = (start, f"{joined} {text.removesuffix(chr(92)).strip()}".strip())
        if not text.endswith("\\"):
            lines.append(pending)
            pending = None
    commands = []
    for n, line in lines:
        segments = [[]]
        for token in shlex.split(line):
            if token in ("&&", "||", ";", "|", "&"):
                segments.append([])
            else:
                segments[-1].append(token)
        for argv in segments:
            argv = argv[:next((i for i, t in enumerate(argv) if t.startswith((">", "2>"))), len(argv))]
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
                argv = argv[1:]
            if argv[:1] != ["study"]:
                module = next((i for i in range(len(argv) - 1) if argv[i:i + 2] == ["-m", "study"]), None)
                argv = argv[module + 1:] if module is not None else []
            if argv:
                commands.append((n, argv))
    return commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_study_command_parses(page):
    """Each `study` command of a page's bash blocks is accepted by the command's own parser, and the grids it
    names exist: a renamed or removed option or grid, or a misspelt one, in the docs fails here (nothing is run)."""
    from study.cli import build_parser
    from study.grids import GRIDS

    parser = build_parser()
    refused = []
    for n, argv in documented_commands(page):
        try:
            args = parser.parse_args(argv[1:])
        except Exception as e:  # the package's parser raises UsageError (one line) where argparse would exit
            refused.append(f"line {n}: {' '.join(argv)}: {e}")
            continue
        if getattr(args, "grid", None) is not None and args.grid not in GRIDS:
            refused.append(f"line {n}: {' '.join(argv)}: no grid {args.grid!r}")
    assert refused == [], refused


def test_the_command_finder_sees_indented_prefixed_continued_and_chained_commands(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("""text\n\n```bash\nstudy grids   # a comment\n```\n\n  ```bash\n  chain() {\n"""
                    """    OMP_NUM_THREADS=1 study run --grid quick --no-wait > a.log 2>&1\n  }\n  ```\n\n"""
                    """```bash\ntorchrun --nproc_per_node 2 \\\n    -m study run --grid degradation\n"""
                    """pip install -e . && study run --grid quick && study report\n```\n\n```python\nstudy grids\n```\n""")
    assert documented_commands(page) == [
        (4, ["study", "grids"]),
        (9, ["study", "run", "--grid", "quick", "--no-wait"]),
        (14, ["study", "run", "--grid", "degradation"]),
        (16, ["study", "run", "--grid", "quick"]), (16, ["study", "report"]),
    ]
