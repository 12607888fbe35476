"""Figures, tables, the claims report and the analysis commands, from small generated run directories
(several seeds, a missing run, an unfinished run, a shortened schedule) and one tiny real end-to-end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from study.analysis.figures import build
from study.analysis.load import (RunData, Study, _class_count, load_gradients, load_responses, load_run_table, load_runs,
                                 pick_study)
from study.analysis.paper import TABLE2, TABLE6, series_label
from study.analysis.report import classify_claims
from study.analysis.tables import build as build_table
from study.analysis.tables import format_cell, format_params, series_summary
from study.cli import analysis as commands
from study.config import ConfigError, RunConfig
from study.runstore import METRIC_COLUMNS, Run

# --- synthetic run directories ---------------------------------------------------------------
# Curves fall from ~90% towards a floor; `floor` sets the final (train, test) error of a net.


def _curve_rows(run_id, identity, *, iterations, epoch_iters, stop_at, floor, seed, eval_split, top5=False):
    rng = np.random.default_rng(seed)
    rows = []
    its = list(range(epoch_iters, stop_at + 1, epoch_iters))
    if its[-1] != stop_at:
        its.append(stop_at)
    for epoch, it in enumerate(its, start=1):
        decay = math.exp(-6 * it / iterations)
        for split, final in zip(("train", eval_split), floor):
            err = final + (90 - final) * decay + rng.normal(0, 0.05)
            row = {
                **identity,
                "run_id": run_id,
                "epoch": epoch,
                "iteration": it,
                "split": split,
                "loss": err / 40,
                "error_pct": err,
                "lr": 0.1,
                "elapsed_s": float(epoch),
                "warmup_s": 0.0,
            }
            if top5:
                row["top5_error_pct"] = err / 3
            rows.append(row)
    return rows


def write_run(
    runs_dir,
    arch,
    depth,
    *,
    seed=0,
    dataset="fashion-mnist-mini",
    iterations=400,
    floor=(5.0, 10.0),
    status="done",
    stop_at=None,
    shortcut="A",
    epoch_iters=None,
    **settings,
):
    """A run written through the real Run API: config.json and status.json by `Run`, metrics in
    the METRIC_COLUMNS schema at the run's own metrics path."""
    cfg = RunConfig(arch=arch, depth=depth, dataset=dataset, seed=seed, iterations=iterations, shortcut=shortcut,
                    **settings)
    run = Run(runs_dir, cfg)
    run.prepare("cpu")
    stop_at = stop_at or iterations
    identity = {"dataset": dataset, "arch": arch, "depth": depth, "shortcut": shortcut, "seed": seed}
    rows = _curve_rows(
        cfg.run_id,
        identity,
        iterations=iterations,
        epoch_iters=epoch_iters or max(iterations // 20, 1),
        stop_at=stop_at,
        floor=floor,
        seed=seed + depth,
        eval_split="val" if cfg.holdout else "test",
    )
    pd.DataFrame(rows, columns=METRIC_COLUMNS).to_parquet(run.metrics_path, index=False)
    run.set_status(status, iteration=stop_at)
    return run


def write_imagenet_run(
    runs_dir, arch, depth, *, seed=0, shortcut="A", floor=(25.0, 28.0), iterations=600_000, status="done",
    classes=None,
):
    """An ImageNet-shaped run, as another tool would write it (RunConfig does not know imagenet);
    with ``classes``, its provenance records that class count, as `study run` does."""
    run_id = f"imagenet-{arch}{depth}-{shortcut}-s{seed}"
    d = Path(runs_dir) / run_id
    d.mkdir(parents=True)
    config = {
        "arch": arch,
        "depth": depth,
        "dataset": "imagenet",
        "shortcut": shortcut,
        "seed": seed,
        "iterations": iterations,
        "batch_size": 256,
    }
    record = {"run_id": run_id, "config": config, **({"provenance": {"classes": classes}} if classes else {})}
    (d / "config.json").write_text(json.dumps(record))
    (d / "status.json").write_text(json.dumps({"status": status, "iteration": iterations}))
    identity = {k: config[k] for k in ("dataset", "arch", "depth", "shortcut", "seed")}
    rows = _curve_rows(
        run_id,
        identity,
        iterations=iterations,
        epoch_iters=5000,
        stop_at=iterations,
        floor=floor,
        seed=seed + depth,
        eval_split="val",
        top5=True,
    )
    pd.DataFrame(rows).to_parquet(d / "metrics.parquet", index=False)
    return d


def write_responses(run, stds, **options):
    df = pd.DataFrame(
        {
            "run_id": run.cfg.run_id,
            "layer_index": range(2, len(stds) + 2),
            "layer_name": [f"layer{i}" for i in range(len(stds))],
            "std": stds,
            "split": "test",
            "bn_mode": "eval",
            "reduction": "tensor",
            "include_first": False,
            **options,
        }
    )
    df.to_parquet(run.dir / "responses.parquet", index=False)


def write_gradients(run, depth, arch, every=20):
    its = range(every, run.cfg.iterations + 1, every)
    layers = depth  # depth - 1 convs and the fc layer
    rows = [
        {
            "run_id": run.cfg.run_id,
            "iteration": it,
            "layer_index": i,
            "layer_name": f"l{i}.weight",
            "grad_norm": (0.5 if arch == "resnet" else 0.2) * (1 + i / layers) / (1 + it / 100),
        }
        for it in its
        for i in range(1, layers + 1)
    ]
    pd.DataFrame(rows).to_parquet(run.dir / "gradients.parquet", index=False)


# Final (train, test) errors of a study that shows the paper's effects: plain degrades with depth,
# ResNets improve, plain-56 trains worse than plain-20.
FLOORS = {
    ("plain", 20): (6.0, 10.0),
    ("plain", 56): (11.0, 14.0),
    ("resnet", 20): (4.0, 9.0),
    ("resnet", 56): (2.0, 7.5),
}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """The quick grid shape (plain/ResNet 20/56, 400 it.) with 3 seeds, except: plain-56 seed 2 is
    missing and ResNet-56 seed 1 is unfinished (stopped at 240 of 400 iterations)."""
    runs = tmp_path_factory.mktemp("runs")
    for (arch, depth), floor in FLOORS.items():
        for seed in range(3):
            if (arch, depth, seed) == ("plain", 56, 2):
                continue
            shifted = (floor[0] + 0.3 * seed, floor[1] + 0.2 * seed)
            unfinished = (arch, depth, seed) == ("resnet", 56, 1)
            run = write_run(
                runs,
                arch,
                depth,
                seed=seed,
                floor=shifted,
                status="running" if unfinished else "done",
                stop_at=240 if unfinished else None,
            )
            if not unfinished:
                stds = np.linspace(1.5, 1.0, depth - 1) if arch == "plain" else np.linspace(0.8, 0.4, depth - 1)
                write_responses(run, stds * (1 if depth == 20 else 0.9))
                write_gradients(run, depth, arch)
    return runs


@pytest.fixture
def cli(monkeypatch, capsys):
    """`study.cli.main` with the analysis commands registered the way the CLI registers them (a
    no-op once cli.py does it itself). Returns run(*argv) -> (exit code, stdout, stderr)."""
    import study.cli as cli_module

    parser = cli_module.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    handlers = dict(cli_module.COMMANDS)
    if "plot" not in sub.choices:
        handlers.update(commands.register(sub))
    monkeypatch.setattr(cli_module, "build_parser", lambda: parser)
    monkeypatch.setattr(cli_module, "COMMANDS", handlers)

    def run(*argv):
        code = cli_module.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def final_test_errors(runs_dir: Path, run_ids: list[str]) -> list[float]:
    """Each run's last logged test error, read straight from its metrics file."""
    out = []
    for run_id in run_ids:
        df = pd.read_parquet(runs_dir / run_id / "metrics.parquet")
        out.append(df[df.split == "test"].sort_values("iteration").error_pct.iloc[-1])
    return out


# --- loading ---------------------------------------------------------------------------------


def test_load_runs_is_long_form_metrics_with_status_and_budget(study_dir):
    df = load_runs(study_dir)
    assert list(df.columns[: len(METRIC_COLUMNS)]) == METRIC_COLUMNS
    assert {"status", "iterations"} <= set(df.columns)
    assert df.run_id.nunique() == 11 and set(df.iterations) == {400}
    assert set(df.split) == {"train", "test"}
    unfinished = df[df.run_id == "fashion-mnist-mini-resnet56-A-s1-it400"]
    assert set(unfinished.status) == {"running"} and unfinished.iteration.max() == 240
    done = df[df.run_id == "fashion-mnist-mini-plain20-A-s0-it400"]
    assert set(done.status) == {"done"} and len(done) == 40  # 20 epochs x 2 splits
    responses, gradients = load_responses(study_dir), load_gradients(study_dir)
    assert responses.run_id.nunique() == 10 and {"arch", "depth", "seed", "std", "bn_mode"} <= set(responses.columns)
    # Files written before the probe recorded γ (as these are) load with the column, all missing.
    assert responses.columns[4] == "bn_scale_rms" and responses["bn_scale_rms"].isna().all()
    assert gradients.run_id.nunique() == 10 and {"iteration", "grad_norm", "depth"} <= set(gradients.columns)


def test_load_runs_reads_runs_that_other_tools_wrote(tmp_path):
    write_imagenet_run(tmp_path, "plain", 18)
    # A directory with metrics only (no config.json): identity from the rows.
    other = write_imagenet_run(tmp_path, "resnet", 34)
    (other / "config.json").unlink()
    (tmp_path / "not-a-run").mkdir()
    table = load_run_table(tmp_path)
    assert sorted(table.run_id) == ["imagenet-plain18-A-s0", "imagenet-resnet34-A-s0"]
    assert set(table.dataset) == {"imagenet"} and set(table.depth) == {18, 34}
    df = load_runs(tmp_path)
    assert set(df.split) == {"train", "val"} and "top5_error_pct" in df.columns


def test_an_unreadable_file_is_left_out_in_one_note_whether_or_not_the_run_has_a_config(tmp_path):
    """A run folder with no config.json names itself by its metrics: if they are unreadable too, the folder is
    left out with the same note as a damaged file of a run with a config (no traceback); `load_runs`, for a
    notebook, warns instead."""
    import warnings

    from study.analysis import load_runs
    from study.analysis.load import UnreadableFileWarning

    write_run(tmp_path, "plain", 20)
    damaged = write_run(tmp_path, "resnet", 20)
    damaged.metrics_path.write_bytes(b"garbage")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "metrics.parquet").write_bytes(b"garbage!")
    data = RunData.load(tmp_path)
    assert sorted(data.runs["run_id"]) == ["fashion-mnist-mini-plain20-A-s0-it400", "fashion-mnist-mini-resnet20-A-s0-it400"]
    assert sorted(p for p, _ in data.unreadable) == [str(tmp_path / "fashion-mnist-mini-resnet20-A-s0-it400" / "metrics.parquet"),
                                                      str(tmp_path / "foreign" / "metrics.parquet")]
    assert all(note.endswith("so its rows are left out: run the run's `study run` command again, which rewrites its "
                             "metrics from its checkpoint") for note in data.notes()), data.notes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load_runs(tmp_path)
    assert set(df["run_id"]) == {"fashion-mnist-mini-plain20-A-s0-it400"}
    assert sorted(type(w.message).__name__ for w in caught) == ["UnreadableFileWarning"] * 2
    assert all(issubclass(w.category, UnreadableFileWarning) for w in caught)


CONFIG_DAMAGE = [
    (lambda text: text[:40], "not JSON: "),  # truncated
    (lambda text: "", "it is empty"),
    (lambda text: "[1, 2]", "it holds an array, not a JSON object"),
    (lambda text: json.dumps({"run_id": "x"}), "it holds no run config (no `config` object)"),
]


@pytest.mark.parametrize("damage,why", CONFIG_DAMAGE)
def test_each_kind_of_damage_to_a_config_json_is_named(tmp_path, damage, why):
    """`read_config`, which every command reads a config.json through, says what is wrong with it."""
    from study.runstore import list_runs, read_config

    damaged = write_run(tmp_path, "plain", 20)
    assert read_config(damaged.config_path)[1] is None
    damaged.config_path.write_text(damage(damaged.config_path.read_text()))
    record, reason = read_config(damaged.config_path)
    assert record is None and reason.startswith(why), reason
    unreadable: list = []
    assert list_runs(tmp_path, unreadable) == [] and unreadable == [(str(damaged.config_path), reason)]


