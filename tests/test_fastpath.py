"""The fast path keeps every run an independent run: concurrent runs equal runs trained alone, and
bf16 stays within seed noise of fp32."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from study.cli import main
from study.config import RunConfig
from study.runstore import Run, list_runs
from helpers import TIMING_COLUMNS
from helpers import train_run

from conftest import make_small_data


def all_metrics(runs_dir) -> pd.DataFrame:
    frames = [run.read_metrics() for run in list_runs(runs_dir)]
    return pd.concat(frames, ignore_index=True).drop(columns=TIMING_COLUMNS)


def test_runs_trained_concurrently_equal_runs_trained_alone(tmp_path, capfd):
    """K=2 processes share the list, and the CPU's threads; the metrics of all 3 runs equal, exactly,
    those of one process training them one after another with as many threads as each of the two had
    (each run is the same code on its own seed and data order; CPU float results do not depend on
    which process computes them)."""
    args = ["run", "--arch", "resnet", "--depth", "8", "--seeds", "0-2", "--iterations", "3", "--batch-size", "16", "--device", "cpu"]
    threads = torch.get_num_threads()
    share = max(1, threads // 2)
    torch.set_num_threads(share)
    try:
        assert main([*args, "--runs-dir", str(tmp_path / "alone"), "--concurrency", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    capfd.readouterr()
    # (--no-wait: the parent does not claim the worker's runs at the end; its summary counts them all the same)
    assert main([*args, "--runs-dir", str(tmp_path / "together"), "--concurrency", "2", "--no-wait"]) == 0
    assert torch.get_num_threads() == threads  # given back
    # The worker process trained some of the runs (it gets the parent's plan, and it can train with it).
    out, err = capfd.readouterr()
    assert out.splitlines()[-1].startswith(f"study: 3 runs in {tmp_path / 'together'}: 3 done, after "), out
    assert "(worker 1) [" in out and "training on cpu" in out.split("(worker 1) [", 1)[1], out + err
    assert f"2 processes share the CPU: {share} thread" in out + err
    threads_recorded = {json.loads((run.dir / "config.json").read_text())["provenance"]["threads"]
                        for run in list_runs(tmp_path / "together")}
    assert threads_recorded == {share}
    assert "Traceback" not in err, err
    alone, together = all_metrics(tmp_path / "alone"), all_metrics(tmp_path / "together")
    assert len(alone) == 6 and alone.run_id.nunique() == 3
    pd.testing.assert_frame_equal(alone, together)


def test_precision_is_part_of_the_run(tmp_path):
    cfg = RunConfig(arch="plain", depth=8, iterations=2, batch_size=16, precision="bf16")
    assert cfg.run_id.endswith("-bf16") and RunConfig(arch="plain", depth=8).run_id.endswith("-s0")
    with pytest.raises(ValueError, match="precision"):
        RunConfig(arch="plain", depth=8, precision="fp8")


@pytest.mark.slow
def test_bf16_is_within_seed_noise_of_fp32(tmp_path):
    """Final training error of ResNet-8 over 4 seeds, bf16 autocast vs fp32: the difference of the
    means is within twice the larger seed spread (plus one point)."""
    data = make_small_data(n_train=2000, n_test=1000)
    finals = {}
    for precision in ("fp32", "bf16"):
        errs = []
        for seed in range(4):
            cfg = RunConfig(arch="resnet", depth=8, iterations=150, batch_size=64, seed=seed, precision=precision)
            run = Run(tmp_path, cfg)
            train_run(cfg, run, data, torch.device("cpu"), progress=False)
            df = run.read_metrics()
            errs.append(df[df.split == "test"].error_pct.iloc[-1])
        finals[precision] = np.array(errs)
    spread = max(finals["fp32"].std(), finals["bf16"].std())
    assert abs(finals["fp32"].mean() - finals["bf16"].mean()) <= 2 * spread + 1.0, finals


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, small_data):
    """--compile keeps the protocol: same rows, errors equal up to float reassociation in fused kernels."""
    cfg = RunConfig(arch="resnet", depth=8, iterations=10, batch_size=64)
    eager, compiled = Run(tmp_path / "eager", cfg), Run(tmp_path / "compiled", cfg)
    train_run(cfg, eager, small_data, torch.device("cpu"), progress=False)
    train_run(cfg, compiled, small_data, torch.device("cpu"), progress=False, compile=True)
    a, b = eager.read_metrics(), compiled.read_metrics()
    assert list(a.epoch) == list(b.epoch)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-3)
    # The checkpoint of a compiled run is a plain state_dict: it loads into an eager model.
    assert not any(k.startswith("_orig_mod") for k in compiled.load_checkpoint()["model"])


@pytest.mark.slow  # a process that compiles: 11-13 s on 2 cores
def test_compile_on_a_cpu_says_nothing_of_cuda(tmp_path):
    """`--compile --device cpu` where the CUDA toolkit is installed but no GPU (torch then says "No
    CUDA runtime is found, using CUDA_HOME=..." as inductor loads its C++ tools): no stray warning."""
    proc = subprocess.run(
        [sys.executable, "-m", "study", "run", "--arch", "plain", "--depth", "8", "--iterations", "2", "--batch-size",
         "16", "--compile", "--device", "cpu", "--no-progress", "--runs-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CUDA" not in proc.stderr, proc.stderr


def test_one_process_compiles_every_net_of_a_grid(capfd):
    """A grid trained with --compile in one process compiles one graph per net and batch size: more
    than torch's default limit of 8, past which later runs would silently train eagerly. Twelve
    graphs of one forward (12 input widths) all compile."""
    from study.train.step import compile_model

    torch.manual_seed(0)
    for width in range(1, 13):
        module = torch.nn.Sequential(torch.nn.Linear(width, 3))
        x = torch.randn(4, width)
        torch.testing.assert_close(compile_model(module, torch.device("cpu"))(x), module(x))
    err = capfd.readouterr().err
    assert "recompile_limit" not in err and "cache_size_limit" not in err, err
