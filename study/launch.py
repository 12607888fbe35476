"""`study run --launcher slurm`: a grid's unfinished runs as one SLURM job array, one array task per
run, through submitit. Nothing here trains: each task calls `study.train.run_all([cfg], ...)`, which
resumes from the run directory's checkpoint, so a task that is requeued, or a grid submitted again,
continues where its run stopped.

What a task keeps when it is stopped:
- time limit (submitit asks SLURM for `--signal=USR2@90`) or a preemption that sends USR2: the
  current step finishes, a mid-epoch checkpoint is written (as for SIGTERM in `study.train.loop`), the run
  is marked `interrupted`, and only then is submitit's handler called, which calls
  `SlurmTask.checkpoint` and requeues the task (`scontrol requeue`). Nothing is lost but the step
  in flight. Timeouts are requeued at most `--slurm-max-timeouts` times, preemptions always.
- SIGTERM (scancel, or a preemption without USR2): the same mid-epoch checkpoint; the task then
  waits PREEMPT_WAIT_S for the USR2 that may follow a preemption (and requeues if it comes),
  otherwise it ends; SLURM requeues a preempted job itself where the cluster is set up to.
- SIGKILL, node failure: the last end-of-epoch checkpoint (see `study.train.loop`).

`study status` reads `<run dir>/slurm_job.json` (written here) through `list_runs_with_queued` and
`run_status`: a run submitted (or requeued) and not started since reads `queued`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from typing import TYPE_CHECKING

from .config import ConfigError, RunConfig
from .runstore import (
    FINAL_STATUSES,
    Run,
    atomic_write_text,
    RunStoreError,
    check_not_in_a_run,
    check_run_folders,
    check_writable,
    folders_made_by,
    list_runs,
    unwritable,
)

try:  # optional: `pip install 'resnet-degradation-study[slurm]'`; submit() says so when it is missing
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - exercised only without submitit
    submitit = None
    Checkpointable = object

if TYPE_CHECKING:
    from .train.plan import ExecutionPlan

LAUNCHERS = ("local", "slurm")
#: The SLURM options of `study run` (argparse's names; their types: `study.cli.args.SLURM_TYPES`).
SLURM_FLAGS = ("partition", "account", "qos", "time", "gpus_per_run", "cpus_per_run", "mem", "slurm_array_parallelism",
               "slurm_max_timeouts")
SLURM_DIR = "_slurm"  # submitit's folder under the runs dir: pickles, sbatch files, logs
JOB_FILE = "slurm_job.json"  # in a run directory: the SLURM job that trains it
DEFAULT_TIME_MIN = 240
DEFAULT_GPUS = 1
DEFAULT_MAX_TIMEOUTS = 10
# After a SIGTERM a task waits this long for the USR2 that a preemption may send next (then it is
# requeued) before it exits; scancel's SIGKILL comes KillWait (30 s by default) after its SIGTERM.
PREEMPT_WAIT_S = 5.0


# --- flags ------------------------------------------------------------------------------------------
# The command line's flags and their types are study/cli/args.py's (`add_launcher_arguments`).


def _options(args: argparse.Namespace) -> dict:
    """The SLURM flags, validated (whether argparse parsed them or not) and with defaults filled."""
    from .cli.args import SLURM_TYPES  # the flags' argparse types (here: study.cli imports this module)

    opts = {}
    for name, parse in SLURM_TYPES.items():
        value = getattr(args, name, None)
        if value is not None:
            try:
                value = parse(value)
            except argparse.ArgumentTypeError as e:
                raise ConfigError(f"--{name.replace('_', '-')}: {e}") from None
        opts[name] = value
    opts["time"] = opts["time"] or DEFAULT_TIME_MIN
    opts["gpus_per_run"] = opts["gpus_per_run"] or DEFAULT_GPUS
    if opts["slurm_max_timeouts"] is None:
        opts["slurm_max_timeouts"] = DEFAULT_MAX_TIMEOUTS
    opts["cpu_only"] = str(getattr(args, "device", "auto") or "auto") == "cpu"  # the jobs ask for no GPU
    return opts


def slurm_parameters(opts: dict, job_name: str = "study") -> dict:
    """submitit SlurmExecutor parameters (sbatch's vocabulary) for validated `_options`."""
    g = opts["gpus_per_run"]
    params = {
        "job_name": job_name,
        "time": opts["time"],
        "nodes": 1,
        # One process per GPU, torchrun-style; each sees all the job's GPUs and uses cuda:LOCAL_RANK.
        "ntasks_per_node": g,
        **({} if opts.get("cpu_only") else {"gpus_per_node": g}),
        # Requeue-able: `scontrol requeue` after a timeout, and SLURM's own requeue on preemption or
        # node failure, whatever the cluster's JobRequeue default.
        "additional_parameters": {"requeue": True},
    }
    for flag, key in (("partition", "partition"), ("account", "account"), ("qos", "qos"), ("mem", "mem"),
                      ("slurm_array_parallelism", "array_parallelism")):
        if opts[flag] is not None:
            params[key] = opts[flag]
    if opts["cpus_per_run"] is not None:
        params["cpus_per_task"] = math.ceil(opts["cpus_per_run"] / g)
    return params


# --- the array task ---------------------------------------------------------------------------------


def _preempt_signal() -> signal.Signals:
    """The signal submitit has SLURM send before the time limit (USR2 unless SUBMITIT_PREEMPT_SIGNAL)."""
    return signal.Signals(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG))


