"""`study report --format html`: one self-contained file with every claim, figure, table and run,
checked as text and, where Debian's `chromium` is installed (`.ci/run` installs it when it can), as
a real browser renders it."""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import study.cli as cli_module
from study.analysis import report as report_module
from study.analysis.load import RunData
from study.analysis.report import ReportContent, ReportFigure, classify_claims, write_report
from study.analysis.tables import build as build_table
from study.config import ConfigError
from test_analysis import FLOORS, write_gradients, write_imagenet_run, write_responses, write_run

FIGURES = ("fig1", "fig4", "fig6", "fig7", "gradients")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URI = "data:image/png;base64,"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Plain/ResNet 20 and 56 on fashion-mnist-mini, 2 seeds (one ResNet-56 unfinished), with
    responses and gradient norms, written by `Run` (so with provenance); and ImageNet plain/ResNet
    18 and 34 as another tool writes them (no provenance): enough for every figure and table."""
    runs = tmp_path_factory.mktemp("runs")
    for (arch, depth), floor in FLOORS.items():
        for seed in range(2):
            unfinished = (arch, depth, seed) == ("resnet", 56, 1)
            run = write_run(runs, arch, depth, seed=seed, floor=(floor[0] + 0.3 * seed, floor[1] + 0.2 * seed),
                            status="running" if unfinished else "done", stop_at=240 if unfinished else None)
            if not unfinished:
                stds = np.linspace(1.5, 1.0, depth - 1) if arch == "plain" else np.linspace(0.8, 0.4, depth - 1)
                write_responses(run, stds)
                write_gradients(run, depth, arch)
    for arch, depth in (("plain", 18), ("plain", 34), ("resnet", 18), ("resnet", 34)):
        write_imagenet_run(runs, arch, depth, floor=(30.0 + depth / 10, 33.0 + depth / 10))
    return runs


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    """`study report --out <dir>/report.html` (html implied by the name): (path, stdout)."""
    out = tmp_path_factory.mktemp("share") / "report.html"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli_module.main(["report", "--runs-dir", str(runs), "--out", str(out)])
    assert code == 0
    return out, stdout.getvalue()


class _Page(HTMLParser):
    """What the tests read from the page: images, claim rows, the runs table's rows, any reference
    to something outside the file."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.claims: list[dict] = []
        self.external: list[str] = []
        self.scripts = 0
        self.rows: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if tag == "script":
            self.scripts += 1
        if tag in ("link", "iframe", "object", "embed") or re.match(r"[a-z]+://", a.get("src", "") or a.get("href", "")):
            self.external.append(f"{tag} {a}")
        if tag == "table":
            self._table = (a.get("class") or "").split()[-1]
            self.rows.setdefault(self._table, [])
        if tag == "tr":
            self._row = []
            if "claim" in (a.get("class") or "").split():
                self.claims.append(a)
        if tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._row is not None and self._table:
            self.rows[self._table].append(self._row)
            self._row = None
        if tag == "table":
            self._table = None


