"""`--streams S`: one process trains S runs at once, interleaved step by step (on a GPU each on its
own CUDA stream). Each run stays its own run: these tests hold the interleaved runs to the metrics
of the same runs trained one after another, exactly (on CPU nothing is shared between runs but the
process)."""

import pandas as pd
import pytest
import torch

import study.train
from study.cli import main
from study.config import RunConfig
from study.runstore import Run, list_runs
from helpers import TIMING_COLUMNS
from study.train import StopFlag, StopRequested
from helpers import run_all

ARGS = ["run", "--arch", "resnet", "--depth", "8", "--seeds", "0-1", "--iterations", "7", "--batch-size", "64",
        "--device", "cpu", "--no-progress"]


def all_metrics(runs_dir) -> pd.DataFrame:
    return pd.concat([r.read_metrics() for r in list_runs(runs_dir)], ignore_index=True).drop(columns=TIMING_COLUMNS)


def configs() -> list[RunConfig]:
    return [RunConfig(arch="resnet", depth=8, seed=s, iterations=7, batch_size=64, dataset="fashion-mnist-mini")
            for s in range(3)]


def test_interleaved_runs_equal_runs_trained_alone(tmp_path, capsys, monkeypatch):
    """Two runs at once: the metrics equal those of one run after another, and so do each run's
    final weights. (Three runs in two places: `test_a_finished_run_makes_room_for_the_next`.)"""
    assert main([*ARGS, "--runs-dir", str(tmp_path / "alone")]) == 0
    real_step = study.train.step.sgd_step
    optimizers = []  # which run each step belongs to

    def record(forward, opt, *args, **kwargs):
        optimizers.append(id(opt))  # both runs' optimizers live through the first 14 steps
        return real_step(forward, opt, *args, **kwargs)

    monkeypatch.setattr(study.train.step, "sgd_step", record)
    assert main([*ARGS, "--runs-dir", str(tmp_path / "together"), "--streams", "2"]) == 0
    first, second = optimizers[0], optimizers[1]
    assert first != second and optimizers[:14] == [first, second] * 7  # step by step, in turn
    out = capsys.readouterr().out
    assert "interleaved with up to 1 other run(s)" in out
    alone, together = all_metrics(tmp_path / "alone"), all_metrics(tmp_path / "together")
    assert alone.run_id.nunique() == 2
    pd.testing.assert_frame_equal(alone, together)
    for a, b in zip(list_runs(tmp_path / "alone"), list_runs(tmp_path / "together")):
        for k, v in a.load_checkpoint()["model"].items():
            assert torch.equal(v, b.load_checkpoint()["model"][k]), (a.cfg.run_id, k)


@pytest.mark.slow  # the default run stops interleaved lists between runs (test_a_signal_between_runs_stops_the_list) and one run mid-epoch (test_faults)
def test_a_stop_checkpoints_every_interleaved_run_and_they_resume_exactly(tmp_path, monkeypatch):
    """SIGTERM (the shared stop flag) while two runs are interleaved: each stops after its next
    step with its own mid-epoch checkpoint; running again finishes them with the metrics of an
    uninterrupted run."""
    run_all(configs(), tmp_path / "whole", progress=False, log=lambda m: None, streams=2, device="cpu")

    stop = StopFlag()
    real_step = study.train.step.sgd_step
    calls = []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # the fifth step of the first run, its partner has had four
            stop.signum = 15
        return real_step(*args, **kwargs)

    monkeypatch.setattr(study.train.step, "sgd_step", step_then_signal)
    with pytest.raises(StopRequested):
        run_all(configs(), tmp_path / "cut", progress=False, log=lambda m: None, stop=stop, streams=2, device="cpu")
    monkeypatch.setattr(study.train.step, "sgd_step", real_step)
    statuses = {r.cfg.seed: r.status() for r in list_runs(tmp_path / "cut")}
    assert statuses[0]["status"] == statuses[1]["status"] == "interrupted"
    assert statuses[0]["iteration"] == statuses[1]["iteration"] == 5
    assert 2 not in statuses  # the third run had not started

    assert set(run_all(configs(), tmp_path / "cut", progress=False, log=lambda m: None, streams=2, device="cpu").values()) == {"done"}
    pd.testing.assert_frame_equal(all_metrics(tmp_path / "whole"), all_metrics(tmp_path / "cut"))