def test_a_file_this_user_may_not_read_is_named_with_the_permissions_fix(tmp_path):
    """A config.json or metrics.parquet that this user may not read is whole: its line says "permission
    denied" and to mend the permissions, not to copy the file again or train the run again (real file modes;
    as root, through `setpriv` without the capabilities that bypass them)."""
    import os
    import shutil
    import subprocess
    import sys

    from study.runstore import PERMISSION_DENIED, read_config, unreadable_reason

    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("as root, file modes are bypassed without setpriv (util-linux) to drop that capability")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
        if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
            pytest.skip("setpriv may not drop capabilities here (a container without CAP_SETPCAP?)")
    runs = tmp_path / "runs"
    locked_config = write_run(runs, "plain", 20).config_path
    locked_metrics = write_run(runs, "resnet", 20).metrics_path
    locked_status = write_run(runs, "plain", 56).status_path
    fix = "let this user read it (see its owner and mode with `ls -l`), then run the command again"
    assert read_config(locked_config)[1] is None
    assert unreadable_reason(PermissionError(13, "Permission denied")) == PERMISSION_DENIED
    for path in (locked_config, locked_metrics, locked_status):
        path.chmod(0)
    try:
        if not prefix:
            assert read_config(locked_config) == (None, PERMISSION_DENIED)
        # One process for both commands (each one's output after a marker line): torch's import is most of its time.
        script = ("import sys; from study.cli import main\n"
                  "for argv in (['status'], ['table', 'table6']):\n"
                  "    print('===', flush=True); main([*argv, '--runs-dir', sys.argv[1]]); sys.stdout.flush()")
        proc = subprocess.run([*prefix, sys.executable, "-c", script, str(runs)], capture_output=True, text=True,
                              timeout=300)
        out = dict(zip(("status", "table"), proc.stdout.split("===\n")[1:]))
        out["table"] += proc.stderr  # the notes go to stderr; status prints none there
    finally:
        for path in (locked_config, locked_metrics, locked_status):
            path.chmod(0o644)
    status = out["status"]
    assert (f"{locked_config.parent.name}: its config.json is unreadable (permission denied), so it is not listed: {fix}"
            in status), status
    assert f"{locked_metrics.parent.name}: its metrics.parquet is unreadable (permission denied): {fix}" in status, status
    assert "train it again" not in status and "copy it again" not in status, status
    assert f"note: {locked_config} is unreadable (permission denied), so the run is left out: {fix}" in out["table"], out
    assert f"note: {locked_metrics} is unreadable (permission denied), so its rows are left out: {fix}" in out["table"], out
    # A status.json: the run is not taken for a new one, and the line says why where it stands is unknown.
    assert f"{locked_status.parent.name}: its status.json is unreadable (permission denied): {fix}" in status, status
    assert (f"note: {locked_status} is unreadable (permission denied), so the run counts as unfinished (status "
            f"unknown): {fix}") in out["table"], out
    assert "plain-56 s0 (unknown," in out["table"], out


# One kind of damage through every command (the kinds differ only in `read_config`'s reason, tested above).
@pytest.mark.parametrize("damage,why", CONFIG_DAMAGE[:1])
def test_a_damaged_config_json_leaves_its_run_out_everywhere_with_one_note(tmp_path, cli, damage, why):
    """A config.json that is there but cannot be read is damage, not a run written without one: its run is
    not rebuilt from its metrics rows (whose first `lr`, a warm-up's, filed it under a study of its own,
    "variant lr0.01"), but left out of status, table, plot, report and probe, each time with one line naming
    the file and the fix. A folder with no config.json at all (another tool's run) is still read from its rows."""
    import warnings

    from study.analysis.load import UnreadableFileWarning, studies

    runs = tmp_path / "runs"
    write_run(runs, "plain", 20)
    write_run(runs, "resnet", 20)
    damaged = write_run(runs, "plain", 56)
    metrics = pd.read_parquet(damaged.metrics_path)
    metrics.loc[0, "lr"] = 0.01  # as a warm-up's first row
    metrics.to_parquet(damaged.metrics_path, index=False)
    damaged.config_path.write_text(damage(damaged.config_path.read_text()))
    foreign = write_imagenet_run(runs, "resnet", 34)
    (foreign / "config.json").unlink()
    fix = "copy it again if the run trained elsewhere, or move the run's folder out of the runs dir and train it again"
    note = f"{damaged.config_path} is unreadable ({why}"

    data = RunData.load(runs)
    assert sorted(data.runs.run_id) == ["fashion-mnist-mini-plain20-A-s0-it400", "fashion-mnist-mini-resnet20-A-s0-it400",
                                        "imagenet-resnet34-A-s0"]
    assert [s.label() for s in studies(data.runs) if s.dataset != "imagenet"] == ["fashion-mnist-mini, 400 iterations"]
    assert damaged.cfg.run_id not in set(data.metrics.run_id) | set(data.responses.run_id)
    assert len(data.notes()) == 1 and data.notes()[0].startswith(note), data.notes()
    assert data.notes()[0].endswith(f"so the run is left out: {fix}"), data.notes()
    with warnings.catch_warnings(record=True) as caught:  # a notebook's load_runs warns instead
        warnings.simplefilter("always")
        assert damaged.cfg.run_id not in set(load_runs(runs).run_id)
    assert [type(w.message) for w in caught] == [UnreadableFileWarning]

    for argv in (("table", "table6"), ("plot", "fig1", "--out", tmp_path / "figs"),
                 ("report", "--out", tmp_path / "rep" / "report.md")):
        code, stdout, err = cli(*argv, "--runs-dir", runs)
        assert code == 0 and err.count("\n") == 1 and err.startswith(f"note: {note}") and fix in err, (argv, err)
        assert "variant" not in stdout and "plain-56" not in stdout.replace("missing runs: plain-56", ""), stdout
    assert "variant" not in (tmp_path / "rep" / "report.md").read_text()
    code, stdout, err = cli("status", "--runs-dir", runs)
    lines = stdout.splitlines()
    assert code == 0 and err == "" and damaged.cfg.run_id not in "".join(lines[:3]), stdout
    assert f"{damaged.cfg.run_id}: its config.json is unreadable ({why}" in stdout and fix in stdout, stdout
    # Not listed as a SLURM job's queued run (from its slurm_job.json), nor as a `new` run of the --arch
    # asked for: the line below the table is all status says of it.
    (damaged.dir / "slurm_job.json").write_text(json.dumps({"config": damaged.cfg.to_dict(), "job_id": "7"}))
    for extra in ((), ("--arch", "plain", "--depth", "56", "--iterations", "400")):
        code, stdout, err = cli("status", "--runs-dir", runs, *extra)
        table = [line for line in stdout.splitlines() if "config.json is unreadable" not in line]
        assert code == 0 and damaged.cfg.run_id not in "".join(table), (extra, stdout)
        assert f"{damaged.cfg.run_id}: its config.json is unreadable ({why}" in stdout, (extra, stdout)
    for argv in (("probe", damaged.cfg.run_id), ("evaluate", "--run", damaged.cfg.run_id)):  # asked for by name
        code, stdout, err = cli(*argv, "--runs-dir", runs)
        assert code == 2 and err.count("\n") == 1 and f"so run {damaged.cfg.run_id} cannot be read: {fix}" in err, err


def test_runs_written_before_warmup_s_still_load_and_plot(tmp_path, cli):
    """Metrics files from before the `warmup_s` column load (as NaN there), alone or beside new ones,
    and the figures are drawn from them."""
    for arch in ("plain", "resnet"):
        run_dir = write_imagenet_run(tmp_path, arch, 18)
        path = run_dir / "metrics.parquet"
        pd.read_parquet(path).drop(columns="warmup_s").to_parquet(path, index=False)
    df = load_runs(tmp_path)
    assert list(df.columns[: len(METRIC_COLUMNS)]) == METRIC_COLUMNS and df.warmup_s.isna().all()
    write_imagenet_run(tmp_path, "plain", 34)
    df = load_runs(tmp_path)
    assert df.groupby("depth").warmup_s.apply(lambda w: w.isna().all()).to_dict() == {18: True, 34: False}
    code, _, err = cli("plot", "fig4", "--runs-dir", tmp_path, "--out", tmp_path / "figures")
    assert code == 0, err


def test_runs_left_out_for_a_damaged_config_json_are_the_error_not_no_runs(tmp_path, cli):
    """A runs dir whose every run has a damaged config.json is not "no runs, train some first": the one
    line names the damaged file and its fix (and how many more there are)."""
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs, "plain", 20, seed=seed)
    first, second = sorted(runs.glob("*/config.json"))
    first.write_text('{"config":')
    code, out, err = cli("report", "--runs-dir", runs)
    assert code == 0, err  # one readable run: reported, with the damaged one as a note
    second.write_text("")
    for argv in (["plot", "fig6"], ["table", "table6"], ["report"]):
        code, out, err = cli(*argv, "--runs-dir", runs)
        assert code == 2 and err.count("\n") == 1, (argv, err)
        assert err.startswith(f"study: error: no readable runs in {runs}: {first} is unreadable (not JSON: "), err
        assert "copy it again if the run trained elsewhere" in err and "train some first" not in err
        assert f"(and 1 more run folder(s) like it: `study status --runs-dir {runs}` names them)" in err, err


def test_no_runs_at_all_is_a_one_line_error_exit_2(tmp_path, cli):
    with pytest.raises(ConfigError, match="no runs in"):
        load_runs(tmp_path)
    (tmp_path / "empty").mkdir()
    for argv in (["plot", "fig6"], ["plot", "all"], ["table", "table6"], ["report"], ["probe"]):
        code, out, err = cli(*argv, "--runs-dir", tmp_path / "empty")
        assert code == 2, argv
        assert err.count("\n") == 1 and err.startswith("study: error: no runs in") and "--runs-dir" in err, err
        # A mistyped path is not "no runs": the error says the folder is not there.
        code, out, err = cli(*argv, "--runs-dir", tmp_path / "nothing")
        assert code == 2, argv
        assert err.count("\n") == 1 and err.startswith(f"study: error: runs dir {tmp_path / 'nothing'} does not exist"), err
    assert not (tmp_path / "figures").exists() and not (tmp_path / "nothing").exists()
    (tmp_path / "a-file").write_text("")
    for argv in (["report"], ["probe"], ["evaluate"], ["status"], ["publish", "--out", str(tmp_path / "out")]):
        code, out, err = cli(*argv, "--runs-dir", tmp_path / "a-file")
        assert code == 2 and err.count("\n") == 1, (argv, err)
        assert err.startswith(f"study: error: --runs-dir {tmp_path / 'a-file'} is not a directory"), err
        code, out, err = cli(*argv, "--runs-dir", tmp_path / "nothing")
        assert code == 2 and err.startswith(f"study: error: runs dir {tmp_path / 'nothing'} does not exist"), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "empty"]


def test_runs_without_metrics_yet_are_refused_alike_by_report_table_and_plot(tmp_path, cli):
    """Every run new (config.json, no metrics): the report is refused as `study table` and `study plot` refuse
    it, in one line with the same fix, exit 2, before a verdict is printed or anything written; not an
    all-"cannot be judged" report with exit 0."""
    for arch in ("plain", "resnet"):
        Run(tmp_path / "runs", RunConfig(arch=arch, depth=20, iterations=400)).prepare("cpu")
    fix = "found none (runs with metrics: none); no run has finished an epoch yet: wait for one, or pass --runs-dir"
    outs = {"report": [], "table": [], "plot": []}
    for argv in (("report", "--out", tmp_path / "rep" / "report.md"), ("report", "--format", "html", "--out",
                 tmp_path / "rep" / "report.html"), ("table", "table6"), ("plot", "fig1", "--out", tmp_path / "figs")):
        code, stdout, err = cli(*argv, "--runs-dir", tmp_path / "runs")
        assert code == 2 and err.count("\n") == 1 and fix in err, (argv, err)
        outs[argv[0]].append(stdout)
    assert outs["report"] == ["", ""]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]

    # Metrics there but every file unreadable: the notes name them, and the error says to mend them, not to wait.
    damaged = write_run(tmp_path / "damaged", "plain", 20)
    damaged.metrics_path.write_bytes(b"not parquet")
    for argv in (("report", "--out", tmp_path / "rep" / "report.md"), ("table", "table6"),
                 ("plot", "fig1", "--out", tmp_path / "figs")):
        code, stdout, err = cli(*argv, "--runs-dir", tmp_path / "damaged")
        note, error = err.splitlines()
        assert code == 2 and note.startswith(f"note: {damaged.metrics_path} is unreadable"), (argv, err)
        assert error.endswith("found none (runs with metrics: none); no metrics file there can be read: mend the "
                              "unreadable ones as the notes say, or pass --runs-dir to the directory that holds the "
                              "runs you meant"), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "runs"]
    # One unreadable, another with no epoch yet: both fixes.
    Run(tmp_path / "damaged", RunConfig(arch="resnet", depth=20, iterations=400)).prepare("cpu")
    code, _, err = cli("table", "table6", "--runs-dir", tmp_path / "damaged")
    assert code == 2 and err.splitlines()[-1].endswith(
        "the metrics files there are unreadable or not written yet: mend the unreadable ones as the notes say, or "
        "wait for the other runs' first epoch, or pass --runs-dir to the directory that holds the runs you meant"), err


# --- figures ---------------------------------------------------------------------------------


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_png_and_pdf_and_names_missing_runs(study_dir, tmp_path, cli):
    out = tmp_path / "figs"
    code, stdout, err = cli("plot", "fig6", "--runs-dir", study_dir, "--out", out)
    assert code == 0, err
    png, pdf = out / "fig6.png", out / "fig6.pdf"
    assert _is_png(png) and png.stat().st_size > 10_000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000
    assert {p.name for p in out.iterdir()} == {"fig6.png", "fig6.pdf"}
    assert f"fig6: fashion-mnist-mini, 400 iterations -> {png}, {pdf}" in stdout
    assert "fig6: missing runs: plain-32" in stdout and "plain-56 s2" in stdout
    assert "fig6: unfinished: ResNet-56 s1 (running, 240/400 it.)" in stdout