def _job_file(run: Run) -> Path:
    return run.dir / JOB_FILE


def read_job_file(run: Run) -> dict | None:
    """The run's `slurm_job.json`, or None."""
    try:
        record = json.loads(_job_file(run).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_job_file(run: Run, **fields: object) -> None:
    record = read_job_file(run) or {"run_id": run.cfg.run_id, "config": run.cfg.to_dict()}
    record.update(fields)
    run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_job_file(run), json.dumps(record, indent=1) + "\n")


def export_distributed_env() -> str | None:
    """In a job with several tasks (`--gpus-per-run G > 1`: G tasks, one per GPU), export what
    torchrun would: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (the
    same port on every rank, drawn from the job id). CUDA_VISIBLE_DEVICES stays as SLURM set it:
    every rank sees the job's GPUs and uses cuda:LOCAL_RANK. Returns a description, or None in a
    one-task job (nothing exported)."""
    if submitit.JobEnvironment().num_tasks <= 1:
        return None
    dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return f"rank {dist.rank} of {dist.world_size}, master {dist.master_addr}:{dist.master_port}"


def _record_failure(run: Run, error: Exception) -> None:
    """Record a job's set-up error (joining the processes, data, device, run dir), which leaves no status behind,
    so that `study status` does not show the run queued forever; a status train_steps recorded (or a finished
    run's) is kept."""
    st = run.status()
    if st.get("status") not in (*FINAL_STATUSES, "failed"):
        with contextlib.suppress(OSError):  # an unwritable runs dir: the log has the error
            run.dir.mkdir(parents=True, exist_ok=True)
            run.set_status("failed", iteration=st.get("iteration", 0), epoch=st.get("epoch", 0),
                           error=f"{type(error).__name__}: {error}")