def test_a_failing_run_does_not_stop_its_partner(tmp_path, monkeypatch):
    """The second run breaks at its second step; the first, interleaved with it, trains on to its
    end alone."""
    cfgs = configs()[:2]
    real_step = study.train.step.sgd_step
    calls = []

    def break_second_run(forward, opt, *args, **kwargs):
        calls.append(id(opt))
        if len(calls) == 4:  # the second run's second step (the runs alternate)
            raise RuntimeError("device trouble")
        return real_step(forward, opt, *args, **kwargs)

    monkeypatch.setattr(study.train.step, "sgd_step", break_second_run)
    messages = []
    results = run_all(cfgs, tmp_path, progress=False, log=messages.append, streams=2, device="cpu")
    assert results == {cfgs[0].run_id: "done", cfgs[1].run_id: "failed"}
    assert any("failed (RuntimeError: device trouble)" in m for m in messages)
    assert Run(tmp_path, cfgs[1]).status()["iteration"] == 1
    assert Run(tmp_path, cfgs[0]).status()["iteration"] == 7
    assert len(calls) == 4 + 5  # the first run's other 5 steps, after its partner failed


def test_streams_must_be_positive(tmp_path, capsys):
    assert main([*ARGS, "--runs-dir", str(tmp_path / "runs"), "--streams", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--streams" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # interleaving and its equality stay in the default run (test_interleaved_runs_equal_runs_trained_alone)
def test_a_finished_run_makes_room_for_the_next(tmp_path, monkeypatch):
    """Two places, three runs of 2, 6 and 3 steps: the third starts when the first ends, beside
    the second (not after it), and every run ends with the metrics it has alone."""
    cfgs = [RunConfig(arch="resnet", depth=8, seed=s, iterations=n, batch_size=64, dataset="fashion-mnist-mini")
            for s, n in ((0, 2), (1, 6), (2, 3))]
    run_all(cfgs, tmp_path / "alone", progress=False, log=lambda m: None, device="cpu")
    real_step = study.train.step.sgd_step
    order = []

    def record(forward, opt, *args, **kwargs):
        order.append(opt)  # the optimizer itself: a finished run's id() could be reused
        return real_step(forward, opt, *args, **kwargs)

    monkeypatch.setattr(study.train.step, "sgd_step", record)
    run_all(cfgs, tmp_path / "together", progress=False, log=lambda m: None, streams=2, device="cpu")
    runs = []  # optimizers in order of first appearance: the runs
    for opt in order:
        if not any(opt is r for r in runs):
            runs.append(opt)
    order = [next(k for k, r in enumerate(runs) if r is opt) for opt in order]
    first, second, third = 0, 1, 2
    assert len(runs) == 3 and [order.count(k) for k in range(3)] == [2, 6, 3]
    # a b a b; the first run ends (its generator returns at its turn), the third takes its place:
    # b, then b c three times
    assert order == [first, second] * 2 + [second] + [second, third] * 3
    pd.testing.assert_frame_equal(all_metrics(tmp_path / "alone"), all_metrics(tmp_path / "together"))


@pytest.mark.parametrize("streams", [1, 2])
def test_a_signal_between_runs_stops_the_list(tmp_path, streams):
    """A SIGTERM that lands when no run is training (between runs, during an evaluation) still
    stops the list: no further run starts, and the caller sees StopRequested (exit 143)."""
    stop = StopFlag()
    stop.signum = 15
    with pytest.raises(StopRequested):
        run_all(configs(), tmp_path, progress=False, log=lambda m: None, stop=stop, streams=streams, device="cpu")
    assert list_runs(tmp_path) == []