def test_plot_one_figure_without_matching_runs_is_an_error(study_dir, tmp_path, cli):
    code, out, err = cli("plot", "fig4", "--runs-dir", study_dir, "--out", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "ImageNet" in err
    code, out, err = cli("plot", "fig6", "--runs-dir", study_dir, "--dataset", "cifar10", "--out", tmp_path)
    assert code == 2 and "--dataset cifar10" in err


def _legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _stars(ax) -> list[float]:
    return sorted(float(y) for line in ax.get_lines() if line.get_marker() == "*" for y in line.get_ydata())


def test_fig6_panels_series_and_labels_come_from_the_runs(study_dir):
    drawn = build("fig6", RunData.load(study_dir))
    axes = drawn.figure.axes
    # The third panel (ResNet-110 vs 1202) has no runs: it is left out, and the figure is two panels wide.
    assert [ax.get_title() for ax in axes] == ["plain", "ResNet"]
    assert drawn.figure.get_figwidth() == pytest.approx(2 * 4.3)
    # A net whose curve is over fewer seeds than the title's 3 says so: plain-56 has no seed 2, and ResNet-56's
    # curve is its finished runs alone (seed 1 still training would change the mean's seeds mid-curve).
    assert _legend_texts(axes[0])[:2] == ["plain-20", "plain-56 (2 seeds)"] and "training" in _legend_texts(axes[0])
    assert _legend_texts(axes[1])[:2] == ["ResNet-20", "ResNet-56 (2 seeds)"]
    assert "drawn from finished runs alone, as the tables count them: ResNet-56 s1 not in the curves" in drawn.notes
    assert "ResNet-110, ResNet-1202" in drawn.caption.split("missing runs:")[1]  # named in the caption instead
    # Dashed training and bold test curve per series, on the runs' own budget.
    styles = [(line.get_linestyle(), line.get_linewidth()) for line in axes[0].get_lines() if len(line.get_xdata()) > 1]
    assert styles.count(("--", 1.0)) == 2 and styles.count(("-", 2.2)) == 2
    assert axes[0].get_xlim() == (0, 400) and axes[0].get_ylabel() == "error (%)"
    assert "fashion-mnist-mini, 400 iterations, 3 seeds" in drawn.figure._suptitle.get_text()
    assert not _stars(axes[1])  # the paper's CIFAR-10 numbers are not put on Fashion-MNIST curves
    assert "missing runs" in drawn.caption and "ResNet-56 s1" in drawn.caption


def test_a_study_at_other_depths_draws_the_nets_it_has(tmp_path):
    """The quick study's shape (plain and ResNet x 8/20 layers): Figure 1 draws both plain nets (not
    plain-20 alone), Figure 6 the two panels with runs, Figure 7 all four nets; none of them lists
    the paper's nets as missing (a study of 8 and 20 layers does not lack plain-56)."""
    for arch in ("plain", "resnet"):
        for depth in (8, 20):
            run = write_run(tmp_path, arch, depth, iterations=250)
            write_responses(run, np.linspace(1.5, 1.0, depth - 1))
    data = RunData.load(tmp_path)
    fig1 = build("fig1", data)
    assert [_legend_texts(ax)[:2] for ax in fig1.figure.axes] == [["plain-8", "plain-20"]] * 2
    assert "Plain nets of 8 and 20 layers" in fig1.caption and "missing runs" not in fig1.caption
    fig6 = build("fig6", data)
    assert [ax.get_title() for ax in fig6.figure.axes] == ["plain", "ResNet"]
    assert [_legend_texts(ax)[:2] for ax in fig6.figure.axes] == [["plain-8", "plain-20"], ["ResNet-8", "ResNet-20"]]
    assert "missing runs" not in fig6.caption
    fig7 = build("fig7", data)
    assert _legend_texts(fig7.figure.axes[0]) == ["plain-8", "plain-20", "ResNet-8", "ResNet-20"]
    assert "missing runs" not in fig7.caption

    # With the paper's pair present too, Figure 1 is the paper's: plain-20 against plain-56.
    write_run(tmp_path, "plain", 56, iterations=250)
    assert [_legend_texts(ax)[:2] for ax in build("fig1", RunData.load(tmp_path)).figure.axes] == [
        ["plain-20", "plain-56"]] * 2


def test_curve_figures_leave_out_and_name_runs_with_no_epoch_logged(tmp_path):
    """A run that has started but logged no epoch has no curve: it gets no legend entry in Figures 1
    and 6, and a note names it."""
    write_run(tmp_path, "plain", 20)
    write_run(tmp_path, "resnet", 20)
    cfg = RunConfig(arch="plain", depth=56, iterations=400)
    waiting = Run(tmp_path, cfg)
    waiting.prepare("cpu")
    waiting.set_status("running", iteration=0)
    data = RunData.load(tmp_path)
    for name in ("fig1", "fig6"):
        drawn = build(name, data)
        assert _legend_texts(drawn.figure.axes[0])[0] == "plain-20" and "plain-56" not in _legend_texts(drawn.figure.axes[0])
        assert "no epoch logged yet, so not drawn: plain-56 s0 (running)" in drawn.caption, name


def test_fig7_names_runs_probed_in_eval_mode_before_bn_settled(tmp_path):
    """Figure 7 notes the runs whose responses were measured with BN in eval mode before 100
    iterations: by the iteration the probe measured, whatever the run reached since (and by the
    run's last iteration for files without that column)."""
    for arch, depth, probed in (("plain", 20, 50), ("resnet", 20, 400), ("plain", 56, None)):
        run = write_run(tmp_path, arch, depth)  # 400 iterations
        write_responses(run, np.linspace(1.0, 0.5, depth - 1),
                        **({"probed_iteration": probed} if probed is not None else {}))
    note = next(n for n in build("fig7", RunData.load(tmp_path)).notes if "fewer than 100 iterations" in n)
    assert note.endswith(": fashion-mnist-mini-plain20-A-s0-it400 (probe them with `study probe --bn-mode train`, or train longer)")
    assert "resnet20" not in note and "plain56" not in note


def test_fig6_on_cifar10_marks_the_papers_numbers_on_paper_axes(tmp_path):
    for arch, depth in (("plain", 20), ("resnet", 20), ("resnet", 110)):
        write_run(tmp_path, arch, depth, dataset="cifar10", iterations=64_000, floor=(1.0, 8.0), epoch_iters=3200)
    drawn = build("fig6", RunData.load(tmp_path))
    plain, resnet, deep = drawn.figure.axes
    # The curves are means over seeds, so ResNet-110's star is the paper's mean of 5 runs, not its best.
    assert _stars(resnet) == [TABLE6[("resnet", 110, "A")].mean, TABLE6[("resnet", 20, "A")].best]
    assert _stars(deep) == [TABLE6[("resnet", 110, "A")].mean] and "ResNet-110's is its mean of 5 runs" in drawn.caption
    assert resnet.get_ylim() == (0, 20) and resnet.get_xlim() == (0, 64_000)
    drawn.figure.savefig(tmp_path / "f.png")  # lays out the ticks
    assert resnet.xaxis.get_offset_text().get_text() == "1e4"  # x in units of 1e4 iterations, as the paper


def test_fig4_from_imagenet_runs(tmp_path, cli):
    for arch in ("plain", "resnet"):
        for depth in (18, 34):
            write_imagenet_run(tmp_path, arch, depth)
    drawn = build("fig4", RunData.load(tmp_path))
    left, right = drawn.figure.axes
    assert (left.get_title(), right.get_title()) == ("plain", "ResNet")
    assert _legend_texts(left)[:2] == ["plain-18", "plain-34"] and "validation" in _legend_texts(left)
    assert _stars(right) == sorted([TABLE2[("resnet", 18, "A")].best, TABLE2[("resnet", 34, "A")].best])
    assert left.get_ylim() == (20, 60) and not drawn.notes
    assert "The curves are centre-crop, which reads higher than the paper's 10-crop test" in drawn.caption
    widths = {line.get_linewidth() for line in left.get_lines() if len(line.get_xdata()) > 1}
    assert widths == {0.8, 2.2}  # thin training, bold validation
    code, out, err = cli("table", "table2", "--runs-dir", tmp_path)
    assert code == 0 and "27.94" in out and "ResNet-34" in out


def test_fig7_draws_runs_of_one_probe_setting_and_names_the_others(tmp_path):
    """Responses measured per channel (or with BN in train mode) do not compare with the default
    ones: Figure 7 draws the setting most runs have and names the runs it left out."""
    for depth in (20, 56):
        for arch in ("plain", "resnet"):
            run = write_run(tmp_path, arch, depth)
            odd = dict(reduction="channel", bn_mode="train") if (arch, depth) == ("resnet", 56) else {}
            write_responses(run, np.linspace(1.5, 1.0, depth - 1), **odd)
    drawn = build("fig7", RunData.load(tmp_path))
    assert "per channel" not in drawn.caption and "train mode" not in drawn.caption
    assert any(n.startswith("left out, measured with other `study probe` options") and "resnet56" in n for n in drawn.notes)
    assert sorted(label.get_text() for label in drawn.figure.axes[0].get_legend().get_texts()) == [
        "ResNet-20", "plain-20", "plain-56"]


def test_claims_on_responses_read_the_probe_setting_figure_7_draws(tmp_path):
    """Claims 2 and 5 judge the responses Figure 7 draws: those measured with one probe setting. A
    ResNet-56 and a plain-20 probed per channel with BN in train mode (stds far above the others') are
    left out of both, and each claim names the runs it left out: without them claim 5 has no plain and
    ResNet pair of one depth, nor two ResNet depths (with them counted it would have both)."""
    for depth in (20, 56):
        for arch in ("plain", "resnet"):
            run = write_run(tmp_path, arch, depth)
            if arch == "plain":
                write_gradients(run, depth, arch)
            odd = (arch, depth) in {("resnet", 56), ("plain", 20)}
            stds = np.full(depth - 1, 9.0) if odd else np.linspace(1.5, 1.0, depth - 1) * (0.8 if arch == "resnet" else 1)
            write_responses(run, stds, **(dict(reduction="channel", bn_mode="train") if odd else {}))
    data = RunData.load(tmp_path)
    drawn = build("fig7", data)
    assert sorted(label.get_text() for label in drawn.figure.axes[0].get_legend().get_texts()) == ["ResNet-20", "plain-56"]
    claims = {c.number: c for c in classify_claims(data)}
    five, two = claims[5], claims[2]
    # Counted, the odd runs would pair every depth (20 and 56 layers) and give ResNet two depths.
    assert five.verdict_text == "cannot be judged" and five.evidence.startswith(
        "needs a plain net and a ResNet of the same depth with responses; needs responses of two ResNet depths"), five.evidence
    assert five.evidence.endswith("left out, measured with other `study probe` options than the study's other runs: "
                                  "fashion-mnist-mini-plain20-A-s0-it400, fashion-mnist-mini-resnet56-A-s0-it400 "
                                  "(probe them again with the options the others used)"), five.evidence
    assert "plain-56: smallest layer response std 1" in two.evidence, two.evidence
    assert two.evidence.endswith("responses left out, measured with other `study probe` options than the study's other "
                                 "runs: fashion-mnist-mini-plain20-A-s0-it400 (probe them again with the options the "
                                 "others used)"), two.evidence


def test_fig7_ticks_count_whole_layers(tmp_path):
    """The quick study's depths (8 and 20: up to 19 layers) drew ticks at 2.5, 7.5, ...: layers are
    counted, so both panels tick whole numbers only."""
    for depth in (8, 20):
        for arch in ("plain", "resnet"):
            write_responses(write_run(tmp_path, arch, depth), np.linspace(1.5, 1.0, depth - 1))
    drawn = build("fig7", RunData.load(tmp_path))
    drawn.figure.canvas.draw()
    for ax in drawn.figure.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks


def test_fig7_layer_responses_and_caption_states_the_choices(study_dir):
    drawn = build("fig7", RunData.load(study_dir))
    top, bottom = drawn.figure.axes
    assert _legend_texts(top) == ["plain-20", "plain-56", "ResNet-20", "ResNet-56"]
    assert top.get_xlabel() == "layer index (original)" and "sorted" in bottom.get_xlabel()
    for words in ("test split", "BN in eval mode", "whole response tensor", "first conv excluded"):
        assert words in drawn.caption
    assert "ResNet-110" in drawn.caption  # one of the paper's series, missing
    # Sorted panel: each curve falls.
    for line in bottom.get_lines():
        y = line.get_ydata()
        if len(y) > 1:
            assert all(np.diff(y) <= 1e-12)


# --- tables ----------------------------------------------------------------------------------


def test_an_out_that_is_or_is_under_a_file_names_the_file(study_dir, cli, tmp_path):
    """`study plot --out /etc/passwd`: the file in the way, not mkdir's bare "File exists"; one line,
    exit 2, nothing written."""
    blocker = tmp_path / "file"
    blocker.write_text("kept")
    for argv in (("plot", "fig1", "--out", blocker), ("plot", "fig1", "--out", blocker / "figs"),
                 ("report", "--out", blocker / "report.md")):
        code, out, err = cli(*argv, "--runs-dir", study_dir)
        assert code == 2 and err.count("\n") == 1 and f"{blocker} is a file, not a directory" in err, err
        assert "File exists" not in err and "Not a directory" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and blocker.read_text() == "kept"


def test_an_out_in_the_way_is_refused_before_anything_is_drawn_written_or_printed(study_dir, cli, tmp_path):
    """A folder given as the report's --out, or a folder where one of the figures goes (`plot all`, or the
    report's figures beside it): one line naming that path, exit 2, before a verdict is printed or a figure
    written (not fig1 written, then an error on fig6)."""
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir.md").mkdir()
    (tmp_path / "pa" / "fig6.png").mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    for out in ("outdir", "outdir.md"):
        code, stdout, err = cli("report", "--runs-dir", study_dir, "--out", tmp_path / out)
        assert code == 2 and stdout == "" and err.count("\n") == 1, (stdout, err)
        assert f"--out {tmp_path / out} is a directory; name the report file in it, e.g. --out " in err, err
    for argv in (("plot", "all", "--out", tmp_path / "pa"), ("plot", "fig6", "--out", tmp_path / "pa"),
                 ("report", "--out", tmp_path / "pa" / "report.md")):
        code, stdout, err = cli(*argv, "--runs-dir", study_dir)
        assert code == 2 and stdout == "" and err.count("\n") == 1, (argv, stdout, err)
        assert f"cannot write figures to {tmp_path / 'pa'}: {tmp_path / 'pa' / 'fig6.png'} is a directory" in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_the_reports_figure_1_heading_names_the_nets_it_draws(tmp_path, cli):
    """A study of plain-8 and plain-20 (results/quick's): the report's Figure 1 is headed with those,
    not the paper's plain-20 vs plain-56."""
    for depth in (8, 20):
        write_run(tmp_path / "runs", "plain", depth)
    out = tmp_path / "report.md"
    code, _, err = cli("report", "--runs-dir", tmp_path / "runs", "--out", out)
    assert code == 0, err
    headings = [line for line in out.read_text().splitlines() if line.startswith("### Figure 1")]
    assert headings == ["### Figure 1: plain-8 vs plain-20 (`study plot fig1`)"]


def test_format_cell_and_series_summary():
    assert format_cell(5, 6.43, 6.61, 0.16) == "6.43 (6.61 ± 0.16)"
    assert format_cell(1, 8.75, 8.75, float("nan")) == "8.75"
    assert format_cell(0, float("nan"), float("nan"), float("nan")) == "–"
    stats = series_summary(pd.Series([7.0, 6.0, 8.0, None]))
    assert stats["n"] == 3 and stats["best"] == 6.0 and stats["mean"] == 7.0 and stats["std"] == pytest.approx(1.0)


def test_table6_best_mean_std_over_seeds(study_dir, cli):
    code, out, err = cli("table", "table6", "--runs-dir", study_dir, "--format", "csv")
    assert code == 0, err
    df = pd.read_csv(__import__("io").StringIO(out)).set_index("net")
    errors = final_test_errors(study_dir, [f"fashion-mnist-mini-plain20-A-s{s}-it400" for s in range(3)])
    row = df.loc["plain-20"]
    assert row.test_n == 3 and row.test_best == pytest.approx(min(errors))
    assert row.test_mean == pytest.approx(np.mean(errors)) and row.test_std == pytest.approx(np.std(errors, ddof=1))
    assert df.loc["ResNet-56"].test_n == 2  # seed 1 is unfinished: not counted
    assert df.loc["ResNet-110"].test_n == 0 and df.loc["ResNet-110"].test_paper == pytest.approx(6.61)
    assert df.loc["ResNet-110"].test_paper_best == pytest.approx(6.43)  # beside our best, the paper's best
    assert "unfinished: ResNet-56 s1" in err  # notes on stderr keep the CSV clean
    code, out, err = cli("table", "table6", "--runs-dir", study_dir)
    assert cli("table", "table6", "--runs-dir", study_dir, "--format", "md")[1] == out  # `study report`'s spelling
    cell = f"{min(errors):.2f} ({np.mean(errors):.2f} ± {np.std(errors, ddof=1):.2f})"
    plain20 = next(line for line in out.splitlines() if line.startswith("| plain-20"))
    assert cell in plain20 and "fashion-mnist-mini, 400 iterations" in out
    assert "no difference is computed" in out  # Fashion-MNIST is not compared with CIFAR-10 numbers


def test_table6_difference_to_the_paper_on_cifar10(tmp_path):
    """At the paper's budget, our mean minus the paper's; at a shortened one no difference (the paper's
    numbers are not for it), and Figure 6 marks no star at the end of the shortened curves."""
    paper, short = tmp_path / "paper", tmp_path / "short"
    for runs, iterations in ((paper, 64_000), (short, 2000)):
        for seed in (0, 1):
            write_run(runs, "resnet", 110, seed=seed, dataset="cifar10", iterations=iterations,
                      floor=(0.5, 7.0 + seed), epoch_iters=iterations // 10)
        write_run(runs, "resnet", 20, dataset="cifar10", iterations=iterations, floor=(1.0, 9.0),
                  epoch_iters=iterations // 10)
    table = build_table("table6", RunData.load(paper))
    frame = table.frame.set_index("net")
    r110 = final_test_errors(paper, [f"cifar10-resnet110-A-s{s}" for s in (0, 1)])
    r20 = final_test_errors(paper, ["cifar10-resnet20-A-s0"])
    # ResNet-110: our mean against the paper's mean of 5 runs; ResNet-20 against its single number.
    assert frame.loc["ResNet-110", "test_diff"] == pytest.approx(np.mean(r110) - 6.61)
    assert frame.loc["ResNet-20", "test_diff"] == pytest.approx(r20[0] - 8.75)
    table = build_table("table6", RunData.load(short))
    assert table.frame["test_diff"].isna().all() and set(table.shown["diff test error"]) == {"–"}
    assert table.frame.set_index("net").loc["ResNet-20", "test_paper"] == 8.75  # the paper's number still shown
    assert ("your runs are shortened (2,000 iterations, the paper's 64,000): the paper's numbers are not for this "
            "setting, so no difference is computed") in table.notes, table.notes
    drawn = build("fig6", RunData.load(short))
    assert not any(_stars(ax) for ax in drawn.figure.axes)
    assert ("The paper's final numbers are not marked: your runs are shortened (2,000 iterations, the paper's "
            "64,000).") in drawn.caption, drawn.caption


def test_table6_counts_each_nets_parameters_with_the_model_builder(tmp_path, cli):
    """The paper's "# params" column, for every row: the model builder's count of the net as the study
    trains it (its data set's channels and classes), exact in the CSV and in millions in the table, as
    the paper writes them; the paper's CIFAR-10 nets give the paper's rounded counts."""
    import torch

    from study.models import build_model, count_params, net_params

    # ResNet-1202's, from PROTOCOL.md, which test_models checks the builder gives (building it here again
    # would take seconds).
    resnet1202 = 19_421_274
    for arch in ("plain", "resnet"):
        write_run(tmp_path / "cifar", arch, 20, dataset="cifar10", iterations=2000)
        write_run(tmp_path / "mnist", arch, 8, dataset="fashion-mnist-mini")
    net_params.cache_clear()  # counted afresh here: building the nets must leave torch's generator as it was
    state = torch.random.get_rng_state()
    table = build_table("table6", RunData.load(tmp_path / "cifar"))
    assert torch.equal(torch.random.get_rng_state(), state)
    frame = table.frame.set_index("net")
    assert list(frame.index) == ["plain-20", *(f"ResNet-{d}" for d in (20, 32, 44, 56, 110, 1202))]
    for net, row in frame.drop("ResNet-1202").iterrows():
        assert row.params == count_params(build_model(row.arch, row.depth, shortcut=row.shortcut)), net
    assert frame.loc["ResNet-1202", "params"] == resnet1202
    shown = table.shown.set_index("net")["# params"]
    paper = {20: "0.27M", 32: "0.46M", 44: "0.66M", 56: "0.85M", 110: "1.7M", 1202: "19.4M"}
    assert {d: shown[f"ResNet-{d}"] for d in paper} == paper and shown["plain-20"] == "0.27M"
    assert frame.loc["ResNet-110", "params"] == 1_727_962 and not any("parameters:" in n for n in table.notes)
    code, out, err = cli("table", "table6", "--runs-dir", tmp_path / "cifar")
    assert code == 0 and "| net " in out and "| # params " in out, err
    assert next(line for line in out.splitlines() if line.startswith("| ResNet-1202")).split("|")[2].strip() == "19.4M"
    # Fashion-MNIST's one channel: each row's net for it (plain-8, its twin, the paper's ResNets).
    table = build_table("table6", RunData.load(tmp_path / "mnist"))
    frame = table.frame.set_index("net")
    assert {"plain-8", "ResNet-8", "ResNet-1202"} <= set(frame.index)
    for net, row in frame.drop("ResNet-1202").iterrows():
        assert row.params == count_params(build_model(row.arch, row.depth, shortcut=row.shortcut, in_channels=1)), net
    one_channel = 2 * 16 * 9  # conv1 sees one channel, not three
    assert frame.loc["ResNet-20", "params"] == 269_722 - one_channel
    assert frame.loc["ResNet-1202", "params"] == resnet1202 - one_channel
    assert list(table.shown.set_index("net")["# params"]) == [format_params(c) for c in frame["params"]]
    assert any(n.startswith("parameters: each net as built for fashion-mnist-mini's 1-channel images")
               for n in table.notes)


def test_table6_of_holdout_runs_labels_the_papers_test_error_as_such(tmp_path, cli):
    """With --holdout ours is the validation error; the paper's column stays its test error."""
    write_run(tmp_path, "resnet", 20, dataset="cifar10", iterations=2000, floor=(1.0, 9.0), holdout=True)
    table = build_table("table6", RunData.load(tmp_path))
    assert {"ours: validation error", "paper: test error", "diff (validation error - paper's test error)"} <= set(table.shown.columns)
    assert not any("paper: validation" in c for c in table.shown.columns)
    assert any("the paper's Table 6 is the test error" in n for n in table.notes)
    code, out, err = cli("table", "table6", "--runs-dir", tmp_path, "--variant", "paper")
    assert code == 0 and "paper: test error" in out, err


def test_a_holdout_study_at_the_papers_budget_is_not_the_papers_setting(tmp_path):
    """The paper's curves and Table 6 are of nets trained on the whole training set (its 90/10 hold-out only
    chose the budget): a 64k hold-out study on CIFAR-10 is not the paper's setting, says why, and does not
    outrank a 32k study on the whole set."""
    from study.analysis.load import Study

    held = Study("cifar10", 64000, 128, True)
    assert held.on_paper_schedule and not held.is_paper
    assert held.deviations() == ["trained on 90% of the training set (a 10% hold-out)"]
    write_run(tmp_path, "resnet", 20, dataset="cifar10", iterations=64000, floor=(1.0, 9.0), holdout=True)
    write_run(tmp_path, "resnet", 20, dataset="cifar10", iterations=32000, floor=(1.0, 9.0))
    table = build_table("table6", RunData.load(tmp_path))
    assert (table.study.iterations, table.study.holdout) == (32000, False), table.study


def test_table6_is_of_the_study_the_claims_are_judged_on_even_without_its_resnets(tmp_path):
    """A CIFAR-10 study of the paper's plain-20/56 at its setting beside a ResNet pilot on another data set:
    Table 6 (which has plain rows) shows the study the claims and Figures 1 and 6 use, not the pilot."""
    from study.analysis.report import _cifar_study

    for depth in (20, 56):
        for seed in (0, 1):
            write_run(tmp_path, "plain", depth, seed=seed, dataset="cifar10", iterations=64000, floor=(5.0, 8.0))
    write_run(tmp_path, "resnet", 20, iterations=400)
    data = RunData.load(tmp_path)
    table = build_table("table6", data)
    assert table.study == _cifar_study(data) and table.study.dataset == "cifar10", table.study


def test_holdout_chooses_between_a_holdout_study_and_one_on_the_whole_training_set(tmp_path, cli):
    """Both studies beside each other: by default the one on the whole training set (the paper's
    curves are test errors), though the hold-out one has more runs; the note names the other one
    and how to choose it, and --holdout / --no-holdout choose, in tables and figures alike."""
    whole = write_run(tmp_path, "resnet", 20, floor=(1.0, 9.0))
    held = [write_run(tmp_path, "resnet", 20, floor=(2.0, 30.0), holdout=True, seed=s) for s in (0, 1)]
    data = RunData.load(tmp_path)
    default = build_table("table6", data)
    assert not default.study.holdout
    assert any("90/10 hold-out" in n and "--[no-]holdout" in n for n in default.notes), default.notes
    # Each study's best final evaluation error: `val` of the hold-out runs, `test` of the other.
    errors = {}
    for holdout, runs in ((False, [whole]), (True, held)):
        errors[holdout] = min(r.read_metrics().query(f"split == '{'val' if holdout else 'test'}'").error_pct.iloc[-1]
                              for r in runs)
    for flag, holdout in (("--holdout", True), ("--no-holdout", False)):
        code, out, err = cli("table", "table6", "--runs-dir", tmp_path, flag)
        assert code == 0, err
        assert f"{errors[holdout]:.2f}" in out and f"{errors[not holdout]:.2f}" not in out, out
        assert ("validation error" in out) == holdout
    assert build("fig6", data, holdout=True).study == dataclasses.replace(default.study, holdout=True)
    code, out, err = cli("table", "table6", "--runs-dir", tmp_path, "--holdout", "--iterations", "9")
    assert code == 2 and "matching --iterations 9, --holdout" in err, err


def test_runs_with_other_settings_are_another_study_not_extra_seeds(tmp_path, cli):
    write_run(tmp_path, "resnet", 20, floor=(1.0, 9.0))
    write_run(tmp_path, "resnet", 20, floor=(2.0, 30.0), precision="bf16", batch_split=2)
    data = RunData.load(tmp_path)
    assert sorted(data.runs["variant"]) == ["", "bf16,bn2"]
    table = build_table("table6", data)
    assert table.study.variant == "" and table.frame.set_index("net").loc["ResNet-20", "test_n"] == 1
    assert any("variant bf16,bn2" in n and "--variant" in n for n in table.notes)
    code, out, err = cli("table", "table6", "--runs-dir", tmp_path, "--variant", "bn2,bf16")
    assert code == 0, err
    assert "variant bf16,bn2" in out
    bf16 = final_test_errors(tmp_path, ["fashion-mnist-mini-resnet20-A-s0-it400-bn2-bf16"])[0]
    assert f"{bf16:.2f}" in out
    code, out, err = cli("table", "table6", "--runs-dir", tmp_path, "--variant", "light0")
    assert code == 2 and "--variant light0" in err


def test_report_judges_the_study_its_choosers_pick(tmp_path, cli):
    """A runs dir with the pair in fp32 (plain-56 degrades) and in bf16 (it does not): by default the
    report judges the paper's fp32 study; --variant bf16 judges the bf16 one, and its figures and
    tables are drawn from it; --iterations chooses too. A claim the choice leaves unjudgeable says so.
    A choice that matches no run is a one-line error, exit 2, and writes nothing."""
    runs = tmp_path / "runs"
    for precision, deep in (("fp32", (15.0, 20.0)), ("bf16", (3.0, 8.0))):
        write_run(runs, "plain", 20, floor=(5.0, 10.0), precision=precision)
        write_run(runs, "plain", 56, floor=deep, precision=precision)
    verdicts = {}
    for variant in (None, "paper", "bf16"):
        out = tmp_path / "reports" / str(variant) / "report.md"
        code, stdout, err = cli("report", "--runs-dir", runs, "--out", out, *(("--variant", variant) if variant else ()))
        assert code == 0, err
        verdicts[variant] = next(line for line in stdout.splitlines() if line.startswith("claim 1"))
        text = out.read_text()
        judged = next(line for line in text.splitlines() if line.startswith("Judged on"))
        assert ("variant bf16" in judged) == (variant == "bf16"), judged
        # Table 6 is made from the judged study (its title names it), and Figure 6 drawn from it.
        table6 = next(line for line in text.splitlines() if line.startswith("**Table 6"))
        assert ("variant bf16" in table6) == (variant == "bf16"), table6
    assert "does not hold" not in verdicts[None] and verdicts[None] == verdicts["paper"]
    assert "does not hold" in verdicts["bf16"]
    from study.analysis.report import gather

    for variant in ("", "bf16"):  # every figure the report draws comes from the chosen study
        content = gather(RunData.load(runs), log=lambda line: None, variant=variant)
        drawn = [f.drawn for f in content.figures if f.drawn is not None]
        assert {f.name for f in content.figures if f.drawn} >= {"fig1", "fig6"}
        assert {t.table.study.variant for t in content.tables if t.table} == {variant}
        assert {d.study.variant for d in drawn} == {variant}
    # Claim 3 needs ResNets, which this dir has none of: with a choice, the reason names it.
    code, stdout, err = cli("report", "--runs-dir", runs, "--out", tmp_path / "it.md", "--iterations", "400",
                            "--variant", "bf16")
    assert code == 0, err
    claim3 = next(line for line in stdout.splitlines() if line.startswith("claim 3"))
    assert "cannot be judged" in claim3 and "(among the runs matching --iterations 400, --variant bf16)" in claim3
    code, stdout, err = cli("report", "--runs-dir", runs, "--out", tmp_path / "new" / "none.md", "--variant", "light0")
    assert code == 2 and "--variant light0" in err and len(err.strip().splitlines()) == 1 and stdout == ""
    assert not (tmp_path / "new").exists()


def test_settings_only_the_api_changes_name_their_run_and_form_another_study(tmp_path):
    """lr, momentum, weight decay, milestones, plateau and warm-up settings are part of the run id: a
    run at another learning rate neither resumes the paper's run nor counts as one of its seeds."""
    paper = write_run(tmp_path, "resnet", 20, floor=(1.0, 9.0))
    other = write_run(tmp_path, "resnet", 20, floor=(2.0, 30.0), lr=0.05, weight_decay=5e-4, milestones=(0.4, 0.8))
    assert other.dir != paper.dir and other.cfg.run_id.endswith("-it400-lr0.05-wd0.0005-ms0.4_0.8")
    assert RunConfig.from_dict(other.cfg.to_dict()).run_id == other.cfg.run_id  # milestones read back as a list
    data = RunData.load(tmp_path)
    assert sorted(data.runs["variant"]) == ["", "lr0.05,ms0.4_0.8,wd0.0005"]
    assert build_table("table6", data).frame.set_index("net").loc["ResNet-20", "test_n"] == 1
    for bad, message in ((dict(lr=0.0), "lr must be > 0"), (dict(momentum=1.0), "momentum must be in [0, 1)"),
                         (dict(weight_decay=-1e-4), "weight_decay must be >= 0"),
                         (dict(warmup_until_error=-1.0), "warmup_until_error must be >= 0")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            RunConfig("resnet", 20, **bad)


def test_the_papers_setting_includes_its_batch_size(tmp_path):
    """A 64k-iteration CIFAR-10 run at batch 64 is not the paper's setting: no paper axis range, and
    the table says how it differs."""
    assert Study("cifar10", 64_000, 128, False).is_paper and not Study("cifar10", 64_000, 64, False).is_paper
    assert not Study("imagenet", 600_000, 128, False).is_paper and Study("imagenet", 600_000, 256, False).is_paper
    write_run(tmp_path, "resnet", 20, dataset="cifar10", iterations=64_000, batch_size=64, floor=(1.0, 9.0))
    table = build_table("table6", RunData.load(tmp_path))
    assert any("at batch 64 (the paper's 128)" in n for n in table.notes) and not table.study.is_paper


def test_runs_of_one_epoch_draw_training_and_evaluation_as_told_apart_dots(tmp_path):
    """A run shorter than an epoch logs one point per split: a ring for training around (when equal)
    a filled dot for evaluation, in the curves and the legend; Figure 1's notes speak of plain nets
    only."""
    from matplotlib.colors import to_rgba

    for arch in ("plain", "resnet"):
        write_run(tmp_path, arch, 20, iterations=40, epoch_iters=40)  # one epoch logged
    write_run(tmp_path, "resnet", 56, iterations=40, status="running", stop_at=20, epoch_iters=20)
    (tmp_path / "fashion-mnist-mini-resnet56-A-s0-it40" / "metrics.parquet").unlink()  # nothing logged yet
    drawn = build("fig6", RunData.load(tmp_path))
    ax = drawn.figure.axes[0]
    dots = [line for line in ax.get_lines() if line.get_marker() == "o" and len(line.get_xdata()) == 1]
    rings = [line for line in dots if to_rgba(line.get_markerfacecolor())[3] == 0]
    filled = [line for line in dots if to_rgba(line.get_markerfacecolor())[3] == 1]
    assert len(rings) == len(filled) == 1  # plain-20: a ring (training) and a filled dot (test)
    # The ring is drawn over the dot and is larger: where the two errors agree, both stay visible.
    assert rings[0].get_markersize() > filled[0].get_markersize() and rings[0].get_zorder() > filled[0].get_zorder()
    assert to_rgba(rings[0].get_markeredgecolor()) == to_rgba(filled[0].get_markerfacecolor())  # not white on white
    legend = {h.get_label(): h for h in ax.get_legend().legend_handles}
    assert to_rgba(legend["training"].get_markerfacecolor())[3] == 0 and legend["test"].get_marker() == "o"
    assert "(rings)" in drawn.caption and "filled dots" in drawn.caption
    assert any("ResNet-56" in n for n in drawn.notes)  # Figure 6 draws ResNets: it says which it could not
    assert not any("ResNet-56" in n for n in build("fig1", RunData.load(tmp_path)).notes)


def test_a_net_above_the_papers_axis_is_named_with_its_final_errors(tmp_path):
    """As the paper says of plain-110 in Figure 6: a net whose curves lie above the paper's y-range
    gets a note with its final errors, and the nets within it do not."""
    write_run(tmp_path, "plain", 20, dataset="cifar10", iterations=64_000, floor=(1.0, 9.0))
    write_run(tmp_path, "plain", 110, dataset="cifar10", iterations=64_000, floor=(62.0, 65.0))
    drawn = build("fig6", RunData.load(tmp_path))
    assert drawn.figure.axes[0].get_ylim() == (0, 20)
    off = [n for n in drawn.notes if "off the chart" in n]
    final = final_test_errors(tmp_path, ["cifar10-plain110-A-s0"])[0]
    assert len(off) == 1 and "plain-110" in off[0] and "plain-20" not in off[0] and f"test {final:.1f}%" in off[0]
    # Figure 1 lacks its pair (plain-56): it draws the shallowest and deepest plain nets there are,
    # names plain-110 as off its chart too, and plain-56 as missing (a study of the paper's depths).
    fig1 = build("fig1", RunData.load(tmp_path))
    assert _legend_texts(fig1.figure.axes[0])[:2] == ["plain-20", "plain-110"]
    assert any("off the chart" in n and "plain-110" in n for n in fig1.notes)
    assert any(n == "missing runs: plain-56" for n in fig1.notes)


def write_tencrop(run_dir, top1, iteration=600_000):
    """A `tencrop.json` as `study evaluate` writes it (the fields the tables read)."""
    (Path(run_dir) / "tencrop.json").write_text(json.dumps({"top1": top1, "top5": top1 / 3, "iteration": iteration}))


def final_val_error(run_dir) -> float:
    """A run's last logged (centre-crop) `val` error, read straight from its metrics file."""
    df = pd.read_parquet(Path(run_dir) / "metrics.parquet")
    return df[df.split == "val"].sort_values("iteration").error_pct.iloc[-1]


def test_claim_6_uses_the_10_crop_test_where_the_runs_have_one(tmp_path):
    """Table 3's claim is about 10-crop errors: logged centre-crop errors decide it only until
    `study evaluate` has tested every run it compares, and the evidence says which it used; a claim
    whose runs are all tested uses 10-crop though another claim's are not."""
    floors = {("plain", "A"): 30.0, ("resnet", "A"): 27.0, ("resnet", "B"): 26.0, ("resnet", "C"): 25.0}
    dirs = {net: write_imagenet_run(tmp_path, net[0], 34, shortcut=net[1], floor=(20.0, val))
            for net, val in floors.items()}
    plain18 = write_imagenet_run(tmp_path, "plain", 18, floor=(18.0, 29.0))
    claim6 = {c.number: c for c in classify_claims(RunData.load(tmp_path))}[6]
    assert claim6.verdict == "holds" and "centre-crop (run `study evaluate`" in claim6.evidence
    # 10-crop numbers of the final checkpoints that reverse B and C: the claim now fails on them.
    tencrop = {("plain", "A"): 29.0, ("resnet", "A"): 26.0, ("resnet", "B"): 24.0, ("resnet", "C"): 25.0}
    for net, top1 in tencrop.items():
        write_tencrop(dirs[net], top1)
    write_tencrop(plain18, 27.5)
    claims = {c.number: c for c in classify_claims(RunData.load(tmp_path))}
    claim6 = claims[6]
    assert claim6.verdict == "does not hold" and "top-1 10-crop validation error" in claim6.evidence
    assert "C 25.00" in claim6.evidence and "B 24.00" in claim6.evidence, claim6.evidence
    assert ", 10-crop val error 29.00 vs 27.50 (" in claims[1].evidence, claims[1].evidence
    # One run of the four untested (ResNet-34 C): every net's centre-crop, not three 10-crop beside one
    # centre-crop, and the run to test named; claim 1 (plain-18 vs plain-34, both tested) stays 10-crop.
    (dirs[("resnet", "C")] / "tencrop.json").unlink()
    claims = {c.number: c for c in classify_claims(RunData.load(tmp_path))}
    claim6 = claims[6]
    logged = {net: final_val_error(d) for net, d in dirs.items()}
    assert claim6.verdict == "holds", claim6.evidence
    assert claim6.evidence.startswith(
        "top-1 centre-crop (not 10-crop, which not every run compared has: run `study evaluate` for "
        f"imagenet-resnet34-C-s0) validation error plain-34 {logged[('plain', 'A')]:.2f}, ResNet-34 A "
        f"{logged[('resnet', 'A')]:.2f}, B {logged[('resnet', 'B')]:.2f}, C {logged[('resnet', 'C')]:.2f} ("
    ), claim6.evidence
    assert ", 10-crop val error 29.00 vs 27.50 (" in claims[1].evidence, claims[1].evidence
    # plain-18 untested instead: claim 1 compares the two plain nets' centre-crop errors.
    write_tencrop(dirs[("resnet", "C")], 25.0)
    (plain18 / "tencrop.json").unlink()
    claims = {c.number: c for c in classify_claims(RunData.load(tmp_path))}
    assert "top-1 10-crop validation error" in claims[6].evidence
    assert ("centre-crop (not 10-crop, which not every run compared has: run `study evaluate` for "
            f"imagenet-plain18-A-s0) val error {logged[('plain', 'A')]:.2f} vs {final_val_error(plain18):.2f}") in claims[1].evidence


def test_claim_3_judges_resnet_34_against_resnet_18_on_imagenet_beside_cifar(tmp_path):
    """Table 2's ResNet-34 below ResNet-18 is claim 3 on ImageNet: judged from the ImageNet runs (10-crop where
    both are tested), as a part of its own beside the CIFAR-style ResNets, each part with its verdict."""
    r18 = write_imagenet_run(tmp_path / "inet", "resnet", 18, floor=(22.0, 29.0))
    r34 = write_imagenet_run(tmp_path / "inet", "resnet", 34, floor=(20.0, 27.0))
    claim3 = {c.number: c for c in classify_claims(RunData.load(tmp_path / "inet"))}[3]
    assert claim3.verdict == "holds" and claim3.evidence.startswith("imagenet: training error ResNet-34 "), claim3.evidence
    assert "centre-crop (run `study evaluate` for the paper's 10-crop) val error" in claim3.evidence
    write_tencrop(r18, 26.0)
    write_tencrop(r34, 26.5)  # tested: ResNet-34 behind in 10-crop top-1
    claim3 = {c.number: c for c in classify_claims(RunData.load(tmp_path / "inet"))}[3]
    assert claim3.verdict == "does not hold" and "10-crop val error 26.50 vs 26.00" in claim3.evidence, claim3.evidence
    # Beside CIFAR-style ResNets that improve with depth: each part says its verdict; one that fails fails the claim.
    for depth, floor in ((8, 20.0), (20, 15.0)):
        write_run(tmp_path / "inet", "resnet", depth, floor=(floor, floor + 2))
    claim3 = {c.number: c for c in classify_claims(RunData.load(tmp_path / "inet"))}[3]
    assert claim3.verdict == "does not hold", claim3.evidence
    assert claim3.evidence.startswith("fashion-mnist-mini, training/test error: ResNet-8 ") and "(holds); imagenet: " in claim3.evidence
    assert claim3.evidence.endswith("(does not hold)"), claim3.evidence


def test_table2_and_table3_never_mix_10_crop_and_centre_crop(tmp_path):
    """A reviewer's case: ImageNet runs of two seeds, every one tested by `study evaluate` but
    plain-18's seed 1. Table 2 shows every net's logged centre-crop `val` (not plain-18's 10-crop seed 0
    beside its centre-crop seed 1, a spread that would be mostly the gap between the two tests), and
    names the run to test; Table 3, whose runs are all tested, shows their 10-crop numbers."""
    dirs = {}
    for arch, depth, shortcut in (("plain", 18, "A"), ("plain", 34, "A"), ("resnet", 18, "A"), ("resnet", 34, "A"),
                                  ("resnet", 34, "B"), ("resnet", 34, "C")):
        for seed in (0, 1):
            d = dirs[arch, depth, shortcut, seed] = write_imagenet_run(tmp_path, arch, depth, shortcut=shortcut,
                                                                       seed=seed)
            if (arch, depth, seed) != ("plain", 18, 1):
                write_tencrop(d, 27.90 if (arch, depth) == ("plain", 18) else 20.0 + depth / 10 + seed)
    data = RunData.load(tmp_path)
    table = build_table("table2", data)
    shown = table.shown.set_index("net")
    for arch, depth in (("plain", 18), ("plain", 34), ("resnet", 18), ("resnet", 34)):
        logged = pd.Series([final_val_error(dirs[arch, depth, "A", seed]) for seed in (0, 1)])
        net = shown.loc[series_label(arch, depth)]
        assert net["ours: top-1"] == format_cell(2, logged.min(), logged.mean(), logged.std()), net
        assert net["diff top-1"] == f"{logged.mean() - TABLE2[(arch, depth, 'A')].reference:+.2f}", net
    assert (table.frame["tencrop_n"] == 0).all() and "27.90" not in table.markdown()
    crop = [n for n in table.notes if "10-crop" in n]
    assert crop == ["the paper's numbers are 10-crop testing; yours are the centre-crop `val` every run logged, as not "
                    "every run has a 10-crop result and one table does not mix the two (tested: "
                    "imagenet-plain18-A-s0, imagenet-plain34-A-s0, imagenet-plain34-A-s1, imagenet-resnet18-A-s0, "
                    "imagenet-resnet18-A-s1, imagenet-resnet34-A-s0, imagenet-resnet34-A-s1): run `study evaluate` for "
                    "imagenet-plain18-A-s1 to show 10-crop numbers"], crop
    table3 = build_table("table3", data)
    assert table3.shown.set_index("net").loc["ResNet-34 C", "ours: top-1"] == format_cell(2, 23.4, 23.9, pd.Series([23.4, 24.4]).std())
    # Its top-5 are the 10-crop tests' too: no note that they come from the logged metrics.
    assert not any(n.startswith("top-5 without a 10-crop test") for n in table3.notes), table3.notes
    # Once plain-18's seed 1 is tested too, Table 2 is 10-crop throughout.
    write_tencrop(dirs["plain", 18, "A", 1], 28.0)
    table = build_table("table2", RunData.load(tmp_path))
    assert table.shown.set_index("net").loc["plain-18", "ours: top-1"] == "27.90 (27.95 ± 0.07)"
    assert (table.frame["tencrop_n"] == 2).all()


def test_table3_top1_and_top5_per_shortcut_option(tmp_path, cli):
    write_imagenet_run(tmp_path, "plain", 34)
    for shortcut in ("A", "B", "C"):
        write_imagenet_run(tmp_path, "resnet", 34, shortcut=shortcut)
    code, out, err = cli("table", "table3", "--runs-dir", tmp_path)
    assert code == 0, err
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"plain-34", "ResNet-34", "ResNet-34 B", "ResNet-34 C"} <= set(lines)
    assert "24.19" in lines["ResNet-34 C"] and "7.40" in lines["ResNet-34 C"]
    assert "top-5 without a 10-crop test comes from the metrics column `top5_error_pct`" in out + err  # none tested


# --- claims and report -----------------------------------------------------------------------


def test_claims_are_classified_from_the_runs_present(study_dir):
    claims = {c.number: c for c in classify_claims(RunData.load(study_dir))}
    assert {n: c.verdict for n, c in claims.items()} == {
        1: "holds",
        2: "holds",
        3: "holds",
        4: "cannot be judged",
        5: "holds",
        6: "cannot be judged",
    }
    assert claims[1].seeds == 2  # plain-56 has two finished seeds
    assert "plain-56" in claims[1].evidence and "plain-20" in claims[1].evidence
    assert "ResNet-1202" in claims[4].evidence


def test_claims_that_the_runs_contradict(tmp_path):
    # Plain-56 better than plain-20, ResNet-56 worse than ResNet-20, ResNet responses larger.
    floors = {
        ("plain", 20): (8.0, 12.0),
        ("plain", 56): (4.0, 9.0),
        ("resnet", 20): (3.0, 8.0),
        ("resnet", 56): (6.0, 11.0),
    }
    for (arch, depth), floor in floors.items():
        run = write_run(tmp_path, arch, depth, floor=floor)
        write_responses(run, np.full(depth - 1, 2.0 if arch == "resnet" else 1.0))
    claims = {c.number: c.verdict for c in classify_claims(RunData.load(tmp_path))}
    assert claims[1] == claims[3] == claims[5] == "does not hold"
    assert claims[2] == "cannot be judged"  # responses present, gradient norms not


def test_a_claim_of_two_parts_says_which_part_failed(tmp_path):
    """Claim 5: ResNet responses smaller than plain (holds) and shrinking with depth (fails here:
    ResNet-56's are larger than ResNet-20's). The evidence gives each part its verdict."""
    for (arch, depth), std in {("plain", 20): 1.5, ("plain", 56): 1.6, ("resnet", 20): 0.9, ("resnet", 56): 1.0}.items():
        write_responses(write_run(tmp_path, arch, depth), np.full(depth - 1, std))
    claim = next(c for c in classify_claims(RunData.load(tmp_path)) if c.number == 5)
    assert claim.verdict == "does not hold"
    smaller, shrinking = claim.evidence.split("; ")
    assert smaller.startswith("mean response std ResNet vs plain") and smaller.endswith("(holds)"), claim.evidence
    assert shrinking.startswith("ResNet mean response std by depth") and shrinking.endswith("(does not hold)")
    # Each comparison carries its statistic; one seed a net gives no interval, and the verdict says so.
    assert "56 vs 20: difference +0.100, higher in 1 of 1 seeds" in shrinking
    assert claim.significance == "no interval"


def test_claim_5_is_judged_on_the_papers_nets_alone(tmp_path):
    """A follow-up's arm with responses (one seed, larger than everything) changes neither claim 5's
    verdict nor its seed count: the paper's nets have two seeds each."""
    for seed in (0, 1):
        for (arch, depth), std in {("plain", 20): 1.5, ("plain", 56): 1.6, ("resnet", 20): 1.0, ("resnet", 56): 0.9}.items():
            write_responses(write_run(tmp_path, arch, depth, seed=seed), np.full(depth - 1, std + 0.01 * seed))
    before = next(c for c in classify_claims(RunData.load(tmp_path)) if c.number == 5)
    write_responses(write_run(tmp_path, "plain", 56, seed=0, init="delta-orthogonal"), np.full(55, 9.0))
    after = next(c for c in classify_claims(RunData.load(tmp_path)) if c.number == 5)
    assert (after.verdict, after.seeds, after.evidence) == (before.verdict, before.seeds, before.evidence) == (
        "holds", 2, before.evidence)


def test_claims_on_nets_that_have_not_learned_cannot_be_judged(tmp_path):
    """Nets all at chance (90% error for 10 classes; a demo of a few steps) say nothing about depth,
    whichever is a point "better": claims 1 and 3 cannot be judged, and the evidence says why. A
    deep plain net stuck at chance beside a shallow one that learned is judged: that is degradation."""
    untrained, degraded = tmp_path / "untrained", tmp_path / "degraded"
    for (arch, depth), floor in {("plain", 20): (86.0, 88.0), ("plain", 56): (89.0, 89.5),
                                 ("resnet", 20): (89.2, 90.7), ("resnet", 56): (85.3, 89.9),
                                 ("resnet", 110): (87.0, 89.0), ("resnet", 1202): (86.0, 90.0)}.items():
        write_run(untrained, arch, depth, floor=floor)
    for (arch, depth), floor in {("plain", 20): (10.0, 12.0), ("plain", 56): (89.0, 89.5)}.items():
        write_run(degraded, arch, depth, floor=floor)
    claims = {c.number: c for c in classify_claims(RunData.load(untrained))}
    for n in (1, 3, 4):
        assert claims[n].verdict == "cannot be judged", claims[n].line()
        assert "no net compared has learned" in claims[n].evidence and "chance 90.0%" in claims[n].evidence
    claims = {c.number: c for c in classify_claims(RunData.load(degraded))}
    assert claims[1].verdict == "holds" and "plain-56" in claims[1].evidence


@pytest.mark.parametrize("value,count", [(3, 3.0), (1000, 1000.0), (10.0, 10.0), (True, None), (1, None),
                                         (2.5, None), ("3", None), (None, None), (float("nan"), None)])
def test_a_recorded_class_count_is_a_whole_number_of_at_least_two(value, count):
    got = _class_count(value)
    assert got == count if count is not None else math.isnan(got)


def test_chance_is_that_of_the_classes_the_runs_recorded(tmp_path):
    """An ImageNet subset of 3 classes: chance is 66.7% error, so nets at 62-66% have not learned
    and claim 1 cannot be judged. Runs that recorded no class count are taken as the full 1000
    classes (chance 99.9%), where the same errors are judged."""
    for recorded in (3, None):
        runs = tmp_path / f"classes{recorded}"
        for depth in (18, 34):
            write_imagenet_run(runs, "plain", depth, floor=(62.0 + depth / 10, 64.0 + depth / 10), classes=recorded)
        table = load_run_table(runs)
        assert (table["classes"].tolist() == [3, 3]) if recorded else table["classes"].isna().all()
        claim = next(c for c in classify_claims(RunData.load(runs)) if c.number == 1)
        if recorded:
            assert claim.verdict == "cannot be judged" and "chance 66.7%" in claim.evidence, claim.line()
        else:
            assert claim.verdict == "holds", claim.line()


def test_an_imagenet_subset_at_the_papers_budget_is_not_the_papers_setting(tmp_path):
    """ImageNet runs on 100 of the 1000 classes, at the paper's 60e4 iterations and batch 256: their own
    study (not one with runs on the whole set), not the paper's setting; Table 2 computes no difference
    with the paper's numbers and says why; Figure 4 marks none of them; a study on the whole set beside
    them is the one the analysis picks."""
    subset, both = tmp_path / "subset", tmp_path / "both"
    for runs in (subset, both):
        for arch in ("plain", "resnet"):
            for depth in (18, 34):
                write_imagenet_run(runs, arch, depth, classes=100)
    study, _ = pick_study(RunData.load(subset), "table2", imagenet=True)
    assert study.subset == 100 and study.variant == "classes100" and not study.on_paper_schedule and not study.is_paper
    assert study.label() == "imagenet, 600,000 iterations, 100 classes"
    table = build_table("table2", RunData.load(subset))
    assert set(table.shown["diff top-1"]) == {"–"}, table.shown
    assert any(n.startswith("your runs are on 100 of ImageNet's 1,000 classes: the paper's numbers are not for this "
                            "setting, so no difference is computed") for n in table.notes), table.notes
    fig4 = build("fig4", RunData.load(subset))
    assert "Star" not in fig4.caption and "your runs are on 100 of ImageNet's 1,000 classes" in fig4.caption, fig4.caption
    # Runs on the whole set (1000 recorded, or no count: runs written before provenance had one) beside them.
    for arch in ("plain", "resnet"):
        for depth, classes in ((18, 1000), (34, None)):
            write_imagenet_run(both, arch, depth, seed=1, classes=classes)
    data = RunData.load(both)
    assert sorted(data.runs.drop_duplicates("variant")["variant"]) == ["", "classes100"]
    whole, _ = pick_study(data, "table2", imagenet=True)
    assert whole.is_paper and whole.subset is None and len(whole.select(data.runs)) == 4
    table = build_table("table2", data)
    assert table.study == whole and "–" not in set(table.shown["diff top-1"]), table.shown


@pytest.fixture(scope="module")
def report_of_study(study_dir, tmp_path_factory):
    """`study report` on the generated study, once for the tests that read it."""
    import study.cli as cli_module

    parser = cli_module.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    handlers = {**cli_module.COMMANDS, **(commands.register(sub) if "plot" not in sub.choices else {})}
    out = tmp_path_factory.mktemp("report") / "report.md"
    args = parser.parse_args(["report", "--runs-dir", str(study_dir), "--out", str(out)])
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = handlers["report"](args)
    return code, out, stdout.getvalue()


def test_report_has_every_figure_table_and_claim(report_of_study):
    code, out, stdout = report_of_study
    assert code == 0
    text = out.read_text()
    verdicts = [line for line in text.splitlines() if line[:1].isdigit() and ". **" in line]
    assert len(verdicts) == 6 and all(
        any(f"**{v}**" in line for v in ("holds", "does not hold", "cannot be judged")) for line in verdicts
    )
    for name in ("fig1", "fig6", "fig7", "gradients"):
        assert f"![{name}]({name}.png)" in text
        assert _is_png(out.parent / f"{name}.png") and (out.parent / f"{name}.pdf").stat().st_size > 5_000
    assert "Not drawn: fig4 needs ImageNet runs" in text
    assert "**Table 6, test error (%)" in text and "**table2**: not made" in text
    assert "missing runs: plain-32" in text  # each figure's notes come along
    assert sum(line.startswith("claim ") for line in stdout.splitlines()) == 6
    assert f"report -> {out}" in stdout


# --- a tiny real study, end to end -----------------------------------------------------------


@pytest.fixture(scope="module")
def small_data():
    """A slice of the embedded real data (as in test_train.py): 320 training and 200 test images."""
    from study.data import Data, Split, load_data

    full = load_data("fashion-mnist-mini")
    train = Split(full.train.images[:320].clone(), full.train.labels[:320].clone())
    test = Split(full.eval.images[:200].clone(), full.eval.labels[:200].clone())
    return Data(info=full.info, train=train, eval=test, eval_split="test", mean=train.images.float().div(255).mean(0))


def test_end_to_end_real_runs_probe_plot_table_report(tmp_path, cli, small_data):
    import torch

    from helpers import train_run

    runs, out = tmp_path / "runs", tmp_path / "figs"
    for arch, depth in (("plain", 8), ("plain", 14), ("resnet", 8)):
        cfg = RunConfig(arch=arch, depth=depth, iterations=3, batch_size=32)
        assert train_run(cfg, Run(runs, cfg), small_data, torch.device("cpu"), progress=False) == "done"
    code, _, err = cli("probe", "no-such-run", "--runs-dir", runs)
    assert code == 2 and "unknown run id 'no-such-run'" in err and "study status" in err
    code, stdout, err = cli("probe", "--runs-dir", runs, "--max-images", 100)
    assert code == 0, err
    assert stdout.count("layer responses at iteration 3") == 3
    probed = pd.read_parquet(runs / "fashion-mnist-mini-plain14-A-s0-it3-b32" / "responses.parquet")
    assert probed.layer_index.tolist() == list(range(2, 14)) and (probed["std"] > 0).all()
    assert set(probed.max_images) == {100} and set(probed.split) == {"test"}
    code, stdout, err = cli("plot", "all", "--runs-dir", runs, "--out", out)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {f"{n}.{x}" for n in ("fig1", "fig6", "fig7") for x in ("png", "pdf")}
    assert "fashion-mnist-mini, 3 iterations, batch 32" in stdout
    assert "fig4: skipped" in stdout and "gradients: skipped" in stdout
    code, stdout, err = cli("table", "table6", "--runs-dir", runs)
    assert code == 0 and "| plain-14" in stdout
    code, stdout, err = cli("report", "--runs-dir", runs, "--out", out / "report.md")
    assert code == 0 and (out / "report.md").exists() and "claim 1:" in stdout
    # Probed after 3 iterations with BN in eval mode: running statistics still near their start.
    claim5 = next(line for line in stdout.splitlines() if line.startswith("claim 5:"))
    assert "cannot be judged" in claim5 and "--bn-mode train" in claim5
    # Claim 2 does not cite those responses as evidence either (it has no gradient norms: 3 < 100).
    claim2 = next(line for line in stdout.splitlines() if line.startswith("claim 2:"))
    assert "cannot be judged" in claim2 and "smallest layer response std" not in claim2 and "--bn-mode train" in claim2
    assert "fewer than 100 iterations" in (out / "report.md").read_text().split("### Figure 7")[1].split("###")[0]


def test_a_comparison_is_welchs_interval_and_the_per_seed_order():
    """Known answers: 3 seeds a side, each with standard deviation 1, means 10 apart: Welch's
    interval is 10 ± t(0.975, 4 df) x sqrt(1/3 + 1/3) = 10 ± 2.7764 x 0.8165; the seeds all agree."""
    from study.analysis.report import _Stat, _significance, compare

    a, b = _Stat(pd.Series([31.0, 32.0, 33.0], index=[0, 1, 2])), _Stat(pd.Series([21.0, 22.0, 23.0], index=[0, 1, 2]))
    c = compare(a, b)
    assert c.diff == pytest.approx(10.0)
    assert (c.low, c.high) == pytest.approx((10 - 2.776445 * (2 / 3) ** 0.5, 10 + 2.776445 * (2 / 3) ** 0.5), abs=1e-5)
    assert c.significant(higher=True) and not c.significant(higher=False)
    assert str(c) == "difference +10.00, 95% CI +7.73 to +12.27 (Welch's t), higher in 3 of 3 seeds"
    # Overlapping seeds: the interval straddles 0; the order is counted on the seeds both have.
    wide = compare(_Stat(pd.Series([20.0, 26.0, 31.0], index=[0, 1, 2])), _Stat(pd.Series([21.0, 25.0, 30.0, 9.0], index=[0, 1, 2, 3])))
    assert wide.low < 0 < wide.high and not wide.significant(higher=True)
    assert (wide.above, wide.paired) == (2, 3) and "higher in 2 of 3 seeds" in str(wide)
    # Means over other seeds than the order (a net with a seed more): said, with each mean's count.
    assert wide.sizes == (3, 4) and str(wide).endswith("higher in 2 of 3 seeds both have; means over 3 and 4 seeds")
    assert wide.diff == pytest.approx(77 / 3 - 85 / 4)
    assert compare(a, b).sizes is None and "means over" not in str(compare(a, b))
    apart = compare(_Stat(pd.Series([5.0], index=[0])), _Stat(pd.Series([4.0], index=[1])))
    assert str(apart) == "difference +1.00, no seed in common; means over 1 and 1 seeds"
    # One seed a side: no interval, not significant, the order still said.
    one = compare(_Stat(pd.Series([5.0], index=[0])), _Stat(pd.Series([4.0], index=[0])))
    assert one.low is None and not one.significant(higher=True) and str(one) == "difference +1.00, higher in 1 of 1 seeds"
    # Seeds that agree to the last digit on both sides: no spread to test against, so no interval (scipy's
    # would be zero-width, "significant"), and no verdict resting on it is called significant.
    flat = compare(_Stat(pd.Series([5.0, 5.0], index=[0, 1])), _Stat(pd.Series([3.0, 3.0], index=[0, 1])))
    assert flat.low is None and str(flat) == "difference +2.00, higher in 2 of 2 seeds"
    assert _significance([(flat, True)], True) == "no interval"
    # Spread on one side is enough for Welch's interval.
    half = compare(_Stat(pd.Series([5.0, 5.0], index=[0, 1])), _Stat(pd.Series([3.0, 4.0], index=[0, 1])))
    assert half.low is not None and half.low < 0 < half.high
    # A seed where both nets have the same error is a tie, neither higher nor lower.
    tie = compare(_Stat(pd.Series([66.67], index=[0])), _Stat(pd.Series([66.67], index=[0])))
    assert tie.tied == 1 and str(tie) == "difference +0.00, equal in 1 of 1 seeds"
    some = compare(_Stat(pd.Series([3.0, 5.0, 7.0], index=[0, 1, 2])), _Stat(pd.Series([3.0, 6.0, 8.0], index=[0, 1, 2])))
    assert some.diff < 0 and str(some).endswith("lower in 2 of 3 seeds (1 tied)")


@pytest.mark.parametrize("gap, verdict, significance", [
    (8.0, "holds", "significant"), (0.4, "holds", "not significant"),
    (-8.0, "does not hold", "significant"), (-0.4, "does not hold", "not significant")])
def test_a_verdict_says_whether_it_is_significant(tmp_path, gap, verdict, significance):
    """Synthetic plain and ResNet nets of 8 and 20 layers over 3 seeds whose floors differ by seed
    (spread about 1 point): the deeper plain net worse and the deeper ResNet better by `gap` points
    (a negative gap: the other way round). Far apart, claims 1 and 3 are significant: they hold, or
    the runs significantly contradict them; close, they are not."""
    for seed, shift in zip(range(3), (0.0, 1.0, 2.0)):
        for arch, depth, floor in (("plain", 8, 20.0), ("plain", 20, 20.0 + gap),
                                   ("resnet", 8, 20.0), ("resnet", 20, 20.0 - gap)):
            write_run(tmp_path, arch, depth, seed=seed, floor=(floor + shift, floor + 1 + shift))
    claims = {c.number: c for c in classify_claims(RunData.load(tmp_path))}
    for n in (1, 3):
        assert claims[n].verdict == verdict and claims[n].significance == significance, claims[n].line()
        assert "in 3 of 3 seeds" in claims[n].evidence and "95% CI" in claims[n].evidence
        assert claims[n].line().startswith(f"claim {n}: {verdict} ({significance}) (3 seeds)")
    assert claims[2].significance == ""  # not a comparison of two means


def test_significance_of_a_verdict_that_holds_needs_every_interval_and_of_one_that_fails_any():
    """`_significance(comparisons, holds)`: each comparison is (interval, the side the claim states)."""
    from study.analysis.report import Comparison, _significance

    up = Comparison(diff=3.0, low=1.0, high=5.0, above=3, paired=3)  # significantly higher
    down = Comparison(diff=-3.0, low=-5.0, high=-1.0, above=0, paired=3)  # significantly lower
    wide = Comparison(diff=0.5, low=-1.0, high=2.0, above=2, paired=3)  # straddles 0
    one = Comparison(diff=3.0, low=None, high=None, above=1, paired=1)  # one seed: no interval
    assert _significance([(up, True), (down, False)], True) == "significant"
    assert _significance([(up, True), (wide, True)], True) == "not significant"  # every one is needed
    assert _significance([(one, True)], True) == "no interval"  # no test was possible: not "not significant"
    assert _significance([(up, True), (one, True)], True) == "no interval"
    assert _significance([(wide, True), (one, True)], True) == "not significant"  # a tested one falls short
    # Failing: one comparison significantly on the other side is enough; the claimed side is not.
    assert _significance([(up, True), (up, False)], False) == "significant"
    assert _significance([(wide, True), (down, True)], False) == "significant"
    assert _significance([(up, True), (wide, True)], False) == "not significant"
    assert _significance([(one, False)], False) == "no interval"
    assert _significance([(down, True), (one, False)], False) == "significant"  # contradicted, whatever the rest
    assert _significance([], True) == _significance([], False) == ""


@pytest.mark.parametrize("train_1202, significance", [(8.0, "significant"), (2.2, "not significant")])
def test_claim_4_contradicted_by_training_error_says_whether_significantly(tmp_path, train_1202, significance):
    """Claim 4 (ResNet-1202 trains like ResNet-110, tests worse): here its test error is higher, as
    claimed, but its training error is above 110's by more than the margin: far above (significant) or
    just above, within the seeds' spread (not significant)."""
    for seed, shift in zip(range(3), (0.0, 0.5, 1.0)):
        write_run(tmp_path, "resnet", 110, seed=seed, floor=(1.0 + shift, 6.0 + shift), iterations=400)
        write_run(tmp_path, "resnet", 1202, seed=seed, floor=(train_1202 + shift, 8.0 + shift), iterations=400)
    claim = next(c for c in classify_claims(RunData.load(tmp_path)) if c.number == 4)
    assert (claim.verdict, claim.significance) == ("does not hold", significance), claim.line()


# --- beyond the paper: error against budget --------------------------------------------------


def test_budget_draws_each_nets_final_errors_against_its_budgets(tmp_path, cli):
    """Two nets at three budgets, two seeds each: each line's points are the mean of the seeds'
    final errors at each budget; an unfinished run is left out and named; a study of one budget (and
    --iterations) is refused in one line; the report shows the figure only where it can be drawn."""
    expected = {}
    for depth, floors in ((20, (8.0, 6.5, 6.0)), (56, (11.0, 7.0, 5.0))):
        for budget, floor in zip((1000, 2000, 4000), floors):
            for seed in (0, 1):
                run = write_run(tmp_path, "resnet", depth, seed=seed, iterations=budget, floor=(floor + seed, floor + 2))
                expected.setdefault((depth, budget), []).append(final_test_errors(tmp_path, [run.cfg.run_id])[0])
    write_run(tmp_path, "resnet", 56, seed=2, iterations=4000, status="running", stop_at=1000)
    drawn = build("budget", RunData.load(tmp_path))
    assert drawn.study.budgets == (1000, 2000, 4000)
    assert any("unfinished, not drawn: ResNet-56 s2 at 4,000" in n for n in drawn.notes)
    test_ax = drawn.figure.axes[1]
    lines = [line for line in test_ax.get_lines() if line.get_linestyle() != "None" and len(line.get_xdata()) == 3]
    assert len(lines) == 2 and all(list(line.get_xdata()) == [1000, 2000, 4000] for line in lines)  # one per net
    got = sorted(tuple(np.round(line.get_ydata(), 6)) for line in lines)
    want = sorted(tuple(np.round([np.mean(expected[(d, b)]) for b in (1000, 2000, 4000)], 6)) for d in (20, 56))
    assert got == want
    # Its caption says what is drawn: two seeds a net (bands and dots), ResNets alone (no dashes to explain).
    assert "band and dots: the seeds" in drawn.caption and "dashed" not in drawn.caption
    code, out, _ = cli("plot", "budget", "--runs-dir", tmp_path, "--out", tmp_path / "figs")
    assert code == 0 and _is_png(tmp_path / "figs" / "budget.png") and "1,000/2,000/4,000 iterations" in out
    code, _, err = cli("plot", "budget", "--runs-dir", tmp_path, "--iterations", "1000", "--out", tmp_path / "f2")
    assert code == 2 and "drop --iterations" in err and len(err.strip().splitlines()) == 1
    # `plot all --iterations N` draws the others at N and the budget figure over every budget, as the report does.
    code, out, err = cli("plot", "all", "--runs-dir", tmp_path, "--iterations", "1000", "--out", tmp_path / "f4")
    assert code == 0, err
    assert _is_png(tmp_path / "f4" / "budget.png") and "budget: " in out and "1,000/2,000/4,000 iterations" in out, out
    assert _is_png(tmp_path / "f4" / "fig6.png") and "fig6: fashion-mnist-mini, 1,000 iterations" in out, out
    # One seed of a plain net and a ResNet at two budgets: no bands to explain; the dashes are.
    pair = tmp_path / "pair"
    for arch in ("plain", "resnet"):
        for budget in (1000, 2000):
            write_run(pair, arch, 20, iterations=budget)
    caption = build("budget", RunData.load(pair)).caption
    assert "One seed: each point is one run." in caption and "band" not in caption
    assert "Solid: residual nets; dashed: plain nets." in caption
    one = tmp_path / "one"
    write_run(one, "resnet", 20)
    code, _, err = cli("plot", "budget", "--runs-dir", one, "--out", tmp_path / "f3")
    assert code == 2 and "two or more --iterations" in err
    code, _, _ = cli("report", "--runs-dir", one, "--out", tmp_path / "one.md")
    assert code == 0 and "study plot budget" not in (tmp_path / "one.md").read_text()
    code, _, _ = cli("report", "--runs-dir", tmp_path, "--out", tmp_path / "all.md")
    assert code == 0 and "study plot budget" in (tmp_path / "all.md").read_text()


def test_the_default_study_is_the_one_closest_to_the_paper_whatever_the_folders_order(tmp_path):
    """Among studies with the same nets, a pilot's longest budget (nearest the paper's 64k) is used, not the
    first in folder order ("it16000" lists before "it32000"); then the paper's data set before another at
    the same budget; and a note names the others."""
    from study.analysis.load import pick_study

    wanted = [("resnet", 20, "A"), ("resnet", 56, "A")]
    runs = tmp_path / "runs"
    for iterations in (4000, 16000, 32000):
        for arch, depth, _ in wanted:
            write_run(runs, arch, depth, iterations=iterations, dataset="fashion-mnist")
    study, notes = pick_study(RunData.load(runs), "fig6", imagenet=False, wanted=wanted)
    assert (study.dataset, study.iterations) == ("fashion-mnist", 32000)
    assert notes == ["also present, not used here: fashion-mnist, 16,000 iterations; fashion-mnist, 4,000 iterations "
                     "(`study plot`, `study table` and `study report` choose with "
                     "--dataset/--iterations/--batch-size/--[no-]holdout/--variant)"], notes
    for arch, depth, _ in wanted:  # CIFAR-10 at a shorter budget: the paper's data set comes first
        write_run(runs, arch, depth, iterations=2000, dataset="cifar10")
    study, _ = pick_study(RunData.load(runs), "fig6", imagenet=False, wanted=wanted)
    assert (study.dataset, study.iterations) == ("cifar10", 2000)
    assert pick_study(RunData.load(runs), "fig6", imagenet=False, wanted=wanted, dataset="fashion-mnist")[0].iterations == 32000


def test_the_panels_of_figures_1_4_and_6_share_one_error_scale(tmp_path):
    """Plain against ResNet (and training against test) read on one scale outside the paper's axes too:
    the panels share their y range, which reaches the highest curve of any of them."""
    write_run(tmp_path, "plain", 20, floor=(40.0, 45.0))
    write_run(tmp_path, "plain", 56, floor=(50.0, 60.0))
    write_run(tmp_path, "resnet", 20, floor=(2.0, 8.0))
    data = RunData.load(tmp_path)
    for name in ("fig1", "fig6"):
        axes = build(name, data).figure.axes
        limits = {ax.get_ylim() for ax in axes}
        assert len(axes) == 2 and len(limits) == 1, (name, limits)
        assert next(iter(limits))[1] > max(max(line.get_ydata(), default=0) for ax in axes for line in ax.get_lines())


def test_each_curve_is_a_mean_over_one_set_of_seeds_from_start_to_end(tmp_path):
    """A net with a finished run is drawn from its finished runs alone (a run still training would change
    the mean's seeds where it stops); a net with none, from all its runs up to where every one of them has
    come, marked running in the legend; the notes say both."""
    for seed in (0, 1):
        write_run(tmp_path, "plain", 20, seed=seed, floor=(10.0 + seed, 12.0 + seed))
    write_run(tmp_path, "plain", 56, seed=0, floor=(20.0, 22.0))
    write_run(tmp_path, "plain", 56, seed=1, floor=(40.0, 42.0), status="running", stop_at=200)
    write_run(tmp_path, "resnet", 20, seed=0, floor=(8.0, 9.0), status="running", stop_at=300)
    write_run(tmp_path, "resnet", 20, seed=1, floor=(8.5, 9.5), status="interrupted", stop_at=120)
    data = RunData.load(tmp_path)
    drawn = build("fig6", data)
    plain, resnet = drawn.figure.axes
    assert _legend_texts(plain)[:2] == ["plain-20", "plain-56 (1 seed)"]
    assert _legend_texts(resnet)[0] == "ResNet-20 (interrupted, running)"  # its runs' statuses, not "running" alone

    def bold(ax):  # the test-error curves: (x, y) of each line of more than one point, drawn with width 2.2
        return [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
                if line.get_linewidth() == 2.2 and len(line.get_xdata()) > 1]

    test = data.metrics[data.metrics["split"] == "test"]
    p56 = test[test["run_id"] == "fashion-mnist-mini-plain56-A-s0-it400"].sort_values("iteration")
    assert (p56["iteration"].tolist(), p56["error_pct"].tolist()) in bold(plain)  # seed 0 alone, to the end
    r20 = test[test["arch"] == "resnet"]
    r20 = r20[r20["iteration"] <= 120].groupby("iteration")["error_pct"].mean()
    assert bold(resnet) == [(r20.index.tolist(), pytest.approx(r20.tolist()))]  # both seeds, up to 120
    assert "drawn from finished runs alone, as the tables count them: plain-56 s1 not in the curves" in drawn.notes
    assert ("nets with no finished run (their status in the legend) drawn as far as all their runs have come: "
            "ResNet-20 to 120 iterations") in drawn.notes
    assert _legend_texts(build("fig1", data).figure.axes[0]) == ["plain-20", "plain-56 (1 seed)"]


def test_a_claim_names_a_diverged_run_of_the_nets_it_judges(tmp_path):
    """A diverged run is left out of the means (as the tables leave it out); a claim whose nets include
    it says so, rather than letting a deeper net that failed to train vanish from its verdict."""
    for seed in (0, 1):
        write_run(tmp_path, "plain", 20, seed=seed, floor=(10.0, 12.0))
        write_run(tmp_path, "plain", 56, seed=seed, floor=(20.0, 22.0))
        write_run(tmp_path, "resnet", 20, seed=seed, floor=(8.0, 9.0))
    write_run(tmp_path, "resnet", 56, seed=0, floor=(6.0, 7.0))
    write_run(tmp_path, "resnet", 56, seed=1, floor=(6.0, 7.0), status="diverged", stop_at=160)
    claims = {c.number: c for c in classify_claims(RunData.load(tmp_path))}
    named = "; diverged, so in no mean: ResNet-56 s1 (runs that failed to train)"
    assert claims[3].evidence.endswith(named), claims[3].evidence
    assert claims[5].evidence.endswith(named), claims[5].evidence  # its evidence names depths, not nets
    assert "diverged" not in claims[1].evidence  # its nets (plain-20, plain-56) have no diverged run
    # Every ResNet-20 and ResNet-56 run diverged: claim 3 cannot be judged, and says which runs failed.
    for seed in (0, 1):
        Run(tmp_path, RunConfig("resnet", 20, seed=seed, iterations=400)).set_status("diverged", iteration=160)
    Run(tmp_path, RunConfig("resnet", 56, seed=0, iterations=400)).set_status("diverged", iteration=160)
    claim3 = classify_claims(RunData.load(tmp_path))[2]
    assert claim3.verdict == "cannot be judged" and claim3.evidence.endswith(
        "; diverged, so in no mean: ResNet-20 s0, ResNet-20 s1, ResNet-56 s0, ResNet-56 s1 (runs that failed to "
        "train)"), claim3.evidence


def test_table6_of_a_net_the_builder_refuses_shows_no_count_and_says_why(tmp_path, cli):
    """A run another tool wrote (no config.json; its metrics name the net) at a depth the package cannot
    build still gets its row: no parameter count, a note naming the net and why, exit 0."""
    import shutil

    write_run(tmp_path, "resnet", 20, dataset="cifar10", iterations=2000)
    other = write_run(tmp_path, "resnet", 32, dataset="cifar10", iterations=2000)
    foreign = tmp_path / "foreign-resnet18"
    shutil.copytree(other.dir, foreign)
    (foreign / "config.json").unlink()
    metrics = pd.read_parquet(foreign / "metrics.parquet").assign(depth=18, run_id="foreign-resnet18")
    metrics.to_parquet(foreign / "metrics.parquet", index=False)
    table = build_table("table6", RunData.load(tmp_path))
    frame = table.frame.set_index("net")
    assert math.isnan(frame.loc["ResNet-18", "params"]) and frame.loc["ResNet-20", "params"] == 269_722  # option A, as PROTOCOL.md
    assert table.shown.set_index("net").loc["ResNet-18", "# params"] == "–"
    assert ("parameters not counted for nets this package cannot build: ResNet-18 (CIFAR depth must be 6n+2 with "
            "n >= 1 (8, 14, 20, 32, 44, 56, 110, 1202, ...); got 18)") in table.notes, table.notes
    code, out, err = cli("table", "table6", "--runs-dir", tmp_path)
    assert code == 0 and "| ResNet-18 " in out, err


def test_table6_names_the_papers_missing_nets_only_for_a_study_of_the_papers_depths(tmp_path):
    """As the figures: a study of other depths (quick's 8 and 20 layers) does not lack ResNet-32 and the rest;
    one of the paper's 20 and 56 does, and the note says which."""
    for arch in ("plain", "resnet"):
        for depth in (8, 20):
            write_run(tmp_path / "quick", arch, depth)
        for depth in (20, 56):
            write_run(tmp_path / "pair", arch, depth)
    assert not any(n.startswith("missing runs") for n in build_table("table6", RunData.load(tmp_path / "quick")).notes)
    notes = build_table("table6", RunData.load(tmp_path / "pair")).notes
    assert "missing runs: ResNet-32, ResNet-44, ResNet-110, ResNet-1202" in notes, notes


def test_claim_5_judges_the_nets_figure_7_draws_not_resnet_1202(tmp_path):
    """The paper reads Figure 7 (plain-20/56, ResNet-20/56/110): a ResNet-1202 whose responses are larger
    than ResNet-110's, probed as every finished run is, does not decide claim 5; nor does ResNet-32 between."""
    stds = {("plain", 20): 1.2, ("plain", 56): 1.4, ("resnet", 20): 1.0, ("resnet", 32): 1.1, ("resnet", 56): 0.8,
            ("resnet", 110): 0.6, ("resnet", 1202): 0.7}
    for (arch, depth), std in stds.items():
        for seed in (0, 1):
            write_responses(write_run(tmp_path, arch, depth, seed=seed), [std + 0.01 * seed] * 3)
    claim5 = {c.number: c for c in classify_claims(RunData.load(tmp_path))}[5]
    assert claim5.verdict == "holds", claim5.evidence
    assert "1202" not in claim5.evidence and "32:" not in claim5.evidence, claim5.evidence
    assert "20: 1.005, 56: 0.805, 110: 0.605" in claim5.evidence, claim5.evidence


def test_claim_3_cannot_be_judged_where_a_resnet_has_no_final_error_and_counts_only_judged_seeds(tmp_path):
    """Finished ResNet-56 runs whose test error is NaN (files written by another tool): claim 3 says which net
    lacks it, instead of the report failing. A part that cannot be judged (ImageNet's, without two ResNet
    depths) adds no `0 seeds` to a claim the other part judges."""
    for seed in (0, 1, 2):
        write_run(tmp_path, "resnet", 20, seed=seed, floor=(8.0, 9.0))
        write_run(tmp_path, "resnet", 56, seed=seed, floor=(6.0, 7.0))
    for depth in (18, 34):
        write_imagenet_run(tmp_path, "plain", depth, floor=(20.0, 30.0))
    claim3 = {c.number: c for c in classify_claims(RunData.load(tmp_path))}[3]
    assert claim3.verdict == "holds" and claim3.seeds == 3, (claim3.verdict, claim3.seeds, claim3.evidence)
    for seed in (0, 1, 2):  # (one seed's NaN would leave the net its other seeds' mean, said so)
        bad = tmp_path / f"fashion-mnist-mini-resnet56-A-s{seed}-it400" / "metrics.parquet"
        metrics = pd.read_parquet(bad)
        metrics.loc[metrics["split"] == "test", "error_pct"] = float("nan")
        metrics.to_parquet(bad, index=False)
    claim3 = {c.number: c for c in classify_claims(RunData.load(tmp_path))}[3]
    assert claim3.verdict == "cannot be judged" and "ResNet-56 lacks a final training or test error" in claim3.evidence, claim3.evidence


def test_the_imagenet_claims_are_judged_on_the_study_of_their_own_table(tmp_path):
    """Table 2's pairs at one budget and Table 3's 34-layer nets at another: claims 1 and 3 (18 against 34
    layers) are judged on the first, as `study table table2` shows it, claim 6 on the second, as table3."""
    for arch, depth, floor in (("plain", 18, (18.0, 28.0)), ("plain", 34, (20.0, 29.0)), ("resnet", 18, (19.0, 27.5)),
                               ("resnet", 34, (17.0, 25.0))):
        write_imagenet_run(tmp_path, arch, depth, iterations=300_000, floor=floor)
    for (arch, shortcut), floor in {("plain", "A"): 30.0, ("resnet", "A"): 27.0, ("resnet", "B"): 26.0,
                                    ("resnet", "C"): 25.0}.items():
        write_imagenet_run(tmp_path, arch, 34, seed=1, shortcut=shortcut, iterations=200_000, floor=(20.0, floor))
    data = RunData.load(tmp_path)
    claims = {c.number: c for c in classify_claims(data)}
    assert claims[1].verdict == "holds" and claims[3].verdict == "holds", (claims[1].evidence, claims[3].evidence)
    assert "ResNet-18" in claims[3].evidence and "plain-18" in claims[1].evidence
    assert claims[6].verdict == "holds" and "C " in claims[6].evidence, claims[6].evidence
    assert build_table("table2", data).study.iterations == 300_000
    assert build_table("table3", data).study.iterations == 200_000