def _page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_html_report_has_every_claim_figure_table_and_run(report, runs):
    path, stdout = report
    assert f"report -> {path}" in stdout and sum(line.startswith("claim ") for line in stdout.splitlines()) == 6
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # nothing beside it: self-contained
    text = path.read_text(encoding="utf-8")
    page = _page(path)
    data = RunData.load(runs)

    claims = classify_claims(data)
    assert [c["id"] for c in page.claims] == [f"claim-{n}" for n in range(1, 7)]
    assert [c["data-verdict"] for c in page.claims] == [c.verdict for c in claims]
    # Each verdict cell says whether the verdict is significant, where it rests on comparisons of means.
    assert any(c.significance for c in claims)
    assert [row[2] for row in page.rows["claims"][1:]] == [c.verdict + c.significance for c in claims]
    for claim in claims:  # the verdict's evidence, whole (its `code` spans as <code>)
        assert re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(claim.evidence)) in text

    assert [img["alt"] for img in page.images] == list(FIGURES)
    for img in page.images:
        assert img["src"].startswith(DATA_URI)
        png = base64.b64decode(img["src"][len(DATA_URI):], validate=True)
        assert png.startswith(PNG_MAGIC)
        with Image.open(io.BytesIO(png)) as im:
            assert im.width > 300 and im.height > 200 and np.asarray(im.convert("L")).std() > 5
    for title in ("Table 2, ImageNet top-1", "Table 3, ImageNet 34-layer", "Table 6, test error"):
        assert title in text
    assert "missing runs:" in text  # the tables' and figures' notes come along
    table6 = build_table("table6", data).shown  # the cells `study table table6` prints, "# params" included
    cells = [list(table6.columns), *table6.astype(str).values.tolist()]
    start = page.rows["data"].index(cells[0])
    assert "# params" in cells[0] and page.rows["data"][start:start + len(cells)] == cells

    header, *rows = page.rows["runs"]
    assert header[:4] == ["run", "study", "status", "iterations"] and "torch" in header and "git commit" in header
    by_run = {row[0]: dict(zip(header, row)) for row in rows}
    assert set(by_run) == set(data.runs["run_id"])
    cifar = by_run["fashion-mnist-mini-resnet56-A-s1-it400"]
    assert cifar["status"] == "running" and cifar["iterations"] == "240 / 400"
    assert cifar["torch"] == json.loads((runs / cifar["run"] / "config.json").read_text())["provenance"]["torch_version"]
    assert re.fullmatch(r"\d+\.\d\d", cifar["test error (%)"])
    # A CPU run names its CPU and the kernels torch ran on it: two CPUs of one model name can differ.
    import torch

    from study.runstore import cpu_label

    prov = json.loads((runs / cifar["run"] / "config.json").read_text())["provenance"]
    assert cifar["device"] == f"cpu: {cpu_label(prov)}" and torch.backends.cpu.get_cpu_capability() in cifar["device"]
    imagenet = by_run["imagenet-resnet34-A-s0"]  # written by another tool: no provenance recorded
    assert imagenet["torch"] == "–" and re.fullmatch(r"\d+\.\d\d", imagenet["validation error (%)"])

    assert page.scripts == 0 and page.external == []  # reads offline, runs nothing


def test_format_follows_out_unless_given(runs, monkeypatch, tmp_path):
    """Default md at figures/report.md; --format html defaults to figures/report.html; an --out
    ending in .html implies html; an explicit --format wins."""
    calls = []
    monkeypatch.setattr(report_module, "write_report", lambda data, out, **kw: calls.append((str(out), kw["format"])) or out)
    monkeypatch.chdir(tmp_path)
    cases = {
        (): ("figures/report.md", "md"),
        ("--format", "html"): ("figures/report.html", "html"),
        ("--out", "r.html"): ("r.html", "html"),
        ("--out", "R.HTM"): ("R.HTM", "html"),
        ("--out", "r.md"): ("r.md", "md"),
        ("--format", "md", "--out", "r.html"): ("r.html", "md"),
        ("--format", "html", "--out", "share/report"): ("share/report", "html"),
        ("--out", "r.markdown"): ("r.markdown", "md"),
        ("--format", "markdown", "--out", "r.txt"): ("r.txt", "md"),  # `study table`'s spelling
        ("--format", "HTML"): ("figures/report.html", "html"),
    }
    for argv, expected in cases.items():
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli_module.main(["report", "--runs-dir", str(runs), *argv]) == 0
        assert calls[-1] == expected, argv


