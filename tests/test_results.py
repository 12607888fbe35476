"""The published evidence in results/: the committed runs say what the README says they say."""

import re
from pathlib import Path

import pytest

import study
from study.analysis.load import RunData
from study.analysis.report import classify_claims
from study.analysis.tables import final_errors

ROOT = Path(__file__).resolve().parents[1]
LAPTOP = ROOT / "results" / "laptop"


def readme_verdicts() -> dict[str, str]:
    """The README's verdict table for the laptop study: {row key: verdict}, between its markers."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- laptop-verdicts -->")[1].split("<!-- /laptop-verdicts -->")[0]
    rows = {}
    for line in block.splitlines():
        m = re.match(r"\|\s*(claim \d|twin)\b[^|]*\|.*\|\s*\*\*(holds|does not hold|cannot be judged)\*\*\s*\|$", line)
        if m:
            rows[m[1]] = m[2]
    return rows


@pytest.mark.skipif(not LAPTOP.is_dir(), reason="results/laptop/ is not in this checkout")
def test_the_laptop_results_give_the_verdicts_the_readme_states():
    metrics = study.load_runs(LAPTOP)
    assert set(metrics["seed"]) >= {0, 1, 2}  # at least 3 seeds of every net
    assert metrics.groupby(["arch", "depth"])["seed"].nunique().min() >= 3
    stated = readme_verdicts()
    assert set(stated) == {"claim 1", "claim 3", "twin"}, stated

    verdicts = {f"claim {c.number}": c.verdict for c in classify_claims(RunData.load(LAPTOP))}
    assert verdicts["claim 1"] == stated["claim 1"]
    assert verdicts["claim 3"] == stated["claim 3"]
    # The fix at equal depth: the deeper ResNet's mean final training error below its plain twin's.
    finals = final_errors(metrics).groupby(["arch", "depth"])["train"].mean()
    deep = int(metrics["depth"].max())
    twin = "holds" if finals[("resnet", deep)] < finals[("plain", deep)] else "does not hold"
    assert twin == stated["twin"]


@pytest.mark.skipif(not LAPTOP.is_dir(), reason="results/laptop/ is not in this checkout")
def test_the_laptop_results_hold_only_small_files():
    """Configs, metrics, gradients, responses, statuses, figures and the report: no checkpoints."""
    allowed = {".json", ".parquet", ".png", ".md"}
    for path in LAPTOP.rglob("*"):
        if path.is_file():
            assert path.suffix in allowed, path
            assert path.stat().st_size < 1_000_000, path
