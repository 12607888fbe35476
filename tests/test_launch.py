"""`study run --launcher slurm` (study/launch.py): real submitit jobs run by its LocalExecutor (one
process per task, as on a node), interrupted the way SLURM interrupts them, and requeued; the sbatch
script and job files written through submitit's real SlurmExecutor against fake sbatch/srun/squeue;
the DDP environment as SLURM describes it; one-line errors for bad flags."""

import argparse
import contextlib
import io
import os
import re
import signal
import struct
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

submitit = pytest.importorskip("submitit")

from study import launch
from study.cli.args import add_launcher_arguments, parse_time
from study.config import ConfigError, RunConfig
from study.data import DataError, load_data
from study.launch import (
    JOB_FILE,
    SLURM_DIR,
    SUBMIT_LOCK,
    export_distributed_env,
    list_runs_with_queued,
    read_job_file,
    run_status,
    submit,
)
from study.runstore import Run, RunStoreError
from helpers import TIMING_COLUMNS
from test_imagenet import write_image_folder

# 320 training images at batch 64: 5 steps per epoch; 12 steps are epochs of 5, 5 and 2. Depth 8 is
# the smallest 6n+2 net.
CFG = RunConfig(arch="resnet", depth=8, dataset="fashion-mnist", iterations=12, batch_size=64)
TIMEOUT = 180  # seconds any single wait may take on a busy machine


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small real Fashion-MNIST (the embedded subset's first 320 training and 200 test images) as
    raw IDX files, read by the production loader in the job process (no monkeypatching there)."""
    out = tmp_path_factory.mktemp("fashion-mnist")
    full = load_data("fashion-mnist-mini")
    for split, (images_stem, labels_stem), n in (
        (full.train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), 320),
        (full.eval, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), 200),
    ):
        images = split.images[:n, 0].contiguous().numpy()
        labels = split.labels[:n].numpy().astype("uint8")
        (out / images_stem).write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (out / labels_stem).write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return out


def parse(*argv: str, **extra) -> argparse.Namespace:
    """`study run`'s launcher flags as the CLI parses them, plus the other run options submit reads."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_launcher_arguments(parser)
    args = parser.parse_args(["--launcher", "slurm", *argv])
    defaults = dict(device="cpu", data_dir=None, download=False, compile=False, concurrency=None, grid=None)
    for key, value in {**defaults, **extra}.items():
        setattr(args, key, value)
    return args


class RecordingExecutor(submitit.LocalExecutor):
    """submitit's LocalExecutor (each task a process, as srun starts it), keeping the jobs it made.
    Its tasks use one thread each, so that two jobs share 2 cores without oversubscribing them."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.update_parameters(timeout_min=10)
        self.jobs = []

    def _internal_process_submissions(self, delayed_submissions):
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # the job processes inherit this environment
        try:
            jobs = super()._internal_process_submissions(delayed_submissions)
        finally:
            if saved is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        self.jobs += jobs
        return jobs


def wait_for(predicate, what: str, timeout: float = TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def task_pids(job) -> list[int]:
    """The pid of every start of the task, from the line each start logs."""
    return [int(p) for p in re.findall(r"\(pid (\d+)\)", job.stdout() or "")]


def metrics(runs: Path) -> pd.DataFrame:
    return pd.read_parquet(runs / CFG.run_id / "metrics.parquet").drop(columns=TIMING_COLUMNS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One uninterrupted run, submitted as a job and not waited for here (it trains while the
    interrupted one does): (runs dir, job, what submit printed)."""
    runs = tmp_path_factory.mktemp("reference") / "runs"
    ex = RecordingExecutor(runs / SLURM_DIR)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert submit([CFG], str(runs), parse(data_dir=str(data_dir)), executor=ex) == 0
    [job] = ex.jobs
    return runs, job, out.getvalue().splitlines()


def reference_metrics(reference) -> pd.DataFrame:
    runs, job, _ = reference
    assert job.result() == {CFG.run_id: "done"}, job.stderr()
    return metrics(runs)


def test_time_limit_signal_requeues_and_resumes_exactly(tmp_path, reference, data_dir):
    """USR2, what SLURM sends (through submitit's --signal) before the time limit, stops the task
    one step later with a mid-epoch checkpoint; submitit's handler then calls the task's
    checkpoint() and requeues it; the new process resumes, and the finished run's metrics equal
    the uninterrupted run's bit for bit."""
    runs = tmp_path / "runs"
    ex = RecordingExecutor(runs / SLURM_DIR)
    assert submit([CFG], str(runs), parse(data_dir=str(data_dir)), executor=ex) == 0
    [job] = ex.jobs
    run = Run(runs, CFG)

    # (LocalJob._interrupt() signals submitit's local controller, which USR2 kills; SLURM signals
    # the task processes, so that is what this test does.)
    first = wait_for(lambda: task_pids(job), "the task to start")[0]
    wait_for(run.checkpoint_path.exists, "the first end-of-epoch checkpoint")
    os.kill(first, signal.SIGUSR2)
    assert job.result() == {CFG.run_id: "done"}, job.stderr()

    out = job.stdout()
    pids = task_pids(job)
    assert len(pids) == 2 and pids[0] == first and out.count("training on cpu") == 2  # requeued: a new process
    stopped_at = int(re.search(r"stopped by SIGUSR2 at iteration (\d+); checkpoint written", out)[1])
    assert 5 < stopped_at < 10  # the step after the signal, inside epoch 2: a mid-epoch checkpoint
    assert out.count(f"Requeued job {job.job_id}") == 1 and job.stderr().count("Caught signal SIGUSR2") == 1
    assert read_job_file(run)["requeues"] == 1
    assert run.status()["status"] == "done"
    pd.testing.assert_frame_equal(metrics(runs), reference_metrics(reference))  # nothing lost, nothing repeated


def test_submitted_run_finishes_and_is_not_submitted_again(reference, data_dir, capsys):
    df = reference_metrics(reference)
    runs, job, printed = reference
    assert printed[0] == f"{CFG.run_id} -> {job.job_id}"
    assert printed[1].startswith("submitted 1 run as job ")
    run = Run(runs, CFG)
    assert run.status()["status"] == "done" and run.status()["iteration"] == 12
    assert list(df.epoch) == [1, 1, 2, 2, 3, 3] and list(df.split[:2]) == ["train", "test"]
    assert read_job_file(run)["job_id"] == job.job_id and read_job_file(run)["requeues"] == 0
    assert run_status(run)["status"] == "done"
    assert (runs / SLURM_DIR / f"{job.job_id}_0_log.out").exists()  # submitit's logs live under the runs dir

    ex = RecordingExecutor(runs / SLURM_DIR)
    assert submit([CFG], str(runs), parse(data_dir=str(data_dir)), executor=ex) == 0
    assert ex.jobs == []  # finished: nothing submitted
    assert "nothing to submit: all 1 runs are finished" in capsys.readouterr().out


@pytest.fixture
def in_job(monkeypatch, tmp_path):
    """This process as task 0 of a local submitit job, with stand-ins for the handlers submitit
    installs (USR2: checkpoint, requeue and exit 144 as LocalJobEnvironment does; SIGTERM: ignore),
    and `train.run_all` replaced by the training loop's side of a stop: it sends the given signals
    to this process, then stops as the loop does after a step (StopRequested with the flag's
    signal), optionally with one more signal 0.2 s later. Returns (task, calls, set_signals)."""
    import study.launch
    import study.train

    for key, value in dict(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="77", SUBMITIT_LOCAL_NTASKS="1",
                           SUBMITIT_LOCAL_GLOBALID="0", SUBMITIT_LOCAL_LOCALID="0", SUBMITIT_LOCAL_NODEID="0",
                           SUBMITIT_LOCAL_JOB_NUM_NODES="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(study.launch, "PREEMPT_WAIT_S", 0.6)
    calls, plan = [], {}

    def requeue(signum, frame):
        calls.append("requeue")
        raise SystemExit(144)

    def run_all(configs, runs_dir, plan_, *, stop, **kwargs):
        for sig in plan["now"]:
            os.kill(os.getpid(), sig)  # the handler runs here, in this (the main) thread
        calls.append(f"stopped by {signal.Signals(stop.signum).name}")
        if plan.get("late"):
            threading.Timer(0.2, os.kill, (os.getpid(), plan["late"])).start()
        raise study.train.StopRequested(stop.signum)

    monkeypatch.setattr(study.train, "run_all", run_all)
    previous = {signal.SIGUSR2: signal.signal(signal.SIGUSR2, requeue),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *a: calls.append("bypass"))}
    task = study.launch.SlurmTask(CFG, str(tmp_path / "runs"), study.train.ExecutionPlan(device="cpu"))
    yield task, calls, lambda *now, late=None: plan.update(now=now, late=late)
    assert signal.getsignal(signal.SIGUSR2) is requeue  # the task put submitit's handler back
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("now, late, outcome, expected", [
    ((signal.SIGUSR2,), None, SystemExit, ["stopped by SIGUSR2", "requeue"]),  # time limit
    ((signal.SIGUSR2, signal.SIGUSR2), None, SystemExit, ["stopped by SIGUSR2", "requeue"]),  # no escalation
    ((signal.SIGTERM, signal.SIGUSR2), None, SystemExit, ["stopped by SIGTERM", "requeue"]),  # preemption
    ((signal.SIGTERM,), signal.SIGUSR2, SystemExit, ["stopped by SIGTERM", "requeue"]),  # its USR2 comes late
    ((signal.SIGTERM, signal.SIGTERM), None, "stopped", ["stopped by SIGTERM"]),  # scancel: no requeue
    ((signal.SIGINT, signal.SIGINT), None, KeyboardInterrupt, []),  # a person's second Ctrl-C stops at once
])
def test_task_signals_stop_after_a_step_then_requeue(in_job, now, late, outcome, expected):
    """The task's signal plumbing: submitit's requeue runs only after the loop has stopped (and so
    checkpointed), for the time-limit/preemption signal only; SIGTERM and USR2 never escalate."""
    import study.train

    task, calls, send = in_job
    send(*now, late=late)
    started = time.monotonic()
    with pytest.raises(SystemExit if outcome == "stopped" else outcome) as e:
        task()
    assert calls == expected
    if outcome is SystemExit:
        assert e.value.code == 144
    if outcome == "stopped":  # it waited for a USR2 that did not come, then ended as SIGTERM ends a process
        assert e.value.code == 128 + signal.SIGTERM and time.monotonic() - started >= 0.6


def test_a_requeue_submitit_refuses_leaves_the_run_interrupted_not_queued(in_job):
    """More time-limit stops than --slurm-max-timeouts: submitit calls the task's checkpoint() (which records a
    requeue), then requeues nothing ("timed-out too many times"). The record takes the requeue back and says
    why, and `study status` shows the run `interrupted`, not `queued` for a job that will not come; the next
    submission clears it."""
    import study.train

    task, calls, send = in_job
    run = Run(task.runs_dir, CFG)
    run.prepare("cpu")
    run.set_status("interrupted", iteration=7)
    launch._write_job_file(run, job_id="77", requeues=2)
    time.sleep(0.01)

    def refused(signum, frame):  # submitit's handler when the countdown has run out
        task.checkpoint()
        calls.append("not requeued")
        raise submitit.core.utils.UncompletedJobError("Job not requeued because: timed-out too many times.")

    previous = signal.signal(signal.SIGUSR2, refused)
    try:
        send(signal.SIGUSR2)
        with pytest.raises(submitit.core.utils.UncompletedJobError):
            task()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == ["stopped by SIGUSR2", "not requeued"]
    record = read_job_file(run)
    assert record["requeues"] == 2 and record["not_requeued"] == "Job not requeued because: timed-out too many times."
    assert run_status(run)["status"] == "interrupted" and run_status(run)["job_id"] == "77"
    launch._write_job_file(run, job_id="78", requeues=0, not_requeued=None)  # as a new submission writes it
    assert run_status(run)["status"] == "queued"


def test_task_set_up_error_marks_the_run_failed(in_job, monkeypatch):
    import study.train

    task, _, _ = in_job

    def run_all(*args, **kwargs):
        raise DataError("Fashion-MNIST not found; pass --data-dir DIR")

    monkeypatch.setattr(study.train, "run_all", run_all)
    with pytest.raises(DataError):
        task()
    run = Run(task.runs_dir, CFG)
    assert run.status()["status"] == "failed"  # `study status` shows it failed, not queued forever
    assert run.status()["error"] == "DataError: Fashion-MNIST not found; pass --data-dir DIR"


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch, srun and squeue stand-ins on PATH: sbatch answers like SLURM (job 4242, then 4243,
    ...) and keeps each script; squeue prints `squeue.out`; FAKE_SBATCH_ERROR makes sbatch fail."""
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
if [ -n "$FAKE_SBATCH_BEFORE" ]; then eval "$FAKE_SBATCH_BEFORE"; fi
if [ -n "$FAKE_SBATCH_ERROR" ]; then echo "sbatch: error: $FAKE_SBATCH_ERROR" >&2; exit 1; fi
if [ -n "$FAKE_SBATCH_FATAL" ]; then echo "sbatch: fatal: $FAKE_SBATCH_FATAL" >&2; exit 1; fi
n=$(cat {state}/next 2>/dev/null || echo 4242)
echo $((n + 1)) > {state}/next
cp "$1" {state}/sbatch_$n.sh
echo "Submitted batch job $n"
""")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "squeue").write_text(f"#!/bin/sh\ncat {state}/squeue.out 2>/dev/null\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return state


def test_sbatch_array_job_files_and_status(tmp_path, fake_slurm, capsys):
    runs = tmp_path / "runs"
    # 2 GPUs a run, per-device BN: each batch in 2 BN groups (as `study run` records it).
    configs = [RunConfig(arch="plain", depth=20, seed=s, iterations=300, batch_split=2) for s in range(3)]
    finished = Run(runs, configs[0])
    finished.prepare("cpu")
    finished.set_status("done", iteration=300)
    args = parse("--partition", "gpu", "--account", "proj", "--time", "1:30:00", "--gpus-per-run", "2",
                 "--cpus-per-run", "8", "--mem", "16GB", "--slurm-array-parallelism", "1", device="auto", grid="quick")
    assert submit(configs, str(runs), args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"{configs[1].run_id} -> 4242_0", f"{configs[2].run_id} -> 4242_1"]
    assert out[2].startswith(f"submitted 2 runs as job 4242; logs in {runs.absolute() / SLURM_DIR}/")

    script = (fake_slurm / "sbatch_4242.sh").read_text()
    for line in ("--array=0-1%1", "--time=90", "--partition=gpu", "--account=proj", "--mem=16G", "--nodes=1",
                 "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=4", "--signal=USR2@90",
                 "--requeue", "--job-name=study-quick", f"--output={runs.absolute() / SLURM_DIR}/%A_%a_0_log.out"):
        assert f"#SBATCH {line}\n" in script, line
    # Each array task's pickle is one run's task, ready for submitit to run (and requeue).
    task = submitit.helpers.DelayedSubmission.load(runs / SLURM_DIR / "4242_1_submitted.pkl").function
    assert task.cfg == configs[2] and task.runs_dir == str(runs.absolute()) and task.plan.device == "auto"

    # `study status`: the submitted runs are listed (no config.json yet) and read `queued`.
    listed = list_runs_with_queued(runs)
    assert [r.cfg.run_id for r in listed] == [c.run_id for c in configs]
    assert [run_status(r)["status"] for r in listed] == ["done", "queued", "queued"]
    assert run_status(listed[1])["job_id"] == "4242_0"

    # Submitting again while 4242_0 is still queued: only the other run goes (squeue says so).
    (fake_slurm / "squeue.out").write_text("4242_0\n999_3\n")
    assert submit(configs, str(runs), args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"{configs[1].run_id}: already queued or running as job 4242_0, not submitted again",
                       f"{configs[2].run_id} -> 4243"]  # one run: a plain job, not an array
    # And again, with both jobs in the queue: nothing goes, and it says so.
    (fake_slurm / "squeue.out").write_text("4242_0\n4243\n")
    assert submit(configs, str(runs), args) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[-1].startswith("nothing submitted: every unfinished run is already queued")

    # The job starts (its first status write), then is requeued (submitit calls task.checkpoint()).
    run = Run(runs, configs[2])
    time.sleep(0.05)  # file times tick in milliseconds; in a cluster the start is seconds later
    run.prepare("cpu")
    run.set_status("running", iteration=0)
    assert run_status(run) == {**run.status(), "job_id": "4243"}
    resubmission = task.checkpoint()
    assert resubmission.function is task and run_status(run)["status"] == "queued"
    assert read_job_file(run)["requeues"] == 1


def test_cpu_jobs_ask_for_no_gpu(tmp_path, fake_slurm, capsys):
    """`--device cpu` (the quick demo on a CPU partition): the jobs request no GPU."""
    runs = tmp_path / "runs"
    configs = [RunConfig(arch="plain", depth=20, iterations=300)]
    assert submit(configs, str(runs), parse("--partition", "cpu", device="cpu")) == 0
    script = (fake_slurm / "sbatch_4242.sh").read_text()
    assert "#SBATCH --partition=cpu\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
    assert "gpus" not in script and "gres" not in script


def test_decode_gpu_reaches_the_array_tasks_of_imagenet_runs(tmp_path, fake_slurm):
    runs = tmp_path / "runs"
    configs = [RunConfig(arch=a, depth=18, dataset="imagenet", iterations=10) for a in ("plain", "resnet")]
    data = write_image_folder(tmp_path / "imagenet", per_class=(1, 1))
    assert submit(configs, str(runs), parse("--partition", "gpu", device="auto", decode="gpu", data_dir=str(data))) == 0
    task = submitit.helpers.DelayedSubmission.load(runs / SLURM_DIR / "4242_1_submitted.pkl").function
    assert task.cfg == configs[1] and task.plan.decode == "gpu"
    # And CIFAR-style runs refuse it before anything is submitted.
    with pytest.raises(ConfigError, match="--decode applies only to ImageNet"):
        submit([RunConfig(arch="plain", depth=20)], str(tmp_path / "other"), parse(device="auto", decode="gpu"))
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("reason", ["Invalid partition name specified", "Requested node configuration is not available"])
def test_sbatch_refusal_is_one_line(tmp_path, fake_slurm, monkeypatch, reason):
    """A job SLURM refuses: sbatch's reason and the job's options to check (a "node configuration" is
    the job's, not SLURM's own set-up); nothing left behind."""
    monkeypatch.setenv("FAKE_SBATCH_ERROR", f"Batch job submission failed: {reason}")
    with pytest.raises(ConfigError) as e:
        submit([RunConfig(arch="plain", depth=20)], str(tmp_path / "runs"), parse("--partition", "nope"))
    assert str(e.value).startswith(f"sbatch refused the job array: Batch job submission failed: {reason}")
    assert "\n" not in str(e.value) and str(e.value).endswith("check --partition, --account, --qos, --time, --gpus-per-run")
    assert not list((tmp_path / "runs").glob(f"*/{JOB_FILE}"))
    assert not (tmp_path / "runs").exists()  # nor submitit's sbatch script and pickles, nor the runs dir it made


@pytest.mark.parametrize("reason, fix", [
    ("Invalid generic resource (gres) specification", "pass --partition of GPU nodes, or --device cpu to train on the CPUs"),
    ("Unable to process configuration file", "SLURM is not reachable from here: run on a login node of the cluster"),
])
def test_a_refusal_with_a_known_cause_names_its_fix(tmp_path, fake_slurm, monkeypatch, reason, fix):
    """GPUs asked of a cluster without them (the default --device auto on a CPU cluster): --device cpu, not the
    options of the generic fix; a SLURM_CONF naming no file: SLURM's set-up, not the job's options."""
    monkeypatch.setenv("FAKE_SBATCH_ERROR", reason)
    with pytest.raises(ConfigError) as e:
        submit([RunConfig(arch="plain", depth=20)], str(tmp_path / "runs"), parse("--partition", "debug"))
    assert str(e.value).startswith(f"sbatch refused the job array: {reason}; ") and fix in str(e.value)
    assert "\n" not in str(e.value) and "check --partition, --account" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_a_slurm_folder_or_run_folder_that_cannot_be_written_is_refused_before_submitting(tmp_path, fake_slurm, capsys):
    """What the jobs would fail on, found before anything is submitted: one line naming it and the fix, no job,
    no file (a read-only mount or another user's folder fails the same check: a file that cannot be made)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / SLURM_DIR).write_text("not a folder")
    cfg = RunConfig(arch="plain", depth=20)
    with pytest.raises(RunStoreError) as e:
        submit([cfg], str(runs), parse("--partition", "gpu"))
    assert str(e.value) == (f"cannot submit into {runs / SLURM_DIR}/ (the job scripts and logs): {runs / SLURM_DIR} is "
                            "a file, not a directory; make it a folder you can write, or pass another --runs-dir")
    (runs / SLURM_DIR).unlink()
    (runs / cfg.run_id / "lock").mkdir(parents=True)  # no file can be locked there
    with pytest.raises(RunStoreError) as e:
        submit([cfg], str(runs), parse("--partition", "gpu"))
    assert str(e.value).startswith(f"run {cfg.run_id} cannot be written: {runs / cfg.run_id / 'lock'} is a directory; ")
    assert sorted(p.name for p in runs.iterdir()) == [cfg.run_id] and not list(fake_slurm.glob("sbatch_*"))
    # `study run` without SLURM says the same, before any run starts.
    from study.cli import main

    capsys.readouterr()
    assert main(["run", "--arch", "plain", "--depth", "20", "--runs-dir", str(runs), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"study: error: run {cfg.run_id} cannot be written: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in runs.iterdir()) == [cfg.run_id]


def test_a_tensorboard_folder_that_cannot_be_written_is_refused_before_submitting(tmp_path, fake_slurm, monkeypatch):
    """--tensorboard under SLURM: checked as `study run` checks it locally, before any job is submitted; the
    runs dir and submission folder this command made go again."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError) as e:
        submit([RunConfig(arch="plain", depth=20)], str(runs), parse("--partition", "gpu", tensorboard=str(blocker / "tb")))
    assert str(e.value).startswith(f"--tensorboard {blocker / 'tb'} is not a writable directory (")
    assert not runs.exists() and not list(fake_slurm.glob("sbatch_*"))
    # A folder it made for the event files goes again when sbatch then refuses the array, as the runs dir does.
    monkeypatch.setenv("FAKE_SBATCH_ERROR", "Invalid partition name specified")
    with pytest.raises(ConfigError, match="sbatch refused the job array"):
        submit([RunConfig(arch="plain", depth=20)], str(runs), parse("--partition", "gpu", tensorboard=str(runs / "tb" / "x")))
    assert not runs.exists()


def test_a_slurm_that_cannot_work_here_is_named_and_leaves_no_files(tmp_path, fake_slurm, monkeypatch, capsys):
    """sbatch installed but SLURM not set up (Debian's slurm-wlm without a slurm.conf): sbatch's own
    reason and the fix, one line; a submission folder that was there keeps its files and loses the new ones."""
    monkeypatch.setenv("FAKE_SBATCH_FATAL", "Could not establish a configuration source")
    # A slow sbatch, while an earlier array task starts writing its log beside the submission's files.
    monkeypatch.setenv("FAKE_SBATCH_BEFORE", "echo started > $(dirname $1)/4242_1_log.out")
    monkeypatch.setattr(launch, "_active_jobs", lambda: None)  # squeue cannot reach SLURM either
    runs = tmp_path / "runs"
    kept = runs / SLURM_DIR / "4242_0_log.out"
    kept.parent.mkdir(parents=True)
    kept.write_text("an earlier job's log")
    with pytest.raises(ConfigError) as e:
        submit([RunConfig(arch="plain", depth=20)], str(runs), parse("--partition", "gpu"))
    assert str(e.value) == ("sbatch refused the job array: Could not establish a configuration source; SLURM is not "
                            "reachable from here: run on a login node of the cluster (`sinfo` works there) or use "
                            "--launcher local")
    assert sorted(p.name for p in kept.parent.iterdir()) == [SUBMIT_LOCK, "4242_0_log.out", "4242_1_log.out"]
    assert capsys.readouterr().err == ""  # no squeue note before the error either


def test_bad_flags_and_missing_sbatch_are_one_line_errors(tmp_path, monkeypatch):
    cfg = [RunConfig(arch="plain", depth=20)]
    runs = tmp_path / "runs"
    # As the CLI parses them: argparse rejects them with our one-line reason.
    for argv, reason in ((["--time", "abc"], "is not a time limit; write minutes (90), MM:SS, [D-]HH:MM:SS"),
                         (["--gpus-per-run", "0"], "must be a positive integer, got 0"),
                         (["--mem", "lots"], "is not a memory size")):
        with pytest.raises(argparse.ArgumentError, match=re.escape(reason)):
            parse(*argv)
    # Namespaces built by other callers are checked again by submit: ConfigError, one line.
    for field, value, message in (("time", "abc", "--time: 'abc' is not a time limit"),
                                  ("time", "1:30:60", "--time: '1:30:60' is not a time limit"),
                                  ("gpus_per_run", 0, "--gpus-per-run: must be a positive integer, got 0"),
                                  ("concurrency", 4, "--concurrency does not apply to --launcher slurm")):
        args = parse()
        setattr(args, field, value)
        with pytest.raises(ConfigError) as e:
            submit(cfg, str(runs), args)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--gpus-per-run 2 trains on GPUs; drop --device cpu"):
        submit(cfg, str(runs), parse("--gpus-per-run", "2", device="cpu"))

    import study.launch

    with monkeypatch.context() as m:
        m.setattr(study.launch, "submitit", None)  # as without `pip install 'resnet-degradation-study[slurm]'`
        with pytest.raises(ConfigError) as e:
            submit(cfg, str(runs), parse())
        assert str(e.value) == "--launcher slurm needs submitit: pip install 'resnet-degradation-study[slurm]'"

    # A batch larger than the training split, found before any job is submitted (the executor is never used).
    too_big = [RunConfig(arch="plain", depth=8, dataset="fashion-mnist-mini", iterations=10, batch_size=10001)]
    with pytest.raises(ConfigError, match="--batch-size 10001 is larger than fashion-mnist-mini's training split"):
        submit(too_big, str(runs), parse(), executor=object())
    assert not runs.exists()

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    with pytest.raises(ConfigError) as e:
        submit(cfg, str(runs), parse())
    assert str(e.value) == "no sbatch found: run on a SLURM login node or use --launcher local"
    assert not runs.exists()  # nothing written

    local = argparse.Namespace(launcher="local", partition="gpu")
    with pytest.raises(ConfigError, match="--partition applies to --launcher slurm only"):
        study.train.ExecutionPlan.from_args(local, 1).check([])
    # Every format sbatch takes: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (seconds round up).
    assert [parse_time(t) for t in ("90", "90:00", "1:30", "01:30:00", "0:00:30", "2-0", "1-12", "1-1:30", "2-00:00:00")] == [
        90, 90, 2, 90, 1, 2880, 2160, 1530, 2880]
    for bad in ("1:60:00", "1:30:60", "2-1:60", "1:5", "-5", "1-2-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a time limit"):
            parse_time(bad)


def test_ddp_environment_exported_as_torchrun_would(monkeypatch):
    """A 2-GPU run is 2 tasks of one job: each exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT
    from what SLURM sets, the same master on both, and leaves CUDA_VISIBLE_DEVICES alone."""
    saved = dict(os.environ)
    try:
        exported = []
        for rank in (0, 1):
            for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
                os.environ.pop(name, None)
            os.environ.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
                              SLURM_NODEID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                              SLURM_JOB_NODELIST="gpu[07]", CUDA_VISIBLE_DEVICES="3,5")
            assert export_distributed_env().startswith(f"rank {rank} of 2, master gpu07:")
            exported.append({k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                        "CUDA_VISIBLE_DEVICES")})
        assert [e["RANK"] for e in exported] == ["0", "1"] and [e["LOCAL_RANK"] for e in exported] == ["0", "1"]
        assert {e["WORLD_SIZE"] for e in exported} == {"2"} and {e["MASTER_ADDR"] for e in exported} == {"gpu07"}
        assert len({e["MASTER_PORT"] for e in exported}) == 1 and 20000 <= int(exported[0]["MASTER_PORT"]) <= 60000
        assert {e["CUDA_VISIBLE_DEVICES"] for e in exported} == {"3,5"}
        os.environ["SLURM_NTASKS"] = "1"
        os.environ.pop("RANK")
        assert export_distributed_env() is None and "RANK" not in os.environ  # one GPU: plain single process
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_a_job_whose_processes_cannot_join_is_failed_not_queued(in_job, monkeypatch, capsys):
    """An error before training, in joining the job's processes (fewer GPUs than --gpus-per-run, say), is
    recorded as the run's failure, so that `study status` does not show it queued for a job that has ended."""
    import study.train
    from study.cli import main

    task, calls, send = in_job
    run = Run(task.runs_dir, CFG)
    run.dir.mkdir(parents=True)
    launch._write_job_file(run, job_id="77")  # as the submission leaves it

    def cannot_join(device):
        raise RuntimeError("CUDA error: invalid device ordinal")

    monkeypatch.setattr(study.train, "distributed_from_env", cannot_join)
    capsys.readouterr()
    with pytest.raises(RuntimeError):
        task()
    status = run.status()
    assert (status["status"], status["error"]) == ("failed", "RuntimeError: CUDA error: invalid device ordinal")
    assert main(["status", "--runs-dir", task.runs_dir]) == 0
    out = capsys.readouterr().out
    assert f"{CFG.run_id}: failed at iteration 0: RuntimeError: CUDA error: invalid device ordinal" in out, out
