"""`study run --tensorboard DIR` and `study export tensorboard`: the event files hold exactly the points of
`metrics.parquet` (steps = iterations), a resumed run's points are not duplicated, the export writes the
live writer's points, and without the package the flag is a one-line error."""

import argparse
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

from study.cli import main  # noqa: E402
from study.config import ConfigError, RunConfig  # noqa: E402
from study.runstore import Run  # noqa: E402
from helpers import run_all, train_run  # noqa: E402


def tiny(**kw) -> RunConfig:
    """Depth 8, batch 64: 5 iterations per epoch over `small_data`; 12 iterations: points at 5, 10, 12."""
    return RunConfig(**{**dict(arch="resnet", depth=8, iterations=12, batch_size=64), **kw})


def points(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for `log_dir`: {tag: [(step, value), ...]}."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def hparams(log_dir: Path) -> dict:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    return {k: v.string_value or v.number_value for k, v in start.session_start_info.hparams.items()}


def f32(value: float) -> float:
    return float(np.float32(value))


def assert_points_are_the_metrics(log_dir: Path, run: Run) -> None:
    """Each tag's steps are the iterations of metrics.parquet's rows and its values theirs, as float32;
    nothing else besides the final errors (at the last iteration)."""
    df = run.read_metrics()
    got = points(log_dir)
    expected = {}
    for split, rows in df.groupby("split", sort=False):
        expected[f"error/{split}"] = [(int(i), f32(v)) for i, v in zip(rows.iteration, rows.error_pct)]
        expected[f"loss/{split}"] = [(int(i), f32(v)) for i, v in zip(rows.iteration, rows.loss)]
        if split == "train":
            expected["lr"] = [(int(i), f32(v)) for i, v in zip(rows.iteration, rows.lr)]
    last = df.groupby("split", sort=False).last()
    for split, row in last.iterrows():
        expected[f"final/error_{split}"] = [(int(row.iteration), f32(row.error_pct))]
    assert got == expected


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_data):
    """One run trained to the end with the live writer: (runs dir, TensorBoard dir, run)."""
    root = tmp_path_factory.mktemp("tb")
    run = Run(root / "runs", tiny())
    assert train_run(run.cfg, run, small_data, torch.device("cpu"), progress=False, tensorboard=str(root / "tb")) == "done"
    return root / "runs", root / "tb", run


def test_live_points_are_the_metrics_keyed_by_iteration(finished):
    _, tb, run = finished
    assert [p.name for p in tb.iterdir()] == [run.cfg.run_id]
    assert_points_are_the_metrics(tb / run.cfg.run_id, run)
    assert [step for step, _ in points(tb / run.cfg.run_id)["error/test"]] == [5, 10, 12]
    params = hparams(tb / run.cfg.run_id)  # the HParams view: the run's config, in its own directory
    assert params["run_id"] == run.cfg.run_id and params["arch"] == "resnet" and params["depth"] == 8
    assert params["iterations"] == 12 and params["batch_size"] == 64 and params["precision"] == "fp32"
    assert params["dataset"] == "fashion-mnist-mini" and params["shortcut"] == "A" and params["seed"] == 0


