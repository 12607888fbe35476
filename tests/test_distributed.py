"""DDP through the real launcher: `torchrun --nproc_per_node 2 -m study run ...` on CPU (gloo).

One SGD step from the same seed tells whether two processes computed the single process's gradient:
after one step of SGD with momentum from identical weights, w1 = w0 - lr * (g + wd * w0), so equal
weights after the step mean equal gradients. With `--sync-bn` the DDP run must equal the single
process on the whole global batch; with per-device BN (the default) it must equal the single
process with `--batch-split 2` (BN over each half), and legitimately differ from the first.
"""

import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch

from study.runstore import METRIC_COLUMNS
from helpers import TIMING_COLUMNS, write_small_fashion_mnist

STEP = ["--arch", "resnet", "--depth", "20", "--iterations", "1", "--batch-size", "64", "--device", "cpu",
        "--no-progress", "--dataset", "fashion-mnist"]
RUN = "fashion-mnist-resnet20-A-s0-it1-b64"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def study(runs, *args, processes=1):
    launcher = [sys.executable, "-m", "study"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "study"]
    data = runs.parent / "data"
    proc = subprocess.run([*launcher, "run", *STEP, "--runs-dir", str(runs), "--data-dir", str(data), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def weights(run_dir):
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def assert_equal_weights(a, b, keys, atol=2e-7):
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_small_fashion_mnist(root / "data")
    study(root / "single")
    study(root / "ddp-sync", "--sync-bn", processes=2)
    study(root / "ddp", processes=2)
    study(root / "single-split", "--batch-split", "2")
    return root


def test_sync_bn_ddp_step_equals_the_single_process_step(runs):
    single, ddp = weights(runs / "single" / RUN), weights(runs / "ddp-sync" / RUN)
    assert single.keys() == ddp.keys()
    # Parameters and BN running statistics. The global BN computes its statistics from float64
    # sums, torch's BN in float32 with another formula; a 20-layer net amplifies that rounding in
    # its first layers' gradients (float32 vs float64 gradients of conv1 differ by up to 1% here),
    # so weights agree to 2e-5 (gradients to 2e-4), where per-device BN moves them by 1e-3.
    assert_equal_weights(single, ddp, single, atol=2e-5)
    torch.manual_seed(0)
    from study.models import build_model

    start = build_model("resnet", 20, num_classes=10, in_channels=1).state_dict()
    moved = [k for k in single if k.endswith("conv1.weight") and not torch.allclose(single[k], start[k], atol=1e-6)]
    assert moved, "the step did not change the weights: the comparison would be empty"


def test_per_device_bn_ddp_step_equals_the_split_batch_and_differs_from_sync(runs):
    split_run = RUN + "-bn2"
    assert not (runs / "ddp" / RUN).exists(), "per-device BN must be recorded in the run id"
    ddp, single_split = weights(runs / "ddp" / split_run), weights(runs / "single-split" / split_run)
    # The same float32 BN on the same halves; the running averages are rank 0's half's in both.
    assert_equal_weights(ddp, single_split, ddp)
    params = [k for k in ddp if "running" not in k]
    sync = weights(runs / "ddp-sync" / RUN)
    assert max((ddp[k] - sync[k]).abs().max().item() for k in params) > 50 * 2e-5


def test_per_device_bn_ddp_metrics_equal_the_split_batch_metrics(runs):
    split_run = RUN + "-bn2"
    ddp = pd.read_parquet(runs / "ddp" / split_run / "metrics.parquet").drop(columns=TIMING_COLUMNS)
    single = pd.read_parquet(runs / "single-split" / split_run / "metrics.parquet").drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(ddp, single, rtol=1e-5)  # the same run id computes the same thing


def test_ddp_run_writes_one_consistent_set_of_files_and_metrics(runs):
    run_dir = runs / "ddp-sync" / RUN
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["checkpoint.pt", "config.json", "lock", "metrics.parquet", "responses.parquet", "status.json"]
    )
    provenance = __import__("json").loads((run_dir / "config.json").read_text())["provenance"]
    assert provenance["processes"] == 2 and provenance["backend"] == "gloo" and provenance["sync_bn"] is True
    ddp = pd.read_parquet(run_dir / "metrics.parquet")
    single = pd.read_parquet(runs / "single" / RUN / "metrics.parquet")
    assert list(ddp.columns) == METRIC_COLUMNS
    assert list(ddp["split"]) == ["train", "test"] and list(ddp["iteration"]) == [1, 1]
    # The train row covers the whole global batch (both processes' halves), not rank 0's half.
    pd.testing.assert_series_equal(ddp["error_pct"], single["error_pct"])
    pd.testing.assert_series_equal(ddp["loss"], single["loss"], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_processes_at_one_step_and_resume_is_exact(tmp_path):
    """torchrun forwards SIGTERM to its processes; they agree on a step to stop at, rank 0 writes a
    mid-epoch checkpoint, and the resumed DDP run ends with exactly an uninterrupted one's metrics."""
    import os
    import signal
    import time

    data = write_small_fashion_mnist(tmp_path / "data")
    args = ["run", "--arch", "resnet", "--depth", "20", "--iterations", "120", "--batch-size", "16",
            "--device", "cpu", "--no-progress", "--dataset", "fashion-mnist", "--data-dir", str(data)]

    def launch(runs):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port()), "-m", "study", *args, "--runs-dir", str(runs)]

    whole = subprocess.run(launch(tmp_path / "whole"), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    run_id = "fashion-mnist-resnet20-A-s0-it120-b16-bn2"
    cut = tmp_path / "cut"
    proc = subprocess.Popen(launch(cut), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (cut / run_id / "checkpoint.pt").exists():  # the first epoch (6 steps) is done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    status = __import__("json").loads((cut / run_id / "status.json").read_text())
    assert status["status"] == "interrupted", err
    assert status["iteration"] % 20 == 0 and status["iteration"] < 120  # the agreed step
    resumed = subprocess.run(launch(cut), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = pd.read_parquet(tmp_path / "whole" / run_id / "metrics.parquet").drop(columns=TIMING_COLUMNS)
    b = pd.read_parquet(cut / run_id / "metrics.parquet").drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("auto", "nccl"), ("cuda", "nccl")])
def test_the_process_group_backend_follows_the_device_asked_for(monkeypatch, device, backend):
    """On a machine with GPUs, `--device cpu` under torchrun trains on the CPUs: gloo, no GPU claimed
    (NCCL with the model on the CPU fails); otherwise NCCL on the process's own GPU."""
    import study.train.distributed as distributed

    joined, claimed = [], []
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", claimed.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: joined.append(backend))
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    ddp = distributed.distributed_from_env(device)
    assert (ddp.rank, ddp.world, ddp.local_rank) == (1, 2, 1)
    assert joined == [backend] and claimed == ([] if backend == "gloo" else [1])


@pytest.mark.parametrize("rank,local_rank,expected", [
    (0, 0, [("fetch", True), "barrier", "barrier"]),       # rank 0 fetches first
    (2, 0, ["barrier", ("fetch", True), "barrier"]),       # another node's first process: its data dir may be its own
    (3, 1, ["barrier", "barrier", ("fetch", False)]),      # the rest read what those fetched
])
def test_download_under_torchrun_fetches_one_process_at_a_time(monkeypatch, rank, local_rank, expected):
    """`--download` under torchrun: the processes would all write one archive and unpack it over one another;
    rank 0 fetches first, then each other node's first process, then the rest read without fetching."""
    from types import SimpleNamespace

    import study.train.runner as runner
    from study.config import RunConfig
    from study.train.distributed import Distributed
    from study.train.plan import ExecutionPlan

    events = []

    def load_data(dataset, data_dir, *, holdout, download):
        events.append(("fetch", download))
        return SimpleNamespace(to=lambda dev: SimpleNamespace(train=range(1000)))

    monkeypatch.setattr(runner, "load_data", load_data)
    monkeypatch.setattr(runner, "all_reduce", lambda values, ddp: events.append("barrier"))
    cfg = RunConfig("resnet", 20, dataset="cifar10")
    ddp = Distributed(rank=rank, world=4, local_rank=local_rank)
    datasets = runner._open_data([cfg, cfg], None, ExecutionPlan(download=True), torch.device("cpu"), ddp)
    assert events == expected and list(datasets) == [("cifar10", False)]
    events.clear()
    runner._open_data([cfg], None, ExecutionPlan(download=False), torch.device("cpu"), ddp)
    assert events == [("fetch", False)]  # nothing to fetch: no waiting
