"""Training follows the paper's schedule, logs the agreed metrics, is deterministic and resumes exactly."""

import json
import signal
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from study.config import RunConfig
from study.runstore import METRIC_COLUMNS, Run, RunStoreError
from helpers import TIMING_COLUMNS
from study.models import build_model
from study.train import StopFlag, StopRequested, evaluate, lr_at
from helpers import run_all, train_run, train_steps_of


def tiny(**kw) -> RunConfig:
    """Depth 8, batch 64: 5 iterations per epoch over `small_data`."""
    base = dict(arch="resnet", depth=8, dataset="fashion-mnist-mini", iterations=12, batch_size=64)
    return RunConfig(**{**base, **kw})


def metrics_without_time(run: Run) -> pd.DataFrame:
    return run.read_metrics().drop(columns=TIMING_COLUMNS)


def test_lr_schedule_is_the_papers_counted_in_iterations():
    cfg = RunConfig(arch="resnet", depth=20, dataset="cifar10")
    assert cfg.milestone_iterations == (32_000, 48_000)
    assert [lr_at(cfg, i, False) for i in (0, 31_999, 32_000, 47_999, 48_000, 63_999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    short = replace(cfg, iterations=2000)
    assert short.milestone_iterations == (1000, 1500)
    # Warm-up caps the lr at 0.01 before the first milestone only.
    assert lr_at(cfg, 10, True) == pytest.approx(0.01)
    assert lr_at(cfg, 40_000, True) == pytest.approx(0.01)
    assert RunConfig(arch="resnet", depth=110).uses_warmup and not RunConfig(arch="resnet", depth=56).uses_warmup


def test_warmup_switches_back_to_full_lr_once_training_error_drops(tmp_path, small_data):
    """Warm-up at 0.01 lasts while the running training error is at or above the threshold, then
    returns to 0.1. A threshold of 0% is never reached (stays warm until the first milestone), 100%
    at once; the paper's 80% lies in between on real data."""
    def lrs(threshold, iterations=30):
        cfg = tiny(warmup_min_depth=8, warmup_until_error=threshold, iterations=iterations, seed=int(threshold))
        run = Run(tmp_path, cfg)
        train_run(cfg, run, small_data, torch.device("cpu"), progress=False)
        df = run.read_metrics()
        return df[df.split == "train"].set_index("epoch")[["lr", "error_pct"]]

    never = lrs(0.0)
    assert never.loc[1, "lr"] == pytest.approx(0.01) and never.loc[3, "lr"] == pytest.approx(0.01)
    at_once = lrs(100.1)
    assert at_once.loc[1, "lr"] == pytest.approx(0.1)
    # The paper's rule: 0.01 until the running error is below 80% (epoch 3 here), then 0.1.
    cfg = tiny(warmup_min_depth=8, iterations=60, seed=3)
    run = Run(tmp_path, cfg)
    train_run(cfg, run, small_data, torch.device("cpu"), progress=False)
    df = run.read_metrics().query("split == 'train'").set_index("epoch")
    before_milestone = df[df.iteration <= 30]
    warm = before_milestone[np.isclose(before_milestone.lr, 0.01)]
    hot = before_milestone[np.isclose(before_milestone.lr, 0.1)]
    assert len(warm) >= 1 and len(hot) >= 1, df[["lr", "error_pct"]]
    assert warm.index.max() < hot.index.min()  # switched once, and for good
    assert (warm.error_pct >= 80).all()


def test_metrics_rows_and_columns(tmp_path, small_data):
    cfg = tiny()  # 12 iterations at 5 per epoch: epochs 1, 2 and a partial epoch 3
    run = Run(tmp_path, cfg)
    assert train_run(cfg, run, small_data, torch.device("cpu"), progress=False) == "done"
    df = run.read_metrics()
    assert list(df.columns) == METRIC_COLUMNS
    assert list(df.epoch) == [1, 1, 2, 2, 3, 3]
    assert list(df.split) == ["train", "test"] * 3
    assert list(df.iteration) == [5, 5, 10, 10, 12, 12]
    assert set(df.run_id) == {cfg.run_id} and set(df.arch) == {"resnet"} and set(df.depth) == {8}
    assert df.error_pct.between(0, 100).all() and (df.loss > 0).all()
    assert df.elapsed_s.is_monotonic_increasing
    assert run.status()["status"] == "done"
    ckpt = run.load_checkpoint()
    assert ckpt["iteration"] == 12 and ckpt["epoch"] == 3
    # The logged test error is the final model's real error on the whole test split.
    model = build_model("resnet", 8, in_channels=1)
    model.load_state_dict(ckpt["model"])
    loss, err = evaluate(model, small_data)
    assert df.error_pct.iloc[-1] == pytest.approx(err) and df.loss.iloc[-1] == pytest.approx(loss)


def test_same_seed_gives_identical_metrics_and_other_seed_differs(tmp_path, small_data):
    a, b, c = Run(tmp_path / "a", tiny()), Run(tmp_path / "b", tiny()), Run(tmp_path / "c", tiny(seed=1))
    for run in (a, b, c):
        train_run(run.cfg, run, small_data, torch.device("cpu"), progress=False)
    pd.testing.assert_frame_equal(metrics_without_time(a), metrics_without_time(b))
    assert not metrics_without_time(a).loss.equals(metrics_without_time(c).loss)


def stop_after_the_epoch_2_checkpoint(cfg: RunConfig, run: Run, data, monkeypatch) -> None:
    """Train `run` until its epoch-2 checkpoint is written, then stop it there (a KeyboardInterrupt)."""
    real_save = Run.save_checkpoint
    saves = []

    def save_then_stop(self, state):
        real_save(self, state)
        saves.append(state["epoch"])
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Run, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, run, data, torch.device("cpu"), progress=False)
    monkeypatch.setattr(Run, "save_checkpoint", real_save)


def test_resumed_run_equals_uninterrupted_run(tmp_path, small_data, monkeypatch):
    cfg = tiny(iterations=17, depth=14)
    whole = Run(tmp_path / "whole", cfg)
    train_run(cfg, whole, small_data, torch.device("cpu"), progress=False)

    cut = Run(tmp_path / "cut", cfg)
    stop_after_the_epoch_2_checkpoint(cfg, cut, small_data, monkeypatch)
    assert cut.status()["status"] == "interrupted"
    assert cut.read_metrics().epoch.max() == 2

    assert train_run(cfg, cut, small_data, torch.device("cpu"), progress=False) == "done"
    pd.testing.assert_frame_equal(metrics_without_time(whole), metrics_without_time(cut))
    for k, v in whole.load_checkpoint()["model"].items():
        assert torch.equal(v, cut.load_checkpoint()["model"][k]), k


def test_a_resume_on_changed_ground_says_so_in_one_line_and_is_recorded(tmp_path, small_data, monkeypatch):
    """A run resumed with another thread count (or torch, CPU, device) than its last session's goes on,
    with one note saying what changed and that it is no longer bit-identical; an unchanged resume says
    nothing of the kind, and a value an old record lacks is no change."""
    from study.runstore import resumed_elsewhere

    cfg = tiny()
    run = Run(tmp_path, cfg)
    stop_after_the_epoch_2_checkpoint(cfg, run, small_data, monkeypatch)
    record = json.loads(run.config_path.read_text())
    threads = record["provenance"]["threads"]
    record["provenance"]["threads"] = threads + 3  # as if its first session had had more threads
    run.config_path.write_text(json.dumps(record))
    log = []
    assert train_run(cfg, run, small_data, torch.device("cpu"), progress=False, log=log.append) == "done"
    notes = [line for line in log if "note: resumed on changed ground" in line]
    assert notes == [f"{cfg.run_id}: note: resumed on changed ground (threads {threads + 3} -> {threads}): it goes on, "
                     "but is no longer bit-identical to an uninterrupted run (results are exact for one device, torch "
                     "and thread count); config.json's `resumed` records it"], log
    assert json.loads(run.config_path.read_text())["provenance"]["resumed"][-1]["threads"] == threads

    again = Run(tmp_path / "again", cfg)  # the same ground: no note
    stop_after_the_epoch_2_checkpoint(cfg, again, small_data, monkeypatch)
    log.clear()
    assert train_run(cfg, again, small_data, torch.device("cpu"), progress=False, log=log.append) == "done"
    assert any("resuming from its checkpoint" in line for line in log)
    assert not any("changed ground" in line for line in log), log

    cpu = {"device": "cpu", "cpu": "AMD EPYC", "cpu_capability": "AVX512", "threads": 1, "torch_version": "2.14.1"}
    assert resumed_elsewhere(cpu, {**cpu, "torch_version": "2.11.0", "cpu_capability": "AVX2"}) == (
        "CPU kernels AVX512 -> AVX2, torch 2.14.1 -> 2.11.0")
    assert resumed_elsewhere({"device": "cpu"}, cpu) is None  # a record from before these were kept
    gpu = {"device": "cuda", "device_name": "NVIDIA H100", "cpu": "AMD EPYC", "threads": 16}
    assert resumed_elsewhere(gpu, {**gpu, "cpu": "Intel Xeon", "threads": 8}) is None  # the host does not count
    assert resumed_elsewhere(gpu, {**gpu, "device_name": "NVIDIA H200"}) == "device NVIDIA H100 -> NVIDIA H200"


@pytest.mark.parametrize("iterations", [12, 10])  # the last step mid-epoch (5 per epoch), or an epoch's last
def test_a_stop_at_the_runs_last_step_resumes_to_the_uninterrupted_runs_end(tmp_path, small_data, iterations):
    """A signal during the run's last step: a mid-epoch checkpoint at the last iteration, `interrupted`. The
    same command then closes that epoch (evaluates, logs, probes) and ends `done` with exactly the metrics,
    final errors and layer responses of the uninterrupted run, not with the epoch before's."""
    cfg = tiny(iterations=iterations)
    whole = Run(tmp_path / "whole", cfg)
    assert train_run(cfg, whole, small_data, torch.device("cpu"), progress=False) == "done"

    cut, stop = Run(tmp_path / "cut", cfg), StopFlag()
    steps = train_steps_of(cfg, cut, small_data, torch.device("cpu"), progress=False, stop=stop)
    with pytest.raises(StopRequested):
        for done in range(iterations):
            next(steps)
            if done == iterations - 2:  # the signal arrives during the last step
                stop.signum = signal.SIGTERM
    assert cut.status()["status"] == "interrupted" and cut.status()["iteration"] == iterations
    assert train_run(cfg, cut, small_data, torch.device("cpu"), progress=False) == "done"
    pd.testing.assert_frame_equal(metrics_without_time(whole), metrics_without_time(cut))
    pd.testing.assert_frame_equal(pd.read_parquet(whole.dir / "responses.parquet"), pd.read_parquet(cut.dir / "responses.parquet"))
    assert {k: cut.status()[k] for k in ("status", "iteration", "train_error", "eval_error")} == {
        k: whole.status()[k] for k in ("status", "iteration", "train_error", "eval_error")}


def test_a_run_killed_after_its_last_checkpoint_is_finished_by_the_next_session(tmp_path, small_data):
    """A kill after the last epoch's checkpoint, during the layer-response probe: status still `running`, no
    responses. The next session writes what it had left (responses, `done` with the final errors), and
    trains nothing."""
    cfg = tiny(iterations=10)
    whole = Run(tmp_path / "whole", cfg)
    assert train_run(cfg, whole, small_data, torch.device("cpu"), progress=False) == "done"
    (whole.dir / "responses.parquet").unlink()
    whole.set_status("running", iteration=10, epoch=2)
    before = metrics_without_time(whole)
    assert train_run(cfg, whole, small_data, torch.device("cpu"), progress=False) == "done"
    pd.testing.assert_frame_equal(metrics_without_time(whole), before)
    last = before.groupby("split").error_pct.last()
    assert (whole.status()["train_error"], whole.status()["eval_error"]) == (last["train"], last["test"])
    assert len(pd.read_parquet(whole.dir / "responses.parquet")) > 0


def test_a_resumed_session_is_recorded_and_the_runs_table_names_each_sessions_cpu_and_commit(
        tmp_path, small_data, monkeypatch):
    """A run stopped after its epoch-2 checkpoint (iteration 10) and resumed on another CPU from a tree with
    uncommitted changes: config.json keeps the first session's record and adds the second's, from iteration
    10; the report's runs table and a page's runs block name both CPUs and the dirty commit from iteration
    10 on; `study status` counts both machines; publish leaves the run out as dirty. A run trained in one
    go records no later session."""
    import study.runstore
    from study.analysis import pages, report
    from study.analysis.load import RunData, studies
    from study.publish import publish

    cfg = tiny(iterations=15)
    cut = Run(tmp_path / "runs", cfg)
    monkeypatch.setattr(study.runstore, "tree_is_dirty", lambda: False)  # whatever this checkout's state
    stop_after_the_epoch_2_checkpoint(cfg, cut, small_data, monkeypatch)
    first = json.loads(cut.config_path.read_text())["provenance"]
    assert "resumed" not in first and first["git_dirty"] is False

    monkeypatch.setattr(study.runstore, "cpu_model", lambda: "Other CPU")
    monkeypatch.setattr(study.runstore, "tree_is_dirty", lambda: True)
    assert train_run(cfg, cut, small_data, torch.device("cpu"), progress=False) == "done"
    prov = json.loads(cut.config_path.read_text())["provenance"]
    assert {k: v for k, v in prov.items() if k != "resumed"} == first  # the first session's record, as it was
    (later,) = prov["resumed"]
    assert (later["from_iteration"], later["cpu"], later["git_dirty"]) == (10, "Other CPU", True)
    assert later["git_commit"] == first["git_commit"] and later["device"] == "cpu"
    # The same record as the first session's, extras included (its step, CPU path and class count).
    assert (later["step"], later["classes"], later["processes"]) == (first["step"], first["classes"], first["processes"])
    assert later["cpu_path"]["name"] == first["cpu_path"]["name"] and later["cpu_path"]["chosen"] == "resumed"

    data = RunData.load(tmp_path / "runs")
    row = report.run_table(data).iloc[0]
    first_cpu, other_cpu = study.runstore.cpu_label(first), study.runstore.cpu_label(later)
    assert row["device"] == f"cpu: {first_cpu}; from iteration 10: cpu: {other_cpu}", row["device"]
    commit = first["git_commit"][:10]
    assert row["git commit"] == f"{commit}; from iteration 10: {commit} (dirty)", row["git commit"]
    (block_row,) = pages.runs_rows(data, studies(data.runs)[0])[2:]
    assert f"| {first_cpu}; from iteration 10: {other_cpu} |" in block_row, block_row
    assert f"| {commit[:7]}; from iteration 10: {commit[:7]} (dirty) |" in block_row, block_row
    assert {(m.kind, m.name) for m in study.runstore.trained_on(cut.dir)} == {("cpu", first_cpu), ("cpu", other_cpu)}
    with pytest.raises(RunStoreError, match="1 trained from an uncommitted tree"):
        publish(tmp_path / "runs", tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out").exists()

    monkeypatch.undo()
    whole = Run(tmp_path / "whole", cfg)
    train_run(cfg, whole, small_data, torch.device("cpu"), progress=False)
    assert "resumed" not in json.loads(whole.config_path.read_text())["provenance"]


def test_warmup_s_counts_the_first_step_at_each_batch_size_and_survives_a_resume(tmp_path, small_data, monkeypatch):
    """`warmup_s` is the part of `elapsed_s` spent on one-time work: the first step at each batch
    size in a process (where --compile compiles). Here that step sleeps 0.4 s and every other one
    0.05 s; a resume (a new process would compile again) adds its own first steps to the
    checkpoint's warm-up rather than starting from 0."""
    import study.train

    cfg = tiny(iterations=16, batch_size=48)  # 320 images: 6 steps of 48 and one of 32 per epoch
    real_step = study.train.step.sgd_step
    seen, steps = set(), []

    def slow_first_step(*args, **kwargs):
        size = len(args[3])
        time.sleep(0.05 if size in seen else 0.4)
        seen.add(size)
        steps.append(size)
        if len(steps) == 9:
            raise KeyboardInterrupt  # after the epoch-1 checkpoint
        return real_step(*args, **kwargs)

    monkeypatch.setattr(study.train.step, "sgd_step", slow_first_step)
    run = Run(tmp_path, cfg)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, run, small_data, torch.device("cpu"), progress=False)
    first = run.read_metrics()
    assert list(first.columns) == METRIC_COLUMNS and 0.8 <= first.warmup_s.iloc[-1] < first.elapsed_s.iloc[-1]
    seen.clear()  # a new process: its first steps warm up again
    assert train_run(cfg, run, small_data, torch.device("cpu"), progress=False) == "done"
    df = run.read_metrics()
    warm, elapsed = df.warmup_s.iloc[-1], df.elapsed_s.iloc[-1]
    assert warm >= 0.8 + 0.8  # both batch sizes, in each of the two processes
    assert df.warmup_s.is_monotonic_increasing and (df.warmup_s <= df.elapsed_s).all()
    assert elapsed - warm >= 0.05 * (16 - 4) * 0.9  # the other steps are training, not warm-up


def test_rows_past_the_checkpoint_are_redone_not_duplicated(tmp_path, small_data, monkeypatch):
    """A kill between writing an epoch's rows and its checkpoint leaves extra rows: resuming drops
    and redoes them, so no (epoch, split) row is missing or duplicated."""
    cfg = tiny()
    whole = Run(tmp_path / "whole", cfg)
    train_run(cfg, whole, small_data, torch.device("cpu"), progress=False)

    run = Run(tmp_path / "killed", cfg)
    real_save = Run.save_checkpoint

    def save_then_stop(self, state):
        real_save(self, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, run, small_data, torch.device("cpu"), progress=False)
    monkeypatch.setattr(Run, "save_checkpoint", real_save)
    # Epoch 2's rows reached disk, its checkpoint did not.
    run.write_metrics(whole.read_metrics().query("epoch <= 2").to_dict("records"))
    assert run.load_checkpoint()["epoch"] == 1

    train_run(cfg, run, small_data, torch.device("cpu"), progress=False)
    pd.testing.assert_frame_equal(metrics_without_time(whole), metrics_without_time(run))


@pytest.mark.parametrize("saves_before", [0, 1])
def test_a_ctrl_c_that_stops_a_checkpoint_being_written_records_where_the_run_will_resume(
        tmp_path, small_data, monkeypatch, saves_before):
    """A second Ctrl-C while the first one's checkpoint is written (here: a save interrupted before it
    wrote) leaves the last checkpoint as it was: status.json says the run stands there (0 with none), not
    at the iteration it had reached, and the run resumes from there."""
    cfg = tiny()
    run = Run(tmp_path, cfg)
    real_save, saves = Run.save_checkpoint, []

    def save(self, state):
        if len(saves) == saves_before:
            raise KeyboardInterrupt
        real_save(self, state)
        saves.append(state["iteration"])

    monkeypatch.setattr(Run, "save_checkpoint", save)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, run, small_data, torch.device("cpu"), progress=False)
    status = run.status()
    resumes_at = saves[-1] if saves else 0
    assert status["status"] == "interrupted" and status["iteration"] == resumes_at
    assert status["epoch"] == (1 if saves else 0)
    assert (run.load_checkpoint() or {"iteration": 0})["iteration"] == resumes_at


