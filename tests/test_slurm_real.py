"""`study run --launcher slurm` against a real SLURM: a one-node cluster (munged, slurmctld, slurmd
on this machine, started by the `slurm_cluster` fixture of tests/slurm_cluster.py; skipped without
SLURM or root). The `study` commands run as a user runs them (subprocesses, SLURM_CONF pointing at
the cluster); jobs train on the embedded data on CPU, one thread each, and their metrics are
compared with the same runs trained locally."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("submitit")

from helpers import TIMING_COLUMNS

TIMEOUT = 240  # seconds any single wait may take on a busy machine
STEPS_PER_EPOCH = 10000 // 64 + 1  # the embedded data: 10000 training images, batch 64 (last batch partial)
RUN = ["--arch", "plain", "--depth", "8", "--batch-size", "64", "--dataset", "fashion-mnist-mini", "--device", "cpu"]
SLURM = ["--launcher", "slurm", "--cpus-per-run", "1", "--time", "10"]


def run_id(seed: int, iterations: int, depth: int = 8) -> str:
    return f"fashion-mnist-mini-plain{depth}-A-s{seed}-it{iterations}-b64"


def study(cwd: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """A `study` command as a user runs it (one thread: the jobs and local runs compute alike)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "study", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def submitted(out: str) -> dict[str, str]:
    """`run id -> job id` lines of `study run --launcher slurm`."""
    return dict(re.findall(r"^(\S+) -> (\S+)$", out, flags=re.M))