def test_points_past_the_checkpoint_are_redone_not_duplicated(tmp_path, small_data, finished, monkeypatch):
    """Killed after epoch 2's points were written but before its checkpoint: the resumed session's
    writer purges the points after the checkpoint's iteration (5), keeps those up to it, and the
    run ends with the uninterrupted run's points, each once."""
    _, whole_tb, whole = finished
    run, tb = Run(tmp_path / "runs", tiny()), tmp_path / "tb"
    real_save, saves = Run.save_checkpoint, []

    def stop_before_the_second_checkpoint(self, state):
        saves.append(state["iteration"])
        if len(saves) == 2:
            raise KeyboardInterrupt
        real_save(self, state)

    monkeypatch.setattr(Run, "save_checkpoint", stop_before_the_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_run(run.cfg, run, small_data, torch.device("cpu"), progress=False, tensorboard=str(tb))
    monkeypatch.setattr(Run, "save_checkpoint", real_save)
    log_dir = tb / run.cfg.run_id
    assert run.load_checkpoint()["iteration"] == 5 and points(log_dir)["error/test"][-1][0] == 10

    assert train_run(run.cfg, run, small_data, torch.device("cpu"), progress=False, tensorboard=str(tb)) == "done"
    # On disk, step 10 is there twice (the stale point and the redone one), behind a purge marker at 6 ...
    events = [e for f in sorted(log_dir.glob("events.out.tfevents.*")) for e in EventFileLoader(str(f)).Load()]
    assert [e.step for e in events if e.HasField("session_log")] == [6]
    assert [e.step for e in events for v in e.summary.value if v.tag == "error/test"] == [5, 10, 10, 12]
    # ... and TensorBoard shows each step once: the uninterrupted run's points, which are the metrics.
    got = points(log_dir)
    assert all(len({s for s, _ in p}) == len(p) for p in got.values())
    assert_points_are_the_metrics(log_dir, run)
    expected = points(whole_tb / whole.cfg.run_id)
    assert got.keys() == expected.keys()
    for tag in got:
        assert [s for s, _ in got[tag]] == [s for s, _ in expected[tag]], tag
        np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in expected[tag]], rtol=1e-6, err_msg=tag)


def test_export_writes_the_live_points(tmp_path, finished, capsys):
    """`study run --tensorboard` (the CLI's wiring) and `study export tensorboard` on the finished runs
    write the same points and hyper-parameters; unfinished runs are skipped; exporting again replaces."""
    runs_dir, tb_dir, run = finished
    runs, tb, out = tmp_path / "runs", tmp_path / "tb", tmp_path / "out"
    argv = ["run", "--arch", "plain", "--depth", "8", "--iterations", "6", "--batch-size", "32", "--device", "cpu",
            "--runs-dir", str(runs), "--no-progress"]
    assert main([*argv, "--tensorboard", str(tb)]) == 0
    shutil.copytree(runs_dir / run.cfg.run_id, runs / run.cfg.run_id)  # the 3-epoch run too
    shutil.copytree(tb_dir / run.cfg.run_id, tb / run.cfg.run_id)
    unfinished = Run(runs, tiny(seed=7))
    unfinished.prepare("cpu")
    unfinished.set_status("running", iteration=3, epoch=0)
    capsys.readouterr()
    for _ in range(2):
        assert main(["export", "tensorboard", "--runs-dir", str(runs), "--out", str(out)]) == 0
        assert "exported 2 run(s)" in capsys.readouterr().out
    ids = sorted(p.name for p in tb.iterdir())
    assert len(ids) == 2 and sorted(p.name for p in out.iterdir()) == ids
    for run_id in ids:
        assert points(out / run_id) == points(tb / run_id), run_id
        assert hparams(out / run_id) == hparams(tb / run_id)
        config = json.loads((runs / run_id / "config.json").read_text())["config"]
        assert_points_are_the_metrics(out / run_id, Run(runs, RunConfig.from_dict(config)))