def test_an_out_of_neither_format_is_refused_unless_format_says(runs, monkeypatch, tmp_path, capsys):
    """`--out report.pdf` (or `--out report`) would have been Markdown under another name: refused in one
    line, exit 2, nothing written; with --format the user has said what it is."""
    calls = []
    monkeypatch.setattr(report_module, "write_report", lambda data, out, **kw: calls.append((str(out), kw["format"])) or out)
    monkeypatch.chdir(tmp_path)
    assert cli_module.main(["report", "--runs-dir", str(runs), "--out", "report.pdf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--out report.pdf" in err and "not .pdf" in err and "--format" in err
    assert calls == [] and not (tmp_path / "report.pdf").exists()
    assert cli_module.main(["report", "--runs-dir", str(runs), "--out", "report.pdf", "--format", "html"]) == 0
    assert calls == [("report.pdf", "html")]
    # No extension at all says no more which format it is: refused the same way, and --format says.
    assert cli_module.main(["report", "--runs-dir", str(runs), "--out", "report"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--out report" in err and "has no extension" in err and "--format" in err, err
    assert calls == [("report.pdf", "html")] and not (tmp_path / "report").exists()
    assert cli_module.main(["report", "--runs-dir", str(runs), "--out", "report", "--format", "md"]) == 0
    assert calls[-1] == ("report", "md")


def test_a_failed_write_leaves_the_old_report_and_no_temporary_file(runs, monkeypatch, tmp_path):
    data = RunData.load(runs)
    content = ReportContent(data.runs_dir, "Runs in `x`.", None, classify_claims(data),
                            [ReportFigure("fig1", "Figure 1", missing="no runs")], [], report_module.run_table(data))
    monkeypatch.setattr(report_module, "gather", lambda data, log: content)
    out = tmp_path / "report.html"
    out.write_text("the old report")
    real = Path.write_text

    def half_then_full_disk(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(ConfigError, match="No space left on device"):
        write_report(data, out, format="html")
    monkeypatch.setattr(Path, "write_text", real)
    assert out.read_text() == "the old report" and [p.name for p in tmp_path.iterdir()] == ["report.html"]
    write_report(data, out, format="html", log=lambda line: None)
    assert "claim-6" in out.read_text() and "Not drawn: no runs" in out.read_text()


# --- in a real browser -------------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
# Headless as root in a container, with nothing fetched from the network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]
# Appended to a copy of the report (never to the report itself): what the browser made of it.
PROBE = """<script>
window.addEventListener("load", () => {
  const pre = document.createElement("pre");
  pre.id = "browser-check";
  pre.textContent = JSON.stringify({
    images: [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]),
    claims: [...document.querySelectorAll("tr.claim")].map(r => [r.id, r.querySelector(".verdict").textContent]),
    runs: document.querySelectorAll("table.runs tbody tr").length,
  });
  document.body.appendChild(pre);
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (apt-get install chromium; .ci/run does when it can)")
def test_chromium_renders_every_figure_and_claim(report, runs, tmp_path):
    path, _ = report
    probed = tmp_path / "probed.html"
    probed.write_text(path.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()).stdout
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    assert [i[0] for i in seen["images"]] == list(FIGURES)
    for alt, complete, width, height in seen["images"]:  # decoded: a data URI that failed has no size
        assert complete and width > 300 and height > 200, alt
    verdicts = [c.verdict for c in classify_claims(RunData.load(runs))]
    assert seen["claims"] == [[f"claim-{n}", v] for n, v in enumerate(verdicts, start=1)]
    assert seen["runs"] == len(RunData.load(runs).runs)

    shot = tmp_path / "report.png"
    _chromium(tmp_path, "--window-size=1200,3000", f"--screenshot={shot}", path.as_uri())
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert pixels.shape[:2] == (3000, 1200) and pixels.std() > 20  # not blank
    # The figures' curves are drawn in matplotlib's first colours (blue, orange): they are on screen.
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(pixels - rgb).sum(axis=2) < 40).sum() > 500, rgb


def test_each_caption_is_printed_once(report, runs):
    """The page prints each figure's caption as text under its image, and draws the image without it
    (it was printed twice: in the image and under it); the PNG that `study plot` writes keeps it."""
    from study.analysis.figures import build
    from study.analysis.html import figure_png

    text = report[0].read_text(encoding="utf-8")
    data = RunData.load(runs)
    for name in FIGURES:
        drawn = build(name, data)
        first = drawn.caption.splitlines()[0][:50]
        assert text.count(html.escape(first)) == 1, name
        drawn_text = []
        real_savefig = drawn.figure.savefig
        drawn.figure.savefig = lambda *a, **kw: drawn_text.append(drawn.caption_label.get_text()) or real_savefig(*a, **kw)
        figure_png(drawn, caption=False)
        figure_png(drawn)
        assert drawn_text[0] == "" and first.split()[0] in drawn_text[1], name
        assert drawn.caption_label.get_text() == drawn_text[1]  # put back for the PNG files