class SlurmTask(Checkpointable):
    """One array task: train (or resume) one run. Its state is the run directory, so the
    checkpoint submitit pickles on requeue is the task itself, unchanged."""

    def __init__(self, cfg: RunConfig, runs_dir: str, plan: "ExecutionPlan", *, data_dir: str | None = None,
                 tensorboard: str | None = None) -> None:
        self.cfg = cfg
        self.runs_dir = runs_dir
        self.plan = plan.for_task()  # how the job array was asked to train, for one run on this node
        self.data_dir = data_dir
        self.tensorboard = tensorboard

    def __setstate__(self, state: dict) -> None:
        """A task pickled by a version before the plan (requeued across an upgrade): its flags as a plan."""
        if "plan" not in state:
            from .train.plan import ExecutionPlan

            state["plan"] = ExecutionPlan(
                device=state.pop("device", "auto"), compile=state.pop("compile", False),
                cuda_graph=state.pop("cuda_graph", False), sync_bn=state.pop("sync_bn", False),
                workers=state.pop("workers", None), decode=state.pop("decode", "cpu"))
        self.__dict__.update({"tensorboard": None, **state})

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        """Called by submitit (rank 0) just before it requeues this task: the run's state is on disk
        already; record the requeue so `study status` shows the run as queued again."""
        run = Run(self.runs_dir, self.cfg)
        record = read_job_file(run) or {}
        _write_job_file(run, requeues=int(record.get("requeues", 0)) + 1,
                        requeued=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self._requeue_recorded = True  # (submitit may yet decide not to: `_not_requeued` takes it back)
        return super().checkpoint(*args, **kwargs)

    def _not_requeued(self, run: Run, reason: str) -> None:
        """submitit did not requeue the task after all (more time-limit stops than --slurm-max-timeouts): take
        back the requeue `checkpoint` recorded and say why, so that `study status` shows the run as it is
        (`interrupted`), not `queued` for a job that will not come."""
        record = read_job_file(run) or {}
        requeues = int(record.get("requeues", 0)) - (1 if getattr(self, "_requeue_recorded", False) else 0)
        _write_job_file(run, requeues=max(requeues, 0), not_requeued=reason)

    def __call__(self) -> dict[str, str]:
        from .train import (  # torch-heavy: only in the job
            StopRequested,
            distributed_from_env,
            graceful_stop,
            run_all,
        )

        env = submitit.JobEnvironment()
        run = Run(self.runs_dir, self.cfg)
        where = f"job {env.job_id} on {env.hostname} (pid {os.getpid()})"
        try:
            dist = export_distributed_env()
            if dist is not None:
                where += f", {dist}"
            print(f"study: {self.cfg.run_id}: {where}", flush=True)
            ddp = distributed_from_env(self.plan.device)  # the single process unless WORLD_SIZE > 1
        except Exception as e:  # the job's processes could not join (fewer GPUs than --gpus-per-run, say)
            if env.global_rank == 0:
                _record_failure(run, e)
            raise
        usr_sig = _preempt_signal()
        requeue = signal.getsignal(usr_sig)  # submitit's checkpoint-and-requeue handler
        preempted = False
        stopped: StopRequested | None = None
        try:
            with graceful_stop() as stop:
                # USR2 and SIGTERM both stop the run after the current step with a mid-epoch
                # checkpoint; neither escalates (a preemption may send both; SLURM, not a person,
                # sends them). Ctrl-C keeps graceful_stop's second-signal escape.
                def request_stop(signum: int, frame: object) -> None:
                    nonlocal preempted
                    preempted = preempted or signum == usr_sig
                    if stop.signum is None:
                        stop.signum = signum

                signal.signal(signal.SIGTERM, request_stop)
                signal.signal(usr_sig, request_stop)
                try:
                    plan = replace(self.plan, processes=ddp.world)  # the job's processes, as SLURM started them
                    results = run_all([self.cfg], self.runs_dir, plan, data_dir=self.data_dir, progress=False,
                                      stop=stop, ddp=ddp, tensorboard=self.tensorboard)
                except StopRequested as e:
                    stopped = e
        except Exception as e:
            if ddp.writer:
                _record_failure(run, e)
            raise
        finally:
            signal.signal(usr_sig, requeue)  # graceful_stop has put submitit's SIGTERM handler back
            if ddp.enabled:
                import torch.distributed

                torch.distributed.destroy_process_group()

        if stopped is not None:
            st = run.status()
            print(f"study: {self.cfg.run_id}: stopped by {stopped} at iteration {st.get('iteration', 0)}; "
                  + ("checkpoint written" if stopped.checkpointed else "before its first step, nothing to keep"),
                  flush=True)
            try:
                if preempted and callable(requeue):
                    requeue(usr_sig, None)  # calls self.checkpoint(), requeues, exits (rank 0 only)
                elif stopped.signum == signal.SIGTERM:
                    # A preemption's USR2 may follow its SIGTERM: submitit's handler, back in place,
                    # requeues and exits if it comes within the wait.
                    deadline = time.monotonic() + PREEMPT_WAIT_S
                    while time.monotonic() < deadline:
                        time.sleep(0.05)
            except submitit.core.utils.UncompletedJobError as e:  # submitit's "Job not requeued because: ..."
                if ddp.writer:
                    self._not_requeued(run, str(e))
                raise
            # Not requeued (scancel, or a SIGTERM no USR2 followed): the line above says what happened; the
            # exit status says it as a process a signal ended would (128 + its number), with no traceback
            # in the job's log for an expected stop.
            raise SystemExit(128 + stopped.signum)
        if results.get(self.cfg.run_id) == "failed":
            raise RuntimeError(f"{self.cfg.run_id} failed: {run.status().get('error', 'see the log above')}")
        return results


# --- submission ---------------------------------------------------------------------------------------


def _active_jobs() -> set[str] | None:
    """Ids (`123` or `123_4`) of this user's pending or running SLURM jobs, array tasks one by one;
    None if squeue cannot tell."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        proc = subprocess.run(
            [squeue, "--noheader", "--array", "--format=%i", f"--user={getpass.getuser()}"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return {line.strip() for line in proc.stdout.splitlines() if line.strip()}


def _one_line_error(text: str) -> str:
    """sbatch's reason in one line: its first `fatal:` line (SLURM itself cannot work here), else its
    last line (a refused job: `error: Batch job submission failed: ...`), without sbatch's prefix."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    fatal = [line for line in lines if re.match(r"^sbatch: fatal: ", line)]
    last = fatal[0] if fatal else lines[-1] if lines else "no message"
    return re.sub(r"^sbatch: (error|fatal): ", "", last)


#: sbatch's words for a SLURM it cannot reach (no slurm.conf, no controller, no munge), as against a job it refuses.
UNREACHABLE = re.compile(r"Could not establish a configuration source|slurm\.conf|Unable to contact slurm controller|"
                         r"Unable to process configuration file|Connection refused|munge", re.I)
#: sbatch's words for a GPU request the cluster or partition cannot meet (it has no GPUs, or no such kind).
NO_GPUS = re.compile(r"Invalid generic resource|gres", re.I)
SUBMIT_LOCK = ".submitting.lock"  # in SLURM_DIR: held while a `study` command submits into it
#: The files submitit writes into its folder before calling sbatch: the sbatch script and the pickled tasks.
SUBMISSION_FILE = re.compile(r"^\.submission_file_[0-9a-f]+\.sh$|^[0-9a-f]{32}\.pkl$")


def _refusal(reason: str) -> str:
    """The fix for an sbatch refusal: SLURM's own setup where sbatch could not reach it, else the job's options."""
    if UNREACHABLE.search(reason):
        return "SLURM is not reachable from here: run on a login node of the cluster (`sinfo` works there) or use --launcher local"
    if NO_GPUS.search(reason):
        return ("the jobs ask for GPUs (--device auto or cuda), which this cluster or --partition does not offer: "
                "pass --partition of GPU nodes, or --device cpu to train on the CPUs")
    return "check --partition, --account, --qos, --time, --gpus-per-run"


def _remove_new_files(folder: Path, before: set[Path], made: list[Path], lock: Path) -> None:
    """Remove what a refused submission left in submitit's `folder`, which it holds the `lock` of: its
    sbatch script and pickles (the names submitit gives them, not in `before`; an earlier job's logs and
    results keep names of their own); then, where this command made `folder` (in `made`), the lock, and
    each folder in `made` (deepest first) that is empty."""
    for path in folder.iterdir():
        if path not in before and SUBMISSION_FILE.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
    if folder in made:
        lock.unlink(missing_ok=True)
    for empty in made:
        try:
            empty.rmdir()
        except OSError:  # not empty (or gone): leave it
            pass


def submit(configs: list[RunConfig], runs_dir: str, args: argparse.Namespace, plan: "ExecutionPlan | None" = None, *,
           executor=None) -> int:
    """Submit the unfinished runs among `configs` as one job array, one task per run, each to train
    as `plan` says (`study run` gives the plan it checked; None: the plan of `args`, checked here);
    print one line per submitted run (`run id -> job id`). Runs already pending or running in SLURM
    (per `slurm_job.json` and squeue) are not submitted twice. `executor` replaces the
    SlurmExecutor (tests: a submitit LocalExecutor, used as configured). Bad input: ConfigError,
    DataError or RunStoreError, one line, before anything is submitted. Returns the exit code."""
    opts = _options(args)
    if plan is None:
        from .train.plan import ExecutionPlan  # torch-heavy

        plan = replace(ExecutionPlan.from_args(args, opts["gpus_per_run"]), launcher="slurm")
        plan.check(configs)
    if submitit is None:
        raise ConfigError("--launcher slurm needs submitit: pip install 'resnet-degradation-study[slurm]'")
    if executor is None and shutil.which("sbatch") is None:
        raise ConfigError("no sbatch found: run on a SLURM login node or use --launcher local")
    if executor is None and shutil.which("srun") is None:
        raise ConfigError("no srun found (submitit runs each task through srun): run on a SLURM login node or use --launcher local")

    root = Path(runs_dir).absolute()
    check_not_in_a_run(root)
    runs = [Run(root, cfg) for cfg in configs]
    for run in runs:
        run.check_no_conflict()
    todo = [run for run in runs if not run.is_finished()]
    if not todo:
        print(f"nothing to submit: all {len(runs)} runs are finished (`study status --runs-dir {runs_dir}`)")
        return 0
    # The checks run_all makes before training, here, so that no job starts only to fail. The data
    # must be where the jobs will look (a shared file system); --download fetches it now.
    from .data import load_data
    from .train.runner import check_batch_fits

    loaded: dict[tuple[str, bool], object] = {}
    data_dir = getattr(args, "data_dir", None)
    for cfg in dict.fromkeys(r.cfg for r in todo):
        if getattr(cfg, "imagenet", False):  # the folders only: scanning them is the job's work
            from .data import imagenet

            for split in ("train", "val"):
                imagenet.split_dir(data_dir or os.path.join("data", "imagenet"), split)
        else:
            key = (cfg.dataset, cfg.holdout)
            if key not in loaded:
                loaded[key] = load_data(cfg.dataset, data_dir, holdout=cfg.holdout, download=plan.download)
            check_batch_fits(cfg, loaded[key])
    folder = root / SLURM_DIR  # submitit's: the job scripts, pickles and logs
    made = folders_made_by(folder)  # what this command creates, deepest first: removed again if it is refused
    check_writable(root)
    try:
        if (why := unwritable(folder / SUBMIT_LOCK)) is not None:
            raise RunStoreError(f"cannot submit into {folder}/ (the job scripts and logs): {why}; make it a folder "
                                "you can write, or pass another --runs-dir")
        check_run_folders(todo)
        if getattr(args, "tensorboard", None) is not None:  # where the jobs will write their event files
            from .tensorboard import check_dir

            made += folders_made_by(args.tensorboard)  # gone again if the submission is refused
            made.sort(key=lambda p: len(p.parts), reverse=True)  # deepest first, as each list was
            check_dir(args.tensorboard)
    except (RunStoreError, ConfigError):
        for empty in made:
            with contextlib.suppress(OSError):
                empty.rmdir()
        raise

    unlisted = None
    if executor is None:
        active = _active_jobs()
        if active is None:  # said once the jobs are in: where sbatch refuses them, its reason is the one line
            unlisted = ("study: squeue could not list your jobs; runs already queued may have been submitted again "
                        "(the second job then waits for the first)")
        else:
            queued = {run.cfg.run_id: (read_job_file(run) or {}).get("job_id") for run in todo}
            for run in [r for r in todo if queued[r.cfg.run_id] in active]:
                print(f"{run.cfg.run_id}: already queued or running as job {queued[run.cfg.run_id]}, not submitted again")
                todo.remove(run)
            if not todo:
                print(f"nothing submitted: every unfinished run is already queued or running; "
                      f"progress: study status --runs-dir {runs_dir}")
                return 0
        grid = getattr(args, "grid", None)
        executor = submitit.SlurmExecutor(root / SLURM_DIR, max_num_timeout=opts["slurm_max_timeouts"])
        executor.update_parameters(**slurm_parameters(opts, job_name=f"study-{grid}" if grid else "study"))

    abs_data_dir = None if data_dir is None else str(Path(data_dir).absolute())
    tensorboard = getattr(args, "tensorboard", None)
    tasks = [
        SlurmTask(run.cfg, str(root), plan, data_dir=abs_data_dir,
                  tensorboard=None if tensorboard is None else str(Path(tensorboard).absolute()))
        for run in todo
    ]
    captured = io.StringIO()  # submitit prints sbatch's stderr itself; we report its reason once
    folder.mkdir(exist_ok=True)
    lock_path = folder / SUBMIT_LOCK
    with open(lock_path, "a") as lock:
        # One `study` submission at a time into this folder, so that the submission files that appear
        # while this one holds the lock are its own.
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = set(folder.iterdir())
        try:
            with contextlib.redirect_stderr(captured):
                jobs = executor.submit_array(tasks)
        except submitit.core.utils.UncompletedJobError as e:
            _remove_new_files(folder, before, made, lock_path)
            reason = _one_line_error(str(e) or captured.getvalue())
            raise ConfigError(f"sbatch refused the job array: {reason}; {_refusal(reason)}") from None
        except submitit.core.utils.FailedSubmissionError as e:
            _remove_new_files(folder, before, made, lock_path)
            raise ConfigError(f"could not read the job id from sbatch: {_one_line_error(str(e))}") from None

    if unlisted:
        print(unlisted, file=sys.stderr)
    submitted = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for run, job in zip(todo, jobs):
        _write_job_file(run, job_id=str(job.job_id), submitted=submitted, requeues=0, not_requeued=None,
                        log=str(job.paths.stdout))
        print(f"{run.cfg.run_id} -> {job.job_id}")
    array = sorted({str(job.job_id).split("_")[0] for job in jobs})
    print(f"submitted {len(jobs)} run{'s' * (len(jobs) != 1)} as job {', '.join(array)}; logs in {root / SLURM_DIR}/, "
          f"progress: study status --runs-dir {runs_dir}")
    return 0


# --- status ----------------------------------------------------------------------------------------


def list_runs_with_queued(runs_dir: str | os.PathLike, unreadable: list[tuple[str, str]] | None = None) -> list[Run]:
    """`list_runs` (damaged config.json files added to `unreadable`, where given), plus the runs submitted to
    SLURM that have not started yet (a `slurm_job.json` but no readable `config.json`), sorted by id."""
    runs = {run.cfg.run_id: run for run in list_runs(runs_dir, unreadable)}
    root = Path(runs_dir)
    for path in sorted(root.glob(f"*/{JOB_FILE}")) if root.is_dir() else []:
        if path.parent.name in runs or (path.parent / "config.json").exists():  # listed, or its config.json damaged
            continue
        try:
            cfg = RunConfig.from_dict(json.loads(path.read_text())["config"])
        except (ValueError, KeyError, TypeError, OSError):
            continue
        if cfg.run_id == path.parent.name:
            runs[cfg.run_id] = Run(root, cfg)
    return [runs[k] for k in sorted(runs)]


def run_status(run: Run) -> dict:
    """`run.status()`, except that a run submitted (or requeued) to SLURM and not started since reads
    `queued`; a run with a SLURM job also carries its `job_id`."""
    st = run.status()
    job = read_job_file(run)
    if job is None or st.get("status") in FINAL_STATUSES:
        return st
    st = {**st, "job_id": job.get("job_id")}
    if job.get("not_requeued"):  # its job ended without the requeue it had begun (`SlurmTask._not_requeued`)
        return st
    try:
        started_since = run.status_path.stat().st_mtime_ns > _job_file(run).stat().st_mtime_ns
    except FileNotFoundError:
        started_since = False
    return st if started_since else {**st, "status": "queued"}