def test_run_all_skips_finished_runs(tmp_path):
    cfg = RunConfig(arch="plain", depth=8, dataset="fashion-mnist-mini", iterations=3, batch_size=32)
    log = []
    assert run_all([cfg], tmp_path, device="cpu", progress=False, log=log.append) == {cfg.run_id: "done"}
    mtime = (tmp_path / cfg.run_id / "metrics.parquet").stat().st_mtime_ns
    assert run_all([cfg], tmp_path, device="cpu", progress=False, log=log.append) == {cfg.run_id: "done"}
    assert (tmp_path / cfg.run_id / "metrics.parquet").stat().st_mtime_ns == mtime
    assert "skipped" in log[-1]


def test_without_a_progress_bar_epochs_are_logged_at_most_once_a_minute(tmp_path, small_data, monkeypatch):
    """No progress bar: the first and the last epoch are logged, and those between at most every
    EPOCH_LINE_EVERY_S seconds (a log shows the run is alive without a line per second)."""
    import study.train

    cfg = RunConfig(arch="plain", depth=8, iterations=20, batch_size=48)  # 7 steps an epoch: 3 epochs
    for every, expected in ((3600.0, [1, 3]), (0.0, [1, 2, 3])):
        monkeypatch.setattr(study.train.loop, "EPOCH_LINE_EVERY_S", every)
        lines = []
        train_run(cfg, Run(tmp_path / str(every), cfg), small_data, torch.device("cpu"), progress=False,
                  log=lines.append)
        epochs = [int(line.split("epoch ")[1].split(",")[0]) for line in lines if ": epoch " in line]
        assert epochs == expected, lines
    assert lines[-1].startswith(f"{cfg.run_id}: epoch 3, iteration 20 of 20: train error ")
    # Each line but the last says about how long the run has left, at its speed so far, as `study status` does.
    from study.runstore import duration, recent_speed

    metrics = Run(tmp_path / "0.0", cfg).read_metrics()
    for line in lines[:-1]:
        iteration = int(line.split("iteration ")[1].split(" of")[0])
        seconds, steps = recent_speed(metrics[metrics["iteration"] <= iteration])
        assert line.endswith(f" s, about {duration(seconds / steps * (20 - iteration))} left"), line
    assert lines[-1].endswith(" s") and "left" not in lines[-1]


