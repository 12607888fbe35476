"""Fault injection, one real subprocess per case: kills, signals, corrupt files, NaN, concurrent
runners. Each asserts the exact outcome: rows, statuses, messages, exit codes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import TIMING_COLUMNS

DRIVER = Path(__file__).with_name("fault_driver.py")
RUN_ID = "fashion-mnist-mini-resnet8-A-s0-it17-b64"
# 320 training images at batch 64: 5 steps per epoch; 17 steps = epochs of 5, 5, 5 and 2.
ARGS = ["run", "--arch", "resnet", "--depth", "8", "--iterations", "17", "--batch-size", "64", "--device", "cpu"]


def study(runs: Path, *faults: str, args=ARGS, wait=True, timeout=300):
    cmd = [sys.executable, str(DRIVER), *faults, "--", *args, "--runs-dir", str(runs)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def metrics(runs: Path, run_id: str = RUN_ID) -> pd.DataFrame:
    return pd.read_parquet(runs / run_id / "metrics.parquet").drop(columns=TIMING_COLUMNS)


def status(runs: Path, run_id: str = RUN_ID) -> dict:
    return json.loads((runs / run_id / "status.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pd.DataFrame:
    """The uninterrupted run every interrupted one must equal."""
    runs = tmp_path_factory.mktemp("reference")
    proc = study(runs)
    assert proc.returncode == 0, proc.stderr
    df = metrics(runs)
    assert list(df.epoch) == [1, 1, 2, 2, 3, 3, 4, 4]
    return df


SLOW = pytest.mark.slow


@pytest.mark.parametrize("step", [3, pytest.param(5, marks=SLOW), pytest.param(11, marks=SLOW), pytest.param(16, marks=SLOW)])
def test_kill_9_after_a_step_then_resume_equals_uninterrupted(tmp_path, reference, step):
    proc = study(tmp_path, "--kill-at-step", str(step))
    assert proc.returncode == -signal.SIGKILL
    assert status(tmp_path)["status"] == "running"
    done_epochs = (step - 1) // 5  # an epoch is logged after its 5th step
    if done_epochs:
        assert metrics(tmp_path).epoch.max() == done_epochs
    proc = study(tmp_path)
    assert proc.returncode == 0, proc.stderr
    pd.testing.assert_frame_equal(metrics(tmp_path), reference)  # no missing, no duplicate rows
    assert status(tmp_path)["status"] == "done"


@pytest.mark.parametrize("which", [pytest.param(1, marks=SLOW), 3])
def test_kill_9_during_a_checkpoint_write(tmp_path, reference, which):
    proc = study(tmp_path, "--kill-in-checkpoint", str(which))
    assert proc.returncode == -signal.SIGKILL
    run_dir = tmp_path / RUN_ID
    assert list(run_dir.glob(".checkpoint.*.tmp"))  # the half-written file is left behind...
    proc = study(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not list(run_dir.glob(".*.tmp"))  # ...and cleaned up on resume
    pd.testing.assert_frame_equal(metrics(tmp_path), reference)


def test_sigterm_checkpoints_mid_epoch_and_resumes_exactly(tmp_path, reference):
    proc = study(tmp_path, "--sleep-per-step", "0.2", wait=False)
    status_path = tmp_path / RUN_ID / "status.json"
    deadline = time.time() + 240
    # Wait until the first epoch is checkpointed, then stop it somewhere in the second.
    while time.time() < deadline and not (status_path.exists() and json.loads(status_path.read_text()).get("epoch", 0) >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    st = status(tmp_path)
    assert st["status"] == "interrupted" and st["signal"] == "SIGTERM" and st["iteration"] % 5 != 0
    assert metrics(tmp_path).epoch.max() == st["epoch"]  # the interrupted epoch is not logged yet
    proc = study(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{RUN_ID}: resuming from its checkpoint at iteration {st['iteration']} of 17" in proc.stderr
    pd.testing.assert_frame_equal(metrics(tmp_path), reference)


def test_truncated_checkpoint_falls_back_to_previous(tmp_path, reference):
    assert study(tmp_path, "--kill-at-step", "12").returncode == -signal.SIGKILL  # after epoch 2's checkpoint
    ckpt = tmp_path / RUN_ID / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    proc = study(tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "unreadable" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"{RUN_ID}: checkpoint.pt is unreadable (RuntimeError: "), warnings
    assert warnings[0].endswith("); using the previous good state, checkpoint.prev.pt"), warnings
    pd.testing.assert_frame_equal(metrics(tmp_path), reference)


def test_corrupt_checkpoints_and_metrics_restart_cleanly(tmp_path, reference):
    assert study(tmp_path, "--kill-at-step", "12").returncode == -signal.SIGKILL
    run_dir = tmp_path / RUN_ID
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.parquet"):
        (run_dir / name).write_bytes(b"garbage")
    # What the first session recorded, changed: a run that starts over records its new first session.
    record = json.loads((run_dir / "config.json").read_text())
    record["provenance"].update(cpu="An old CPU", resumed=[{"from_iteration": 5, "cpu": "Another"}])
    (run_dir / "config.json").write_text(json.dumps(record))
    proc = study(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("unreadable") == 2
    # Each line says what comes next: the previous checkpoint, then (that one unreadable too) the start.
    assert "checkpoint.pt is unreadable (" in proc.stderr and "; using the previous good state, checkpoint.prev.pt" in proc.stderr
    assert "checkpoint.prev.pt is unreadable (" in proc.stderr
    assert "; no readable checkpoint is left: the run starts over from iteration 0" in proc.stderr
    pd.testing.assert_frame_equal(metrics(tmp_path), reference)
    prov = json.loads((run_dir / "config.json").read_text())["provenance"]
    assert prov["cpu"] != "An old CPU" and "resumed" not in prov, prov


def test_nan_marks_run_diverged_and_the_grid_goes_on(tmp_path):
    grid = ["run", "--arch", "plain", "--depth", "8", "--seeds", "0,1", "--iterations", "12", "--batch-size", "64"]
    proc = study(tmp_path, "--nan-at-step", "7", args=grid)
    assert proc.returncode == 1
    first, second = "fashion-mnist-mini-plain8-A-s0-it12-b64", "fashion-mnist-mini-plain8-A-s1-it12-b64"
    assert status(tmp_path, first) == {**status(tmp_path, first), "status": "diverged", "iteration": 7}
    assert "loss is not finite at iteration 7" in proc.stderr
    assert f"not done: {first} (diverged), {second} (diverged)" in proc.stderr
    # The second run went on (and, with the fault still injected, diverged at its own step 7).
    df = metrics(tmp_path, first)
    assert list(df.epoch) == [1, 1, 2, 2] and df.loss.iloc[2] != df.loss.iloc[2]  # epoch 2 train loss is NaN
    # A diverged run is final: running again skips it.
    proc = study(tmp_path, args=grid)
    assert proc.returncode == 1 and proc.stdout.count("diverged, skipped") == 2

    out = subprocess.run([sys.executable, "-m", "study", "status", "--runs-dir", str(tmp_path)], capture_output=True, text=True)
    assert out.stdout.count(" diverged ") == 2


@pytest.mark.slow
def test_two_concurrent_grid_runners_train_each_run_once(tmp_path):
    grid = ["run", "--arch", "resnet", "--depth", "8", "--seeds", "0-3", "--iterations", "6", "--batch-size", "64"]
    a, b = study(tmp_path, args=grid, wait=False), study(tmp_path, args=grid, wait=False)
    out_a, err_a = a.communicate(timeout=300)
    out_b, err_b = b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    trained = [line.split()[1].rstrip(":") for line in (out_a + out_b).splitlines() if line.endswith("training on cpu")]
    run_ids = [f"fashion-mnist-mini-resnet8-A-s{s}-it6-b64" for s in range(4)]
    assert sorted(trained) == sorted(run_ids)  # every run trained, none twice
    for run_id in run_ids:
        df = metrics(tmp_path, run_id)
        assert list(df.split) == ["train", "test", "train", "test"] and status(tmp_path, run_id)["status"] == "done"


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=SLOW)])
def test_a_signal_while_waiting_for_another_processs_run_stops_at_once(tmp_path, signum):
    """A runner waiting for a run that another process holds stops on Ctrl-C or SIGTERM at once,
    without touching that run (it used to sit in the lock, then train a step before stopping)."""
    from study.config import RunConfig
    from study.runstore import Run

    other = Run(tmp_path, RunConfig("resnet", 8, iterations=17, batch_size=64))
    assert other.cfg.run_id == RUN_ID
    with other.lock() as held:
        assert held
        cmd = [sys.executable, str(DRIVER), "--", *ARGS, "--runs-dir", str(tmp_path)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:  # the runner's log, up to the point where it waits
            if "held by another process" in line:
                break
        time.sleep(1.0)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in out + err
    assert sorted(p.name for p in (tmp_path / RUN_ID).iterdir()) == ["lock"]  # nothing written to it


def test_config_conflicting_with_existing_run_dir(tmp_path):
    run_dir = tmp_path / RUN_ID
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"config": {"arch": "plain", "depth": 20}}))
    proc = study(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert ("holds a run with other settings (arch 'plain' there, 'resnet' asked for; batch_size 128 there, 64 asked "
            "for; depth 20 there, 8 asked for; iterations 64000 there, 17 asked for); move that directory away") in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]  # nothing written
    # A damaged one is named as damaged, with its fix.
    (run_dir / "config.json").write_text('{"conf')
    proc = study(tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"study: error: {run_dir / 'config.json'} is unreadable (not JSON: "), proc.stderr
    assert proc.stderr.rstrip().endswith("copy it again if the run trained elsewhere, or move the run's folder out of "
                                         "the runs dir and train it again"), proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


@pytest.mark.parametrize("damage", [b"\xff\xfe", b"[]", b"null", b'"done"', b"{"])
def test_a_status_json_that_is_no_record_leaves_the_run_unknown_not_a_traceback(tmp_path, capsys, damage):
    """Not UTF-8, an array, null, a string, broken JSON: the run's standing is unknown; `study status` says so
    and the run's command rewrites the record from its checkpoint."""
    from study.cli import main
    from study.config import RunConfig
    from study.runstore import Run

    args = ["run", "--arch", "plain", "--depth", "8", "--iterations", "3", "--batch-size", "32", "--runs-dir",
            str(tmp_path), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    run = Run(tmp_path, RunConfig("plain", 8, iterations=3, batch_size=32))
    run.status_path.write_bytes(damage)
    assert run.status() == {"status": "unknown"}
    capsys.readouterr()
    assert main(["status", "--runs-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "unknown" in out, out + err
    assert main(args) == 0 and run.status()["status"] == "done"


def test_is_held_tells_a_held_run_in_a_folder_this_user_cannot_write(tmp_path, monkeypatch):
    """`study status` on a read-only copy of a runs dir: the lock cannot be opened to write, so it is tested with
    a shared flock on a read-only descriptor, not a traceback."""
    import fcntl

    from study.config import RunConfig
    from study.runstore import Run

    run = Run(tmp_path, RunConfig("plain", 8, iterations=3, batch_size=32))
    run.dir.mkdir(parents=True)
    (run.dir / "lock").touch()

    def read_only(self, *, wait=False):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Run, "lock", read_only)
    assert run.is_held() is False
    holder = os.open(run.dir / "lock", os.O_RDWR)  # another process's training session, as far as flock goes
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert run.is_held() is True
    finally:
        os.close(holder)
    assert run.is_held() is False


_FULL_DISK = """
import resource, sys
import torch
sys.path.insert(0, sys.argv[2])
from conftest import make_small_data
from helpers import train_run
from study.config import RunConfig
from study.runstore import Run
data = make_small_data()  # read before the limit
cfg = RunConfig("resnet", 8, iterations=12, batch_size=64)
run = Run(sys.argv[1], cfg)
run.prepare("cpu")
limit = 100_000  # the run's small files fit; its checkpoint (about 0.6 MB) does not
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: a write fails with EFBIG
train_run(cfg, run, data, torch.device("cpu"), progress=False)
"""


def test_a_checkpoint_that_cannot_be_written_is_recorded_with_the_os_error_that_names_it(tmp_path):
    """A checkpoint write that the file system refuses (here a file-size limit; a full disk alike) marks the
    run failed with the OS's own words ("File too large", "No space left on device"), not torch's
    writer's ("unexpected pos"), and leaves no temporary file behind."""
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "OSError: [Errno 27] File too large" in proc.stderr, proc.stderr[-2000:]
    (folder,) = tmp_path.iterdir()
    st = json.loads((folder / "status.json").read_text())
    assert st["status"] == "failed" and st["error"] == "OSError: [Errno 27] File too large", st
    assert not (folder / "checkpoint.pt").exists() and not list(folder.glob(".checkpoint.*")), list(folder.iterdir())


@pytest.mark.parametrize("where", ["set-up", "probe"])
def test_a_failure_outside_the_steps_is_recorded_in_status_json(tmp_path, monkeypatch, small_data, where):
    """A full disk while a session sets up (writing its record) or after the last epoch (the layer responses):
    the run's status.json says `failed` with the error, as for a failure during the steps, not `running` or
    `interrupted` with no word of it."""
    import errno

    import torch

    import study.train.loop as loop
    from helpers import train_run

    from study.config import RunConfig
    from study.runstore import Run

    cfg = RunConfig("plain", 8, iterations=3, batch_size=32)
    run = Run(tmp_path, cfg)
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "set-up":
        run.prepare("cpu")
        run.set_status("interrupted", iteration=2, epoch=0)

        def broken(*args, **kwargs):
            raise full
        monkeypatch.setattr(loop, "make_feed", broken)
    else:
        def broken(*args, **kwargs):
            raise full
        monkeypatch.setattr(loop, "record_responses", broken)
    with pytest.raises(OSError):
        train_run(cfg, run, small_data, torch.device("cpu"), progress=False)
    status = run.status()
    assert status["status"] == "failed" and status["error"] == "OSError: [Errno 28] No space left on device", status
    assert status["iteration"] == (2 if where == "set-up" else 3)


def test_files_reach_the_disk_before_they_replace_the_old_and_the_rename_after(tmp_path, monkeypatch):
    """For a power loss: every atomic write (status, config, metrics) and every checkpoint is fsynced
    before it is renamed over the old file, and its folder after (the rename itself)."""
    import study.runstore as runstore
    from study.config import RunConfig
    from study.runstore import Run

    run = Run(tmp_path, RunConfig("plain", 8, iterations=3, batch_size=32))
    run.prepare("cpu")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(runstore.os, "fsync", fsync)
    monkeypatch.setattr(runstore.os, "replace", replace)
    run.set_status("running", iteration=1, epoch=0)
    tmp = events[1][1]
    assert events == [("fsync", tmp), ("replace", tmp, str(run.status_path)), ("fsync", str(run.dir))], events
    events.clear()
    run.save_checkpoint({"model": {}, "optimizer": {}, "iteration": 1})
    run.save_checkpoint({"model": {}, "optimizer": {}, "iteration": 2})
    tmp = events[-2][1]
    assert events[-4:] == [("fsync", tmp), ("replace", str(run.checkpoint_path), str(run.previous_checkpoint_path)),
                           ("replace", tmp, str(run.checkpoint_path)), ("fsync", str(run.dir))], events
