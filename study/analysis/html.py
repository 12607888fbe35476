"""The claims report as one self-contained HTML file (`study report --format html`).

The same content as the Markdown report (`report.gather`): the verdict per claim with its evidence,
every figure, every table, plus a Runs section (each run's status, final errors and provenance).
Figures are embedded as PNG data URIs and the style sheet is inline, so the file reads offline and
can be mailed or attached as it is. Standard library and pandas only.
"""

from __future__ import annotations

import base64
import html
import re
import time
from typing import TYPE_CHECKING

from .report import FAILS, HOLDS, UNKNOWN, ReportContent, _seeds

if TYPE_CHECKING:
    from .figures import Drawn

DPI = 150  # as figures.save writes the PNGs of the Markdown report
VERDICT_CLASS = {HOLDS: "holds", FAILS: "fails", UNKNOWN: "unknown", "yes": "holds", "no": "fails"}
CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1180px; margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; } h3 { font-size: 1.08em; }
nav a { margin-right: 1em; } .meta { color: #555; }
code { font: 0.92em ui-monospace, Menlo, Consolas, monospace; background: #f2f2f4; padding: 0 .2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #d6d6da; padding: .25em .55em; text-align: left; vertical-align: top; }
th { background: #f5f5f7; }
table.claims td.evidence { font-size: .92em; } table.claims td.seeds { white-space: nowrap; }
.verdict { font-weight: 600; white-space: nowrap; padding: .05em .45em; border-radius: .3em; }
.verdict.holds { background: #dff3e2; color: #11632a; }
.verdict.fails { background: #fbe0df; color: #8e1b14; }
.verdict.unknown { background: #ececef; color: #48484d; }
figure { margin: .5em 0 1.5em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .88em; color: #333; margin-top: .4em; }
.missing { color: #8a5a00; }
.scroll { overflow-x: auto; }
table.runs { font-size: .82em; } table.runs td { white-space: nowrap; }
"""


def _inline(text: str) -> str:
    """Text to HTML: escaped, with `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def figure_png(drawn: "Drawn", *, caption: bool = True) -> bytes:
    """The figure as PNG bytes, as `figures.save` writes it; without the caption under its panels
    where `caption` is false (the page prints it as text)."""
    return drawn.png(DPI, caption=caption)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _claims(content: ReportContent, *, arms: bool = False) -> list[str]:
    """The claims' table, or with `arms` the follow-ups' arms' (their questions, answered yes or no)."""
    kind, column = ("arm", "question") if arms else ("claim", "claim")
    out = ['<table class="claims">',
           f"<thead><tr><th>#</th><th>{column}</th><th>verdict</th><th>seeds</th><th>evidence</th></tr></thead><tbody>"]
    for c in content.arms if arms else content.claims:
        verdict = VERDICT_CLASS.get(c.verdict, "unknown")
        out.append(
            f'<tr class="{kind}" id="{kind}-{c.number}" data-verdict="{html.escape(c.verdict)}">'
            f"<td>{c.number}</td><td>{_inline(c.text)}</td>"
            f'<td><span class="verdict {verdict}">{html.escape(c.verdict)}</span>'
            + (f'<br><span class="significance">{html.escape(c.significance)}</span>' if c.significance else "")
            + "</td>"
            f'<td class="seeds">{_seeds(c.seeds)}</td><td class="evidence">{_inline(c.evidence)}</td></tr>'
        )
    return out + ["</tbody></table>"]


def _figures(content: ReportContent) -> list[str]:
    out = []
    for fig in content.figures:
        out.append(f'<section class="figure" id="fig-{fig.name}">'
                   f"<h3>{html.escape(fig.title)} (<code>study plot {fig.name}</code>)</h3>")
        if fig.drawn is None:
            out.append(f'<p class="missing">Not drawn: {_inline(fig.missing or "")}</p></section>')
            continue
        caption = "<br>\n".join(_inline(line) for line in fig.drawn.caption.splitlines())
        # The caption is the page's text under the image, not drawn in it as well (it was printed twice).
        out.append(f'<figure><img alt="{fig.name}" src="{data_uri(figure_png(fig.drawn, caption=False))}">'
                   f"<figcaption>{caption}</figcaption></figure></section>")
    return out


def _tables(content: ReportContent) -> list[str]:
    out = []
    for tab in content.tables:
        if tab.table is None:
            out.append(f'<p class="missing" id="table-{tab.name}"><b>{tab.name}</b>: not made: {_inline(tab.missing or "")}</p>')
            continue
        t = tab.table
        notes = "".join(f"<li>{_inline(n)}</li>" for n in t.notes)
        out.append(f'<section class="table" id="table-{t.name}"><h3>{_inline(t.title)}</h3><div class="scroll">'
                   f'{t.shown.to_html(index=False, border=0, classes="data")}</div>'
                   + (f"<ul>{notes}</ul>" if notes else "") + "</section>")
    return out


def render(content: ReportContent) -> str:
    """The whole report as one HTML document."""
    from .. import __version__

    written = time.strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>The degradation study: your runs against the paper</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>The degradation study: your runs against the paper</h1>",
        f'<p class="meta">Written {html.escape(written)} by <code>study report</code> (study {html.escape(__version__)}).</p>',
        '<nav><a href="#claims">Claims</a><a href="#figures">Figures</a><a href="#tables">Tables</a>'
        '<a href="#runs">Runs</a></nav>',
        f"<p>{_inline(content.summary)}</p>",
        '<h2 id="claims">Claims</h2>',
    ]
    if content.judged_note:
        parts.append(f"<p>{_inline(content.judged_note)}</p>")
    parts += _claims(content)
    if content.arms:
        parts += ['<h2 id="arms">Beyond the paper: the follow-ups\' arms</h2>',
                  "<p>Each arm against depth and against the paper's net of its kind (<code>docs/followups.md</code>).</p>",
                  *_claims(content, arms=True)]
    parts += ['<h2 id="figures">Figures</h2>', *_figures(content)]
    parts += ['<h2 id="tables">Tables</h2>', *_tables(content)]
    parts += [
        '<h2 id="runs">Runs</h2>',
        f"<p>Every run read from <code>{html.escape(str(content.runs_dir))}</code>: final errors are the last logged "
        "epoch's; provenance as each run recorded it in its <code>config.json</code> "
        "(status updated: <code>status.json</code>).</p>",
        '<div class="scroll">' + content.runs.to_html(index=False, border=0, classes="runs") + "</div>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