def whole_and_stopped(tmp_path, cfg: RunConfig, data, steps_before_stop: int) -> tuple[Run, Run]:
    """`cfg` trained uninterrupted, and again stopped by a SIGTERM after `steps_before_stop` + 1 steps
    (its mid-epoch checkpoint written, StopRequested raised)."""
    whole = Run(tmp_path / "whole", cfg)
    train_run(cfg, whole, data, torch.device("cpu"), progress=False)
    cut, stop = Run(tmp_path / "cut", cfg), StopFlag()
    steps = train_steps_of(cfg, cut, data, torch.device("cpu"), progress=False, stop=stop)
    for _ in range(steps_before_stop):
        next(steps)
    stop.signum = signal.SIGTERM
    with pytest.raises(StopRequested):
        next(steps)
    return whole, cut


#: What a checkpoint held before `study/train.py` became the `study.train` package (commit d9b7c3f):
#: the keys of its `checkpoint` closure, in order, and of a CIFAR feed's interrupted epoch.
PRE_PACKAGE_KEYS = ("model", "optimizer", "generator", "schedule", "iteration", "epoch", "elapsed_s", "warmup_s",
                    "warming_up", "metrics", "partial_epoch")
PRE_PACKAGE_PARTIAL_KEYS = ("order", "pos", "seen", "loss_sum", "wrong", "first_bad")