def wait_for(predicate, what: str, cluster=None, timeout: float = TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{cluster.logs()}" if cluster else ""))


def wait_gone(cluster, job_ids, timeout: float = TIMEOUT) -> None:
    job_ids = set(job_ids)
    wait_for(lambda: not job_ids & {j for j, _ in cluster.squeue()}, f"jobs {sorted(job_ids)} to leave the queue",
             cluster, timeout)


def statuses(cwd: Path, runs: Path) -> dict[str, tuple[str, str]]:
    """`study status`: run id -> (status, iteration column)."""
    out = study(cwd, "status", "--runs-dir", str(runs)).stdout
    return {m[0]: (m[1], m[2]) for m in re.findall(r"^(\S+-b64)\s+(\S+)\s+(\S+)", out, flags=re.M)}


def metrics(runs: Path, rid: str) -> pd.DataFrame:
    return pd.read_parquet(runs / rid / "metrics.parquet").drop(columns=TIMING_COLUMNS)


def job_logs(runs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted((runs / "_slurm").glob("*_log.*")))


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    """The same runs trained locally, uninterrupted, on demand: local_runs(iterations, *seeds) -> runs dir."""
    root = tmp_path_factory.mktemp("local")
    done: set[tuple[int, str]] = set()

    def train(iterations: int, seeds: str, depth: int = 8) -> Path:
        runs = root / "runs"
        if (iterations, seeds, depth) not in done:
            argv = [a if a != "8" else str(depth) for a in RUN]
            study(root, "run", *argv, "--iterations", str(iterations), "--seeds", seeds, "--runs-dir", str(runs))
            done.add((iterations, seeds, depth))
        return runs

    return train


def test_submit_one_task_per_run_and_train_as_locally(slurm_cluster, local_runs, tmp_path):
    """One array task per unfinished run; squeue lists them; they finish `done` with the metrics of
    the same runs trained locally."""
    runs = tmp_path / "runs"
    argv = ["run", *RUN, "--iterations", "6", "--seeds", "0,1", "--runs-dir", str(runs), *SLURM]
    out = study(tmp_path, *argv).stdout
    jobs = submitted(out)
    assert set(jobs) == {run_id(0, 6), run_id(1, 6)}, out
    array = {j.split("_")[0] for j in jobs.values()}
    assert len(array) == 1 and sorted(j.split("_")[1] for j in jobs.values()) == ["0", "1"], out
    queued = {j for j, _ in slurm_cluster.squeue()}
    # A task may be over already, but not both before squeue is asked (each imports torch, trains, evaluates).
    assert queued & set(jobs.values()), (queued, jobs)
    for rid, job in jobs.items():
        assert json.loads((runs / rid / "slurm_job.json").read_text())["job_id"] == job
    ref = local_runs(6, "0,1")  # the reference, trained while the jobs run
    wait_gone(slurm_cluster, jobs.values())
    assert statuses(tmp_path, runs) == {rid: ("done", "6/6") for rid in jobs}, job_logs(runs)
    for rid in jobs:
        pd.testing.assert_frame_equal(metrics(runs, rid), metrics(ref, rid))
    # Everything finished: nothing to submit.
    assert "nothing to submit" in study(tmp_path, *argv).stdout


@pytest.mark.slow  # the default run's real-SLURM test: test_submit_one_task_per_run_and_train_as_locally
def test_submitting_twice_while_pending_submits_nothing_twice(slurm_cluster, tmp_path):
    """While the node is full (a job holding both CPUs), the runs stay pending; the same command
    again submits nothing, and a third run added to the command is the only one submitted."""
    blocker = slurm_cluster.run("sbatch", "--parsable", "-c", "2", "-o", "/dev/null", "--wrap", "sleep 600").stdout.strip()
    try:
        wait_for(lambda: (blocker, "RUNNING") in slurm_cluster.squeue(), "the blocking job to run", slurm_cluster)
        runs = tmp_path / "runs"
        argv = ["run", *RUN, "--iterations", "6", "--runs-dir", str(runs), *SLURM]
        first = submitted(study(tmp_path, *argv, "--seeds", "0,1").stdout)
        assert set(first) == {run_id(0, 6), run_id(1, 6)}
        assert {(j, "PENDING") for j in first.values()} <= set(slurm_cluster.squeue())
        again = study(tmp_path, *argv, "--seeds", "0,1").stdout
        assert submitted(again) == {} and "nothing submitted" in again, again
        more = study(tmp_path, *argv, "--seeds", "0-2").stdout
        assert set(submitted(more)) == {run_id(2, 6)}, more
        assert sum(1 for j, _ in slurm_cluster.squeue() if j != blocker) == 3
        assert statuses(tmp_path, runs) == {run_id(s, 6): ("queued", "0/6") for s in range(3)}
        for rid, job in first.items():  # the job files still name the first jobs
            assert json.loads((runs / rid / "slurm_job.json").read_text())["job_id"] == job
        slurm_cluster.run("scancel", *first.values(), *submitted(more).values())
    finally:
        slurm_cluster.run("scancel", blocker, check=False)
    wait_gone(slurm_cluster, [blocker])


@pytest.mark.slow  # the default run's real-SLURM test: test_submit_one_task_per_run_and_train_as_locally
def test_scancel_interrupts_and_the_same_command_resumes_exactly(slurm_cluster, local_runs, tmp_path):
    """scancel of a running task: the run is `interrupted` with a mid-epoch checkpoint; the same
    command again submits exactly that run, which resumes and ends equal to an uninterrupted run."""
    runs = tmp_path / "runs"
    iterations = 200  # about 13 s a run on one CPU
    argv = ["run", *RUN, "--iterations", str(iterations), "--seeds", "0,1", "--runs-dir", str(runs), *SLURM]
    jobs = submitted(study(tmp_path, *argv).stdout)
    victim, other = run_id(0, iterations), run_id(1, iterations)
    status_file = runs / victim / "status.json"

    def training() -> bool:
        try:
            return json.loads(status_file.read_text())["status"] == "running"
        except (OSError, ValueError, KeyError):
            return False

    wait_for(training, f"{victim} to start training", slurm_cluster)
    time.sleep(4)  # some steps into the first epoch
    slurm_cluster.run("scancel", jobs[victim])
    wait_gone(slurm_cluster, jobs.values())
    st = json.loads(status_file.read_text())
    assert st["status"] == "interrupted", (st, job_logs(runs))
    assert 0 < st["iteration"] < iterations and st["iteration"] % STEPS_PER_EPOCH, st  # mid-epoch
    assert statuses(tmp_path, runs) == {victim: ("interrupted", f"{st['iteration']}/{iterations}"),
                                        other: ("done", f"{iterations}/{iterations}")}

    out = study(tmp_path, *argv).stdout
    again = submitted(out)
    assert list(again) == [victim] and again[victim] != jobs[victim], out
    wait_gone(slurm_cluster, again.values())
    assert statuses(tmp_path, runs)[victim] == ("done", f"{iterations}/{iterations}"), job_logs(runs)
    log = (runs / "_slurm" / f"{again[victim]}_0_log.err").read_text()
    assert f"{victim}: resuming from its checkpoint at iteration {st['iteration']} of {iterations}" in log, log
    ref = local_runs(iterations, "0")
    pd.testing.assert_frame_equal(metrics(runs, victim), metrics(ref, victim))


@pytest.mark.slow  # the default run's real-SLURM test: test_submit_one_task_per_run_and_train_as_locally
def test_cpus_per_run_reaches_the_task(slurm_cluster, tmp_path):
    """`--cpus-per-run 2`: the array task holds both of the node's CPUs (one process; a 2-process
    run needs --gpus-per-run 2, which trains on GPUs only) and trains its run."""
    runs = tmp_path / "runs"
    argv = ["run", *RUN, "--iterations", "6", "--seed", "0", "--runs-dir", str(runs), "--launcher", "slurm",
            "--cpus-per-run", "2", "--time", "10"]
    [job] = submitted(study(tmp_path, *argv).stdout).values()
    wait_gone(slurm_cluster, [job])
    assert statuses(tmp_path, runs) == {run_id(0, 6): ("done", "6/6")}, job_logs(runs)
    assert slurm_cluster.job_field(job, "NumCPUs") == "2"
    assert slurm_cluster.job_field(job, "NumTasks") == "1"


@pytest.mark.slow
def test_time_limit_signals_checkpoints_requeues_and_finishes_exactly(slurm_cluster, tmp_path):
    """A job whose --time (1 minute, SLURM's least) is shorter than its run: SLURM signals it before
    the limit, it checkpoints mid-epoch and requeues itself, starts again, resumes and finishes with
    the metrics of an uninterrupted run; slurm_job.json counts the requeues."""
    iterations = 700  # about 45 s of training on one CPU: more than the ~30 s a start gets before its signal
    runs = tmp_path / "runs"
    rid = run_id(0, iterations)
    ref_dir = tmp_path / "local"
    ref = subprocess.Popen(  # the uninterrupted run trains meanwhile, on the other CPU
        [sys.executable, "-m", "study", "run", *RUN, "--iterations", str(iterations), "--seed", "0",
         "--runs-dir", str(ref_dir)], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "local.err").open("w"))
    try:
        argv = ["run", *RUN, "--iterations", str(iterations), "--seed", "0", "--runs-dir", str(runs),
                "--launcher", "slurm", "--cpus-per-run", "1", "--time", "1"]
        t0 = time.time()
        [job] = submitted(study(tmp_path, *argv).stdout).values()
        wait_gone(slurm_cluster, [job], timeout=600)
        elapsed = time.time() - t0
        assert statuses(tmp_path, runs)[rid] == ("done", f"{iterations}/{iterations}"), job_logs(runs)
        record = json.loads((runs / rid / "slurm_job.json").read_text())
        restarts = int(slurm_cluster.job_field(job, "Restarts") or 0)
        log = "".join(p.read_text() for p in sorted((runs / "_slurm").glob(f"{job}_0_log.*")))
        resumed = re.findall(rf"{rid}: resuming from its checkpoint at iteration ([\d,]+)", log)
        print(f"time-limit run: {elapsed:.0f} s, requeues {record.get('requeues')}, SLURM restarts {restarts}, "
              f"resumed at {resumed}")
        assert record["requeues"] >= 1 and record["requeues"] == restarts, (record, restarts, log)
        # Each start after a checkpoint resumes from it. A start that SLURM signals before its first step
        # (a slow start-up on a busy machine) keeps nothing, so the start after it may find no checkpoint
        # yet and start anew: at least one start resumed, and no more than the requeues.
        assert re.search(rf"{rid}: stopped by .*?; checkpoint written", log), log
        assert 1 <= len(resumed) <= record["requeues"], (record, resumed, log)
        assert resumed == sorted(resumed, key=lambda i: int(i.replace(",", ""))), resumed
        assert all(int(i.replace(",", "")) % STEPS_PER_EPOCH for i in resumed), resumed  # mid-epoch checkpoints
    finally:
        assert ref.wait(timeout=600) == 0, (tmp_path / "local.err").read_text()
    pd.testing.assert_frame_equal(metrics(runs, rid), metrics(ref_dir, rid))
