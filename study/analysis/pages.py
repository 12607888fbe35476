"""The generated blocks of a published study's page (`results/<study>/README.md`): tables written from
the published runs between `<!-- marker -->` and `<!-- /marker -->`, so that a page's numbers are the
runs' and `tests/test_results.py` can hold them to it.

`python -m study.analysis.pages paper-depths results/paper-depths` fills the page of a study of the
paper's pair (plain and ResNet x 20/56, several seeds): its final errors, the paper's claims 1 and 3 as
`study report` judges them, the twin (ResNet-56 against plain-56), and ResNet-56 against ResNet-20 in
training error alone.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..config import ConfigError
from .load import RunData, load_runs
from .report import _significance, _stat, classify_claims, compare
from .tables import final_errors

#: The nets of the paper's pair, as a page names them (`arch` in the runs in backticks).
PAIR_NETS = {"plain": "plain", "resnet": "ResNet"}


def _minus(text: str) -> str:
    """The pages' minus sign for a negative number."""
    return re.sub(r"(?<![\w.])-(?=\d)", "\u2212", text)


def pair_blocks(results: str | Path, marker: str) -> dict[str, list[str]]:
    """The blocks `<marker>-errors`, `<marker>-verdicts` and `<marker>-training` of a study of the
    paper's pair at 20 and 56 layers in `results`: each a list of Markdown table lines."""
    finals = final_errors(load_runs(results))

    def net(arch: str, depth: int):
        return finals[(finals["arch"] == arch) & (finals["depth"] == depth)].set_index("seed")

    if absent := [f"{arch}-{depth}" for arch in PAIR_NETS for depth in (20, 56) if net(arch, depth).empty]:
        raise ConfigError(f"{results} has no finished runs of {', '.join(absent)}; a pair page needs plain and ResNet "
                          "at 20 and 56 layers")

    def means(rows) -> str:
        return " / ".join(f"{rows[s].mean():.2f} ± {rows[s].std():.2f}" for s in ("train", "test"))

    def difference(deep, shallow) -> str:
        return " / ".join(_minus(f"{deep[s].mean() - shallow[s].mean():+.2f}") for s in ("train", "test"))

    errors = ["| net (`arch` in the runs) | 20 layers | 56 layers | 56 minus 20 (means) |", "|---|---|---|---|"]
    for arch, name in PAIR_NETS.items():
        errors.append(f"| {name} (`{arch}`) | {means(net(arch, 20))} | {means(net(arch, 56))} | "
                      f"{difference(net(arch, 56), net(arch, 20))} |")

    def training_row(text: str, deep: tuple[str, int], shallow: tuple[str, int], words: tuple[str, str]) -> str:
        a, b = _stat(net(*deep)["train"]), _stat(net(*shallow)["train"])
        comparison = compare(a, b)
        better = comparison.diff < 0
        names = [f"{PAIR_NETS[arch]}-{depth}" for arch, depth in (deep, shallow)]
        return (f"| {text} | training error {names[0]} {a} vs {names[1]} {b} ({_minus(str(comparison))}) | "
                f"**{words[0] if better else words[1]}** ({_significance([(comparison, False)], better)}) |")

    claims = {c.number: c for c in classify_claims(RunData.load(results))}
    verdicts = ["| the paper's claim (`study report`) | evidence (seeds; mean ± std, %) | verdict |", "|---|---|---|"]
    for number, text in ((1, "plain-56 trains and tests worse than plain-20"),
                         (3, "ResNet-56 trains and tests better than ResNet-20")):
        c = claims[number]
        verdicts.append(f"| claim {number}: {text} | {_minus(c.evidence)} | **{c.verdict}** ({c.significance}) |")
    verdicts.append(training_row("twin: ResNet-56 trains better than plain-56", ("resnet", 56), ("plain", 56),
                                 ("holds", "does not hold")))
    training = [training_row("ResNet-56 trains better than ResNet-20 (training error alone)", ("resnet", 56),
                             ("resnet", 20), ("yes", "no"))]
    return {f"{marker}-errors": errors, f"{marker}-verdicts": verdicts, f"{marker}-training": training}


def fill(page: str | Path, blocks: dict[str, list[str]]) -> list[str]:
    """Write each block between its markers in `page`; return the markers it lacks, in which case the page
    is left as it was."""
    page = Path(page)
    text = page.read_text()
    missing = [m for m in blocks if not re.search(rf"<!-- {m} -->.*?<!-- /{m} -->", text, flags=re.S)]
    if missing:
        return missing
    for marker, rows in blocks.items():
        new = f"<!-- {marker} -->\n" + "\n".join(rows) + f"\n<!-- /{marker} -->"
        text = re.sub(rf"<!-- {marker} -->.*?<!-- /{marker} -->", lambda _: new, text, flags=re.S)
    page.write_text(text)
    return []


def main(argv: list[str]) -> int:
    """Bad input (no runs, no page, markers missing) is one line on stderr and exit code 2, the page unchanged."""
    if len(argv) != 2:
        print("usage: python -m study.analysis.pages MARKER RESULTS_DIR (e.g. paper-depths results/paper-depths)",
              file=sys.stderr)
        return 2
    marker, results = argv
    page = Path(results) / "README.md"
    try:
        if not page.is_file():
            raise ConfigError(f"{page} does not exist; write the page, with its markers, first")
        missing = fill(page, pair_blocks(results, marker))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if missing:
        print(f"error: {page} lacks the markers of: {', '.join(missing)}; add <!-- NAME --> and <!-- /NAME -->",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