def test_a_mid_epoch_checkpoint_in_the_pre_package_format_resumes_exactly(tmp_path, small_data):
    """The checkpoint format is the one runs wrote before the restructure, key for key, and a
    mid-epoch checkpoint laid out as they wrote it resumes to the uninterrupted run's metrics and
    weights. (Checked across versions by hand too: a run SIGTERMed under d9b7c3f resumed under the
    package to the uninterrupted metrics exactly.)"""
    cfg = tiny(iterations=13, depth=8, seed=5)
    whole, cut = whole_and_stopped(tmp_path, cfg, small_data, 6)  # after the 7th step: mid-epoch 2 (5 an epoch)
    ckpt = cut.load_checkpoint()
    assert tuple(ckpt) == PRE_PACKAGE_KEYS
    assert tuple(ckpt["partial_epoch"]) == PRE_PACKAGE_PARTIAL_KEYS and ckpt["iteration"] == 7
    # Written again as the old closure laid it out, from plain values (not through study.train.checkpoint).
    cut.save_checkpoint({k: ckpt[k] for k in PRE_PACKAGE_KEYS} | {"partial_epoch": {k: ckpt["partial_epoch"][k]
                                                                             for k in PRE_PACKAGE_PARTIAL_KEYS}})

    assert train_run(cfg, cut, small_data, torch.device("cpu"), progress=False) == "done"
    pd.testing.assert_frame_equal(metrics_without_time(whole), metrics_without_time(cut))
    for k, v in whole.load_checkpoint()["model"].items():
        assert torch.equal(v, cut.load_checkpoint()["model"][k]), k


