"""notebooks/explore.ipynb runs top to bottom against a small runs directory, so it cannot rot.

Needs nbformat, nbclient and ipykernel (`pip install nbformat nbclient ipykernel`); skipped without them.
"""

from __future__ import annotations

import ast
import os
import warnings
from pathlib import Path

import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from test_analysis import write_responses, write_run  # noqa: E402  (the generated-runs helpers)

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_explore_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    # Two runs not finished, as `Run.set_status` leaves them: plain-56 s1 still running at 100 of its 200 iterations
    # (its errors there are some 4 points above where it will end) and ResNet-20 s1 diverged at 160.
    # The notebook's finals leave both out and name them, as `study table` does.
    unfinished = {("plain", 56, 1): ("running", 100), ("resnet", 20, 1): ("diverged", 160)}
    left_out = []
    for arch in ("plain", "resnet"):
        for depth in (20, 56):
            for seed in (0, 1):
                status, stop_at = unfinished.get((arch, depth, seed), ("done", None))
                run = write_run(runs, arch, depth, seed=seed, iterations=200, floor=(5.0 + depth / 20, 9.0),
                                status=status, stop_at=stop_at)
                if status != "done":
                    left_out.append(f"{run.cfg.run_id} ({status}, {stop_at}/200 it.)")
                stds = [1.0 + ((7 * i) % 5) / 10 for i in range(depth - 1)]  # not monotone in the layer
                # The plain nets' files carry the BN scales, falling where the std rises (correlation -1);
                # the ResNets' are as probed before the column existed.
                write_responses(run, stds, **({"bn_scale_rms": [3.0 - s for s in stds]} if arch == "plain" else {}))
    # The study's deepest net has one run, still training: the one-run curve shows a finished run's, not its.
    run = write_run(runs, "plain", 110, seed=0, iterations=200, floor=(10.5, 9.0), status="running", stop_at=100)
    left_out.insert(0, f"{run.cfg.run_id} (running, 100/200 it.)")  # (the run table lists it first)
    for seed in (0, 1):  # another study of the same data set and budget: its runs stay out of Figure 6
        run = write_run(runs, "plain", 20, seed=seed, iterations=200, floor=(3.0, 7.0), precision="bf16")
        stds = [1.0 + ((7 * i) % 5) / 10 for i in range(19)]  # γ rising with the std: mixed in, plain-20's -1 would go
        write_responses(run, stds, bn_scale_rms=[2 * s for s in stds])
    # The kernel inherits the environment: the runs to read, and this source tree to import. As
    # `STUDY_RUNS_DIR=runs jupyter execute notebooks/explore.ipynb` typed in the project root: the
    # kernel runs in notebooks/, so `runs` is found as `../runs` (it used to fail: no runs in runs).
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setenv("STUDY_RUNS_DIR", "runs")
    root = str(NOTEBOOK.parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))

    with warnings.catch_warnings():  # the notebook as nbformat wants it (a cell without an id: a warning now, an error later)
        warnings.simplefilter("error")
        nb = nbformat.read(NOTEBOOK, as_version=4)
    # One cell more, at the end, keeps the pivot of final errors that the notebook shows, to compare with Table 6.
    nb.cells.append(nbformat.v4.new_code_cell(f"summary.to_pickle({str(tmp_path / 'summary.pkl')!r})"))
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path / "notebooks")}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    nb.cells.pop()

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert "11 runs" in _text(code[0]) and "from ../runs" in _text(code[0])
    scales = next(c for c in code if "bn_scale_rms" in c.source)
    assert "correlation of response std and γ rms" in _text(scales), _text(scales)
    lines = _text(scales).splitlines()
    table = lines[lines.index(next(line for line in lines if line.split() == ["arch", "depth", "correlation"])) + 1:]
    corr = {tuple(line.split()[:2]): line.split()[2] for line in table if line.split()[:1] in (["plain"], ["resnet"])}
    assert corr == {("plain", "20"): "-1.0", ("plain", "56"): "-1.0"}, corr
    assert "8 runs of the study" in _text(scales) and "variant=''" in _text(scales), _text(scales)
    assert "no bn_scale_rms for resnet-20, resnet-56 (probed before it was recorded)" in _text(scales)
    curve = next(c for c in code if "One run's curve" in c.source)  # a finished run's, its status shown
    rows = [line.split()[1:3] for line in _text(curve).splitlines() if "-it200" in line]
    assert len(rows) == 6 and all(row == ["fashion-mnist-mini-plain56-A-s0-it200", "done"] for row in rows), _text(curve)
    figure6 = next(c for c in code if "relplot" in c.source)
    # Its finished runs: 8 less plain-56 s1 (running) and ResNet-20 s1 (diverged), as `study plot` counts them.
    assert "6 runs of the study" in _text(figure6) and "'variant': ''" in _text(figure6), _text(figure6)
    assert "'iterations': 200," in _text(figure6)  # plain values, not numpy reprs (np.int64(200))
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the seaborn Figure 6 and the package's Figure 1
    assert "| plain-20" in _text(code[-1])  # the package's Table 6
    compared = next(c for c in code if "per_seed" in c.source)
    assert "resnet minus plain at 56 layers, mean over seeds:" in _text(compared)  # (no arm among these runs)
    # One study at a time: the pivot keeps the bf16 runs apart, and the per-seed table is the fp32 study's own
    # final errors (an average with the bf16 runs, or whichever run came last, would differ by about 3 points).
    from study.analysis import load_runs

    df = load_runs(runs)
    bf16 = df[(df.variant == "bf16") & (df.split == "test") & (df.iteration == 200)].error_pct.mean()
    pivot = next(c for c in code if "pivot_table(index=[*STUDY_KEY" in c.source)
    assert ["bf16", "plain", "A", "20", f"{bf16:.2f}"] in [line.split()[:5] for line in _text(pivot).splitlines()]
    last = df[(df.variant == "") & (df.arch == "plain") & (df.split == "train")].sort_values("iteration")
    want = ["20", *(f"{last[(last.depth == 20) & (last.seed == seed)].error_pct.iat[-1]:.2f}" for seed in (0, 1))]
    per_seed = next(c for c in code if "plain_train" in c.source)
    assert "9 runs of the study" in _text(per_seed) and want in [line.split() for line in _text(per_seed).splitlines()]
    # plain-56 s1 is still running: its seed has no final error (NaN), not its error at iteration 100
    want = ["56", f"{last[(last.depth == 56) & (last.seed == 0)].error_pct.iat[-1]:.2f}", "NaN"]
    assert want in [line.split() for line in _text(per_seed).splitlines()], _text(per_seed)

    # The finals are Table 6's: the runs not done are named and left out, and for every net of the study Table 6
    # draws (the fp32 one), the pivot's mean, std and count of test and training error are the table's numbers.
    assert f"left out (not done): {', '.join(left_out)}" in _text(pivot), _text(pivot)
    from study.analysis import RunData, tables
    from study.analysis.load import STUDY_KEY

    table6 = tables.build("table6", RunData.load(runs))
    assert table6.study.variant == "" and "unfinished: plain-110 s0 (running, 100/200 it.), plain-56 s1 (running, 100/200 it.), ResNet-20 s1 (diverged, 160/200 it.)" in table6.notes
    ours = table6.frame[table6.frame.test_n > 0].set_index(["arch", "depth"])
    study = table6.study
    summary = pd.read_pickle(tmp_path / "summary.pkl").xs(  # the study's option-A nets: (arch, depth) rows
        (study.dataset, study.iterations, study.batch_size, study.holdout, study.variant, "A"), level=[*STUDY_KEY, "shortcut"]
    )
    assert sorted(summary.index) == sorted(ours.index) == [("plain", 20), ("plain", 56), ("resnet", 20), ("resnet", 56)]
    shown = {(net, split, stat): f"{summary.at[net, (agg, split)]:.2f}" for net in ours.index
             for split in ("test", "train") for stat, agg in (("n", "count"), ("mean", "mean"), ("std", "std"))}
    assert shown == {(net, split, stat): f"{ours.at[net, f'{split}_{stat}']:.2f}" for net, split, stat in shown}
    assert (shown[("plain", 56), "test", "n"], shown[("resnet", 20), "test", "n"]) == ("1.00", "1.00")
    # The comparison: ResNet-56's mean minus plain-56's, each over its finished seeds, as in the table
    line = next(line for line in _text(compared).splitlines() if line.startswith("resnet minus plain at 56 layers"))
    diff = {split: f"{v:.2f}" for split, v in ast.literal_eval(line.split(":", 1)[1].strip()).items()}
    assert diff == {split: f"{ours.at[('resnet', 56), f'{split}_mean'] - ours.at[('plain', 56), f'{split}_mean']:.2f}"
                    for split in ("test", "train")}, line


@pytest.mark.slow
def test_explore_notebook_runs_on_resnets_alone_and_says_what_it_cannot_compare(tmp_path, monkeypatch):
    """A first user's runs dir: one ResNet-56 (docs/running.md's first example). Every cell runs; the
    comparison of two nets says there is nothing to compare."""
    write_run(tmp_path / "runs", "resnet", 56, seed=0, iterations=200, floor=(8.0, 9.0))
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setenv("STUDY_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path / "notebooks")}}).execute()
    compared = next(c for c in nb.cells if c.cell_type == "code" and "per_seed" in c.source)
    assert ("nothing to compare: the study has no depth with both plain and resnet runs finished (finished: resnet)"
            in _text(compared)), _text(compared)