def test_export_leaves_out_a_run_it_cannot_read_and_its_earlier_export_as_it_was(tmp_path, finished, capsys):
    """A finished run whose metrics.parquet is damaged (or whose config.json is) is left out with one note
    naming the file and the fix, before anything is written: exported, it gave no points, and as the export
    purges a run's earlier points, exporting again over a good export wiped its curves. Nothing readable to
    export at all: one line, exit 2."""
    runs_dir, _, run = finished
    runs, out = tmp_path / "runs", tmp_path / "out"
    twins = [Run(runs, tiny(seed=seed)) for seed in (1, 2)]
    for twin in twins:
        shutil.copytree(run.dir, twin.dir)
        record = json.loads((twin.dir / "config.json").read_text())
        record["config"]["seed"] = twin.cfg.seed
        (twin.dir / "config.json").write_text(json.dumps(record))
    assert main(["export", "tensorboard", "--runs-dir", str(runs), "--out", str(out)]) == 0
    good = {twin.cfg.run_id: points(out / twin.cfg.run_id) for twin in twins}
    before = {p: p.read_bytes() for p in (out / twins[0].cfg.run_id).iterdir()}
    capsys.readouterr()

    twins[0].metrics_path.write_bytes(b"garbage")
    assert main(["export", "tensorboard", "--runs-dir", str(runs), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"note: {twins[0].metrics_path} is unreadable"), captured.err
    assert "so the run is left out: run the run's `study run` command again, which rewrites its metrics from its checkpoint" in captured.err
    assert "exported 1 run(s)" in captured.out and "1 left out" in captured.out, captured.out
    assert {p: p.read_bytes() for p in (out / twins[0].cfg.run_id).iterdir()} == before  # untouched
    assert points(out / twins[0].cfg.run_id) == good[twins[0].cfg.run_id] != {}
    assert points(out / twins[1].cfg.run_id) == good[twins[1].cfg.run_id]

    (twins[1].dir / "config.json").write_text('{"run_id": "trunc')
    fresh = tmp_path / "fresh"
    assert main(["export", "tensorboard", "--runs-dir", str(runs), "--out", str(fresh)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and err[0].startswith(f"note: {twins[1].dir / 'config.json'} is unreadable (not JSON"), err
    assert err[1].startswith(f"note: {twins[0].metrics_path} is unreadable"), err
    assert err[2].startswith("study: error: none of the 1 finished runs") and "has metrics that can be read" in err[2]
    assert not fresh.exists()


def test_without_the_package_one_line_error_exit_2_nothing_trained(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--arch", "plain", "--depth", "8", "--iterations", "3", "--device", "cpu",
                 "--tensorboard", "tb"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("study: error: --tensorboard needs the tensorboard package: ") and "pip install" in err
    assert list(tmp_path.iterdir()) == []  # no runs dir, no run, no TensorBoard dir
    assert main(["export", "tensorboard", "--out", "tb"]) == 2
    assert "pip install" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="pip install"):
        run_all([tiny()], tmp_path / "runs", device="cpu", tensorboard=str(tmp_path / "tb"))
    assert list(tmp_path.iterdir()) == []


def test_slurm_tasks_get_the_directory(tmp_path, monkeypatch):
    """`--launcher slurm --tensorboard DIR`: each array task trains with DIR (absolute: the job's
    working directory may differ)."""
    pytest.importorskip("submitit")
    from study.cli.args import add_launcher_arguments
    from study.launch import submit

    parser = argparse.ArgumentParser()
    add_launcher_arguments(parser)
    args = parser.parse_args(["--launcher", "slurm"])
    for key, value in dict(device="cpu", data_dir=None, download=False, compile=False, concurrency=None, grid=None,
                           tensorboard="tb").items():
        setattr(args, key, value)

    class Executor:
        def submit_array(self, tasks):
            self.tasks = tasks
            return [SimpleNamespace(job_id=f"1_{i}", paths=SimpleNamespace(stdout="log")) for i in range(len(tasks))]

    monkeypatch.chdir(tmp_path)
    executor = Executor()
    assert submit([tiny()], str(tmp_path / "runs"), args, executor=executor) == 0
    assert [task.tensorboard for task in executor.tasks] == [str(tmp_path / "tb")]


def test_export_from_a_missing_or_empty_runs_dir_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for runs, needle in ((tmp_path / "nothing", f"runs dir {tmp_path / 'nothing'} does not exist"),
                         (tmp_path / "empty", f"no runs in {tmp_path / 'empty'}")):
        assert main(["export", "tensorboard", "--runs-dir", str(runs), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"study: error: {needle}") and "--runs-dir" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