def test_a_run_stopped_after_an_epochs_last_step_resumes_exactly(tmp_path, small_data):
    """A signal on the last step of an epoch leaves a mid-epoch checkpoint with no batch left: the
    resumed run ends that epoch at once, logging the rate of its last step, and equals the
    uninterrupted run (it used to fail with an unbound learning rate, and every retry with it)."""
    cfg = tiny(iterations=12, seed=4)
    whole, cut = whole_and_stopped(tmp_path, cfg, small_data, 4)  # after the 5th step: the last of epoch 1
    assert cut.load_checkpoint()["partial_epoch"]["pos"] == len(small_data.train.labels)

    assert train_run(cfg, cut, small_data, torch.device("cpu"), progress=False) == "done"
    pd.testing.assert_frame_equal(metrics_without_time(whole), metrics_without_time(cut))


def test_fp32_is_ieee_not_tf32_in_training_and_probing_and_the_callers_settings_come_back(tmp_path, monkeypatch):
    """PyTorch lets cuDNN compute fp32 convolutions in TF32 (a 10-bit mantissa) on Ampere and later GPUs by
    default; the paper's fp32 is IEEE. Training (`run_all`) and `study probe` turn TF32 off while they work
    (process-wide flags, so set on every device; on a CPU they change nothing) and give the caller's settings
    back when they return, as a notebook would want."""
    import study.probes
    from study.cli import main

    from helpers import run_all

    def tf32() -> tuple[bool, bool]:
        return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32

    for flags in (torch.backends.cudnn, torch.backends.cuda.matmul):
        monkeypatch.setattr(flags, "allow_tf32", True)  # PyTorch's cuDNN default; restored after the test
    seen = []
    real_write = Run.write_metrics
    monkeypatch.setattr(Run, "write_metrics", lambda self, rows: (seen.append(("train", tf32())), real_write(self, rows)))
    assert run_all([tiny(iterations=6)], tmp_path / "runs", device="cpu", progress=False, log=lambda line: None) == {
        tiny(iterations=6).run_id: "done"}
    assert tf32() == (True, True)  # the caller's, back
    real_record = study.probes.record_responses
    monkeypatch.setattr(study.probes, "record_responses",
                        lambda *a, **k: (seen.append(("probe", tf32())), real_record(*a, **k))[1])
    assert main(["probe", "--runs-dir", str(tmp_path / "runs"), "--device", "cpu", "--max-images", "20"]) == 0
    assert tf32() == (True, True)
    assert {kind for kind, _ in seen} == {"train", "probe"} and all(flags == (False, False) for _, flags in seen), seen
