"""On a CPU, `study run` takes the fastest layout and compilation of a run's step by measurement
(`study.train.cpupath`): the decision rule, the cache that makes the same command train the same
way twice (to identical metrics), the path a run records and keeps when it resumes, and the one-line
notes on bf16."""

import json

import pandas as pd
import pytest
import torch

import study.train.cpupath as cpupath
from helpers import TIMING_COLUMNS, train_run
from study.cli import main
from study.config import RunConfig
from study.runstore import Run
from study.train import ExecutionPlan, Session, train_steps
from study.train.distributed import SINGLE


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A cache of this test's own, and the bf16 note sayable again."""
    monkeypatch.setenv("STUDY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpupath, "_said", set())
    return tmp_path / "cache"


def test_a_path_is_taken_when_its_one_time_cost_pays_at_the_runs_length():
    ms = {"eager": 100.0, "channels-last": 98.0, "compiled": 80.0, "channels-last-compiled": 85.0}
    onetime = {"eager": 0.1, "channels-last": 0.1, "compiled": 60.0, "channels-last-compiled": 30.0}
    # 1,000 steps: compiling (60 s) costs more than 20 ms a step saves (20 s); channels-last gains only 2%.
    assert cpupath.decide(ms, onetime, 1_000) == "eager"
    # 4,000 steps: channels-last-compiled saves 60 s for 30 s, compiled 80 s for 60 s: nearly equal, the
    # lower total wins, and both beat eager by more than the margin.
    assert cpupath.decide(ms, onetime, 4_000) == "channels-last-compiled"
    assert cpupath.decide(ms, onetime, 100_000) == "compiled"
    # Within the margin, eager stays.
    assert cpupath.decide({"eager": 100.0, "channels-last": 96.0}, {}, 10_000) == "eager"
    # Without eager among the candidates (--compile), the first is the reference.
    assert cpupath.decide({"compiled": 100.0, "channels-last-compiled": 90.0}, {}, 10_000) == "channels-last-compiled"


def _run(runs_dir, *extra):
    return main(["run", "--arch", "resnet", "--depth", "8", "--iterations", "20", "--dataset", "fashion-mnist-mini",
                 "--runs-dir", str(runs_dir), "--no-progress", *extra])


@pytest.mark.slow  # two measured runs, 14-25 s: the default run stays under 10 minutes
def test_the_same_command_twice_trains_the_same_path_to_identical_metrics(tmp_path, monkeypatch, capsys, cache_dir):
    """The first command measures the paths and caches what it measured; the second reads the cache,
    takes the same path and trains to the same metrics."""
    monkeypatch.setattr(cpupath, "PROBE_MIN_ITERATIONS", 10)  # a short run measured as a long one would be
    # One warm-up step (it compiles) and one timed step per path: what is measured matters here, not how well.
    monkeypatch.setattr(cpupath, "WARMUP_STEPS", 1)
    monkeypatch.setattr(cpupath, "ROUNDS", 1)
    monkeypatch.setattr(cpupath, "STEPS_PER_ROUND", 1)
    assert _run(tmp_path / "a") == 0
    first = capsys.readouterr().err
    assert "CPU path" in first and "measured in" in first
    entry = next(iter(json.loads((cache_dir / "cpu-paths.json").read_text()).values()))
    assert set(entry["ms_per_step"]) >= set(cpupath.CPU_PATHS)
    assert _run(tmp_path / "b") == 0
    second = capsys.readouterr().err
    assert "CPU path" in second and "cached" in second and "measured in" not in second
    run_id = RunConfig(arch="resnet", depth=8, iterations=20, dataset="fashion-mnist-mini").run_id
    paths = [json.loads((tmp_path / d / run_id / "config.json").read_text())["provenance"]["cpu_path"] for d in "ab"]
    assert paths[0]["name"] == paths[1]["name"] in cpupath.CPU_PATHS
    assert (paths[0]["chosen"], paths[1]["chosen"]) == ("measured", "cached")
    metrics = [pd.read_parquet(tmp_path / d / run_id / "metrics.parquet").drop(columns=TIMING_COLUMNS) for d in "ab"]
    pd.testing.assert_frame_equal(metrics[0], metrics[1])


def test_the_cached_fastest_path_is_the_one_the_run_trains_with(tmp_path, small_data, monkeypatch):
    """A cache that says channels-last compiled is fastest: the plan for the run is compiled, its
    weights and batches channels-last, and config.json says so."""
    monkeypatch.setattr(cpupath, "PROBE_MIN_ITERATIONS", 10)
    cfg = RunConfig(arch="resnet", depth=8, iterations=12, batch_size=32)
    key = cpupath.cache_key(cfg, tuple(small_data.train.images.shape[1:]), 10, False)
    ms = {"eager": 100.0, "channels-last": 99.0, "compiled": 99.0, "channels-last-compiled": 50.0, "bf16": 60.0}
    (cpupath.cache_path().parent).mkdir(parents=True)
    cpupath.cache_path().write_text(json.dumps({key: {"ms_per_step": ms, "onetime_s": dict.fromkeys(ms, 0.0)}}))
    cpu = torch.device("cpu")
    plan, path = ExecutionPlan().for_run(cfg, cpu, SINGLE, input_shape=tuple(small_data.train.images.shape[1:]),
                                         num_classes=10, recorded=None, iterations_left=12, log=print)
    assert (path.name, path.how, plan.compile, plan.cpu_path) == ("channels-last-compiled", "cached", True, path.name)
    net = plan.trainee(cfg, 10, 1, cpu, SINGLE)
    conv = next(p for p in net.model.parameters() if p.dim() == 4 and p.shape[1] > 1)  # a 16-channel 3x3 kernel
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    lines = []
    assert train_run(cfg, Run(tmp_path, cfg), small_data, cpu, log=lines.append) == "done"
    recorded = json.loads(Run(tmp_path, cfg).config_path.read_text())["provenance"]
    assert recorded["cpu_path"]["name"] == "channels-last-compiled" and recorded["step"] == "compiled"
    assert any("CPU path channels-last-compiled" in line and "2.00x eager's speed" in line for line in lines)


def test_a_resumed_run_keeps_the_path_it_began_with(tmp_path, small_data, monkeypatch):
    """A run begun with --cpu-path channels-last and resumed with auto keeps channels-last (a
    remeasured path could differ); a CPU run begun before paths were recorded keeps eager NCHW."""
    cfg = RunConfig(arch="resnet", depth=8, iterations=12, batch_size=32)
    run = Run(tmp_path, cfg)
    assert run.recorded_cpu_path() is None
    run.prepare("cpu", step="eager", cpu_path=cpupath.CpuPath("channels-last", "given").record())
    assert run.recorded_cpu_path() == "channels-last"
    plan, path = ExecutionPlan().for_run(cfg, torch.device("cpu"), SINGLE, input_shape=(1, 28, 28), num_classes=10,
                                         recorded=run.recorded_cpu_path(), iterations_left=6, log=print)
    assert (path.name, path.how, plan.memory_format(torch.device("cpu"))) == ("channels-last", "resumed", torch.channels_last)
    old = Run(tmp_path / "old", cfg)
    old.prepare("cpu", step="compiled")  # as a run of an earlier version wrote it
    assert old.recorded_cpu_path() == "compiled"


def test_resuming_with_another_cpu_path_is_refused_before_anything_is_written(tmp_path, capsys):
    """A run stopped mid-epoch on channels-last, resumed with --cpu-path eager: one line naming the
    run, its path and the fixes, exit code 2, its files untouched. Resumed with auto, it keeps
    channels-last and trains to the end; once finished, any path skips it."""
    import signal

    from helpers import train_steps_of
    from study.data import load_data
    from study.train import StopFlag, StopRequested

    cfg = RunConfig(arch="resnet", depth=8, iterations=20, dataset="fashion-mnist-mini")
    run, stop = Run(tmp_path, cfg), StopFlag()
    steps = train_steps_of(cfg, run, load_data("fashion-mnist-mini"), torch.device("cpu"), progress=False, stop=stop,
                           cpu_path="channels-last")
    next(steps), next(steps)
    stop.signum = signal.SIGTERM
    with pytest.raises(StopRequested):
        next(steps)
    assert run.has_checkpoint() and run.recorded_cpu_path() == "channels-last"
    before = {p.name: p.read_bytes() for p in run.dir.iterdir()}
    capsys.readouterr()
    assert _run(tmp_path, "--cpu-path", "eager") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and cfg.run_id in err[0] and "began on CPU path channels-last" in err[0], err
    assert "drop --cpu-path" in err[0] and "move its directory" in err[0]
    assert {p.name: p.read_bytes() for p in run.dir.iterdir()} == before
    assert _run(tmp_path) == 0
    assert "CPU path channels-last, kept from the run's first session" in capsys.readouterr().err
    assert run.status()["status"] == "done" and run.recorded_cpu_path() == "channels-last"
    assert _run(tmp_path, "--cpu-path", "eager") == 0  # a finished run is skipped, whatever the path


def test_a_run_that_kept_no_checkpoint_starts_over_on_the_path_given(tmp_path):
    """A run whose first session recorded channels-last but kept no checkpoint (it failed, say, before
    its first epoch ended) starts over: --cpu-path eager is taken and recorded."""
    cfg = RunConfig(arch="resnet", depth=8, iterations=20, dataset="fashion-mnist-mini")
    run = Run(tmp_path, cfg)
    run.prepare("cpu", step="eager", cpu_path=cpupath.CpuPath("channels-last", "given").record())
    run.set_status("failed", iteration=0, error="RuntimeError: compile failed")
    assert _run(tmp_path, "--cpu-path", "eager") == 0
    assert run.status()["status"] == "done" and run.recorded_cpu_path() == "eager"


def test_every_path_trains_the_papers_step(tmp_path, small_data):
    """Layout and compilation change the float rounding, not the step: four paths, five steps each,
    the same losses within float32's rounding."""
    losses = {}
    for name in cpupath.CPU_PATHS:
        cfg = RunConfig(arch="resnet", depth=8, iterations=5, batch_size=32)
        plan = ExecutionPlan(cpu_path=name, compile=cpupath.CPU_PATHS[name][1])
        rows = []
        steps = train_steps(cfg, Run(tmp_path / name, cfg), small_data, plan, Session(torch.device("cpu"), log=rows.append))
        for _ in steps:
            pass
        metrics = pd.read_parquet(Run(tmp_path / name, cfg).metrics_path)
        losses[name] = torch.tensor(metrics["loss"].to_numpy())
        recorded = json.loads(Run(tmp_path / name, cfg).config_path.read_text())["provenance"]["cpu_path"]
        assert recorded == {"name": name, "chosen": "given"}
    for name in cpupath.CPU_PATHS:
        torch.testing.assert_close(losses[name], losses["eager"], rtol=1e-3, atol=1e-4)


def test_the_bf16_notes(monkeypatch):
    """One line, once per process: bf16 is emulated on a CPU without bf16 units; an fp32 run on a
    CPU with them is told that --precision bf16 would use them."""
    lines = []
    monkeypatch.setattr(cpupath, "cpu_flags", lambda: {"avx512f": True, "avx512_bf16": False, "amx_bf16": False})
    for _ in range(2):
        cpupath.precision_note(RunConfig(arch="resnet", depth=8, precision="bf16"), lines.append)
    cpupath.precision_note(RunConfig(arch="resnet", depth=8, iterations=100), lines.append)
    assert len(lines) == 1 and "no bf16 units" in lines[0] and "emulated" in lines[0]
    monkeypatch.setattr(cpupath, "cpu_flags", lambda: {"avx512f": True, "avx512_bf16": True, "amx_bf16": True})
    for _ in range(2):
        cpupath.precision_note(RunConfig(arch="resnet", depth=8, iterations=100), lines.append)
    cpupath.precision_note(RunConfig(arch="resnet", depth=8, precision="bf16"), lines.append)
    assert len(lines) == 2 and "AMX-BF16, AVX-512 BF16" in lines[1] and "--precision bf16 would use them" in lines[1]


def test_a_signal_while_the_paths_are_measured_stops_at_once_and_keeps_nothing(tmp_path, monkeypatch, capsys,
                                                                                cache_dir):
    """A SIGTERM that comes while a run's CPU paths are measured (minutes on a slow CPU) stops the
    command before the next measured step, not after the whole measurement and a first step: exit
    128 + 15, a line that says nothing was kept, no cache entry and no run files. The same command
    starts the run afresh."""
    import os
    import signal

    monkeypatch.setattr(cpupath, "PROBE_MIN_ITERATIONS", 10)
    real, built = cpupath.warmed_step, []

    def signalled(*args, **kwargs):
        built.append(kwargs["compiled"])
        if len(built) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill`, `scancel` or a time limit sends it
        return real(*args, **kwargs)

    monkeypatch.setattr(cpupath, "warmed_step", signalled)
    assert _run(tmp_path) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM; before a run's first step, nothing to keep; run the same command again" in err
    assert "checkpoint written" not in err and "CPU path" not in err
    assert built == [False]  # the first path's warm-up was the last work done
    assert not (cache_dir / "cpu-paths.json").exists()
    run = Run(tmp_path, RunConfig(arch="resnet", depth=8, iterations=20, dataset="fashion-mnist-mini"))
    assert not run.config_path.exists() and not run.has_checkpoint() and not (run.dir / "metrics.parquet").exists()
    assert _run(tmp_path, "--cpu-path", "eager") == 0
    assert run.is_finished()


def test_a_measured_path_says_how_long_the_run_takes_and_emulated_bf16_is_measured_against_fp32(monkeypatch):
    """On a CPU without bf16 units a long bf16 run measures fp32 beside its own paths and says how
    many times faster the paper's precision is here; the path's line gives the steps' time for the
    iterations left (from the measured ms a step)."""
    monkeypatch.setattr(cpupath, "cpu_flags", lambda: {"avx2": True, "avx512_bf16": False, "amx_bf16": False})
    cfg = RunConfig(arch="plain", depth=56, iterations=32_000, dataset="fashion-mnist", precision="bf16")
    ms = {"eager": 16_000.0, "channels-last": 14_000.0, "compiled": 14_500.0, "channels-last-compiled": 13_000.0,
          "fp32": 1_300.0}
    key = cpupath.cache_key(cfg, (1, 28, 28), 10, True)
    cpupath.cache_path().parent.mkdir(parents=True)
    cpupath.cache_path().write_text(json.dumps({key: {"ms_per_step": ms, "onetime_s": dict.fromkeys(ms, 1.0)}}))
    lines = []
    path = cpupath.choose(cfg, "auto", compile=True, input_shape=(1, 28, 28), num_classes=10, recorded=None,
                          iterations_left=20_000, log=lines.append)
    assert path.name == "channels-last-compiled" and path.how == "cached"
    hours = 20_000 * 13.0 / 3600  # 72.2 h
    assert f"about {int(hours)}h{round((hours % 1) * 60):02d}m of steps for the 20,000 iterations left" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("study: emulated bf16 measured against fp32") and "10.0x this path's speed for plain-56" in lines[1]
    # A cache without fp32 beside the bf16 paths (an earlier version's) is measured again, all paths together.
    del ms["fp32"]
    cpupath.cache_path().write_text(json.dumps({key: {"ms_per_step": ms, "onetime_s": dict.fromkeys(ms, 1.0)}}))
    measured = []
    monkeypatch.setattr(cpupath, "probe", lambda cfg, paths, *a, **k: measured.append(paths) or (
        {p: 1000.0 for p in paths}, {p: 0.0 for p in paths}))
    cpupath.choose(cfg, "auto", compile=True, input_shape=(1, 28, 28), num_classes=10, recorded=None,
                   iterations_left=20_000, log=lines.append)
    assert measured == [["compiled", "channels-last-compiled", "fp32"]]
