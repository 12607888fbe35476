"""A list of runs (a grid, seeds): skip the finished, resume the unfinished, leave runs another
process holds to it (waiting for them at the end), go on after a run diverges or fails; and the
`--concurrency` worker processes that work through the same list beside this one.

Two processes on one runs dir: each run is trained by whoever holds its lock; the other skips it,
then waits for it at the end of its own list.
"""

from __future__ import annotations

import enum
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import ExitStack, nullcontext, suppress
from dataclasses import replace
from pathlib import Path

import torch

from ..config import ConfigError, RunConfig
from ..data import Data, imagenet, load_data
from ..fast.fused import Fuser, fusion_order
from ..runstore import (Run, check_not_in_a_run, check_run_folders, check_writable, folders_made_by,
                        publishing_from_a_dirty_tree)
from ..stopflag import StopFlag
from .distributed import SINGLE, Distributed, all_reduce, broadcast
from .feeds import pixel_mean_options, quiet
from .interleave import interleave
from .loop import Session, train_steps
from .step import ieee_fp32
from .plan import ExecutionPlan, default_workers
from .signals import StopRequested, graceful_stop

LOCK_POLL_S = 0.5  # how often a process waiting for a run another process trains looks again
IMAGENET_CHECKPOINT_EVERY = 1000  # iterations between mid-epoch checkpoints of an ImageNet run
#: Runs at least this long are hours of work per net on a CPU: `run_all` says so before starting.
CPU_LONG_ITERATIONS = 10_000


def run_all(
    configs: Iterable[RunConfig],
    runs_dir: str | Path,
    plan: ExecutionPlan = ExecutionPlan(),
    *,
    data_dir: str | None = None,
    progress: bool | None = None,
    stop: StopFlag | None = None,
    log: Callable[[str], None] = print,
    ddp: Distributed = SINGLE,
    tensorboard: str | None = None,
) -> dict[str, str]:
    """Train each config as `plan` says: skip finished runs, resume unfinished ones, leave runs
    that another process holds to it (waiting for them at the end), go on after a run diverges or
    fails. Returns {run_id: final status}. Every check that can fail on bad input (modes, device,
    data, runs dir, conflicting run dirs) happens before the first run directory is created.

    `plan.concurrency` K > 1 starts K-1 worker processes that work through the same list beside
    this one, sharing the device; `plan.streams` S > 1 makes each process train S runs at once,
    interleaved step by step on their own CUDA streams; `plan.fuse` K > 1 trains K runs of one
    network shape as one grouped network (`study.fast.fused`). Each is still its own run (seed,
    data order, metrics, checkpoint, resume). Under DDP (`ddp`) every process of the job calls
    this with the same list; rank 0 holds each run's lock and writes its files. ImageNet runs read
    `data_dir` (default ./data/imagenet). `tensorboard` DIR: each run's events in DIR/<run id>.
    fp32 is IEEE fp32 throughout (TF32 off), and the caller's TF32 settings are back on return.
    """
    with ieee_fp32():
        return _run_all(configs, runs_dir, plan, data_dir=data_dir, progress=progress, stop=stop, log=log, ddp=ddp,
                        tensorboard=tensorboard)


def _run_all(configs: Iterable[RunConfig], runs_dir: str | Path, plan: ExecutionPlan, *, data_dir: str | None,
             progress: bool | None, stop: StopFlag | None, log: Callable[[str], None], ddp: Distributed,
             tensorboard: str | None) -> dict[str, str]:
    """`run_all`'s work, under its IEEE fp32."""
    configs = list(configs)
    if tensorboard is not None:
        from ..tensorboard import require

        require()
    plan = replace(plan, processes=ddp.world)  # the job's processes train each run, whatever the caller's plan said
    dev = plan.torch_device(ddp)
    plan.check(configs, str(dev))
    datasets = _open_data(configs, data_dir, plan, dev, ddp)
    made = folders_made_by(Path(runs_dir)) + (folders_made_by(Path(tensorboard)) if tensorboard is not None else [])
    runs = _check_runs_dir(configs, runs_dir, ddp, tensorboard)
    concurrency = plan.processes_per_device(dev.type, len(runs), ddp.enabled)
    loaders = any(cfg.imagenet for cfg in configs)  # only ImageNet runs have DataLoader workers
    plan = replace(plan, device=str(dev), download=False,
                   workers=default_workers() if plan.workers is None and loaders else plan.workers)
    log = log if ddp.writer else quiet
    try:
        if ddp.writer:
            check_run_folders(runs)  # each run takes its lock and writes its status first
        _check_kept_cpu_paths(runs, plan, dev)
        # ImageNet's per-pixel mean: one pass over train/ (or the runs dir's cache), here, before any
        # worker process starts, so that they read it rather than each making its own pass.
        for data in datasets.values():
            if isinstance(data, imagenet.ImageNetData) and any(c.imagenet and c.mean == "pixel" for c in configs):
                data.mean_for("pixel", runs_dir, **pixel_mean_options(plan.workers, dev, ddp, progress, log, stop))
    except BaseException:
        # Refused or stopped before any run started (an unreadable training image, Ctrl-C in the per-pixel
        # mean's long pass): nothing half-written, so the runs dir goes again where this command made it
        # and nothing was written there.
        if ddp.writer:
            for folder in made:  # deepest first
                with suppress(OSError):
                    folder.rmdir()
        raise
    _notes_before_training(runs, runs_dir, dev, log)
    threads, own_threads = None, torch.get_num_threads()
    if dev.type == "cpu" and concurrency > 1:  # the processes share the CPU's threads, not each take all of them
        threads = max(1, torch.get_num_threads() // concurrency)
        torch.set_num_threads(threads)
        log(f"{concurrency} processes share the CPU: {threads} thread{'s' if threads > 1 else ''} each")
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    pool = [ctx.Process(target=_worker, args=(configs, str(runs_dir), replace(plan, concurrency=1), data_dir,
                                              tensorboard, f"worker {k}", threads), daemon=False)
            for k in range(1, concurrency)]
    for w in pool:
        w.start()
    try:
        # The runs' own lines (resuming, epochs) go to stderr; this list's (started, done) to `log`.
        return _ListRunner(runs, datasets, plan, Session(dev, ddp, progress, stop, tensorboard=tensorboard), log).run()
    finally:
        for w in pool:
            if w.is_alive() and sys.exc_info()[0] is not None:
                w.terminate()  # SIGTERM: each worker checkpoints its run and exits
            w.join()
        torch.set_num_threads(own_threads)


def _check_runs_dir(configs: list[RunConfig], runs_dir: str | Path, ddp: Distributed, tensorboard: str | None
                    ) -> list[Run]:
    """The runs, once no run directory holds another config and the runs dir (and the TensorBoard
    dir) can be written: the last checks, which create those directories."""
    check_not_in_a_run(runs_dir)
    runs = [Run(runs_dir, cfg) for cfg in configs]
    for run in runs:
        run.check_no_conflict()
    if ddp.writer:
        root = Path(runs_dir)
        made = folders_made_by(root)  # what check_writable creates
        check_writable(root)
        if tensorboard is not None:
            from ..tensorboard import check_dir

            try:
                check_dir(tensorboard)
            except ConfigError:
                for folder in made:  # nothing half-written: the runs dir goes again if this command made it
                    with suppress(OSError):
                        folder.rmdir()
                raise
    return runs


def _check_kept_cpu_paths(runs: list[Run], plan: ExecutionPlan, dev: torch.device) -> None:
    """ConfigError if this command would resume a run on a CPU path other than the one it began
    with (recorded in its config.json): a --cpu-path that names another, or a --fuse group or DDP
    job (which train eager NCHW, compiled with --compile) resuming a run begun on another path. A
    resumed run keeps its path, so that it goes on as it would have uninterrupted. Runs that kept no
    checkpoint start over (and record their new path); finished runs and runs another process
    holds are not trained by this command."""
    if dev.type != "cpu":
        return
    together = plan.fuse > 1 or plan.processes > 1
    wanted = plan.cpu_path if plan.cpu_path != "auto" else ("compiled" if plan.compile else "eager") if together else None
    if wanted is None:
        return
    for run in runs:
        if run.is_finished() or not run.has_checkpoint() or run.is_held():
            continue
        recorded = run.recorded_cpu_path()
        if recorded is not None and recorded != wanted:
            how = f"not --cpu-path {plan.cpu_path}" if plan.cpu_path != "auto" else (
                f"and a {'--fuse group' if plan.fuse > 1 else 'DDP job'} trains {wanted} on a CPU")
            fix = "drop --cpu-path (or give " + recorded + ")" if plan.cpu_path != "auto" else (
                f"resume it without {'--fuse' if plan.fuse > 1 else 'torchrun'}")
            raise ConfigError(f"{run.cfg.run_id} began on CPU path {recorded}, {how}; a resumed run keeps its path: "
                              f"{fix}, or move its directory out of the runs dir to start it over")


def _open_data(configs: list[RunConfig], data_dir: str | None, plan: ExecutionPlan, dev: torch.device,
               ddp: Distributed = SINGLE) -> dict[tuple[str, bool], "Data | imagenet.ImageNetData"]:
    """Each data set the runs train on, once: on the device (CIFAR-style), or ImageNet's scanned folders.
    With --download under torchrun, one process fetches at a time: rank 0 first, then the first process of
    each other node (its data dir may not be shared), the rest reading what they fetched: torchrun's
    processes would otherwise write the same archive and unpack it over one another."""

    def opened(download: bool) -> dict[tuple[str, bool], Data | imagenet.ImageNetData]:
        datasets: dict[tuple[str, bool], Data | imagenet.ImageNetData] = {}
        for cfg in configs:
            key = (cfg.dataset, cfg.holdout)
            if key in datasets:
                continue
            if cfg.imagenet:
                datasets[key] = imagenet.open_imagenet(data_dir or os.path.join("data", "imagenet"), decode=plan.decode)
            else:
                datasets[key] = load_data(cfg.dataset, data_dir, holdout=cfg.holdout, download=download).to(dev)
        return datasets

    if ddp.enabled and plan.download:
        turn = 0 if ddp.rank == 0 else 1 if ddp.local_rank == 0 else 2
        datasets = None
        for fetching in (0, 1):
            if turn == fetching:
                datasets = opened(download=True)
            all_reduce(torch.zeros(1, device=dev), ddp)  # a barrier: the turn's fetches are done
        datasets = datasets if datasets is not None else opened(download=False)
    else:
        datasets = opened(plan.download)
    for cfg in configs:
        check_batch_fits(cfg, datasets[(cfg.dataset, cfg.holdout)])
    return datasets


def check_batch_fits(cfg: RunConfig, data: "Data | imagenet.ImageNetData") -> None:
    """ConfigError if `cfg`'s batch is larger than its training split: every step would train on the
    whole split, a run no longer of the batch size its id names."""
    n = len(data.train)
    if cfg.batch_size > n:
        split = "training split" + (" (less the held-out part)" if cfg.holdout else "")
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than {cfg.dataset}'s {split} of {n:,} images; "
                          f"use at most {n}")


def _notes_before_training(runs: list[Run], runs_dir: str | Path, dev: torch.device, log: Callable[[str], None]
                           ) -> None:
    """What the user should know before the runs start, said once, by the process the user started
    (not by `--concurrency`'s workers): long runs on a CPU, published runs from a dirty tree."""
    if multiprocessing.parent_process() is not None:
        return
    _warn_of_long_cpu_runs(runs, dev, log)
    if note := publishing_from_a_dirty_tree(runs_dir):
        log(note)


def _warn_of_long_cpu_runs(runs: list[Run], dev: torch.device, log: Callable[[str], None]) -> None:
    """One line before long runs start on a CPU (the paper's 64k iterations, say): such a schedule
    is for a GPU, and a new user may not expect it to take hours. Counts the runs with at least
    `CPU_LONG_ITERATIONS` still to train; said once, by the process the user started (not by
    `--concurrency`'s workers)."""
    if dev.type != "cpu" or multiprocessing.parent_process() is not None:
        return
    left = [r.cfg.iterations - int(r.status().get("iteration", 0) or 0) for r in runs if not r.is_finished()]
    long = [n for n in left if n >= CPU_LONG_ITERATIONS]
    if long:
        log(f"note: {len(long)} run(s) with up to {max(long):,} iterations to train on the CPU: hours per run "
            "there; shorten them with --iterations N for a demo (`study run --grid quick`), or train on a GPU")


def _worker(configs: list[RunConfig], runs_dir: str, plan: ExecutionPlan, data_dir: str | None,
            tensorboard: str | None, name: str, threads: int | None = None) -> None:
    """A concurrent runner (see `run_all`), with the parent's plan (its device resolved, one
    process) and, on a CPU, its share of the threads; its own SIGTERM/SIGINT handling checkpoints its run."""
    def log(message: str) -> None:
        print(f"({name}) {message}", flush=True)

    if threads is not None:
        torch.set_num_threads(threads)

    with graceful_stop() as stop:
        try:
            run_all(configs, runs_dir, plan, data_dir=data_dir, progress=False, stop=stop, log=log,
                    tensorboard=tensorboard)
        except (StopRequested, KeyboardInterrupt):
            sys.exit(1)


class Claim(enum.Enum):
    """What `_ListRunner.claim` found: the run is locked here (to be trained), finished (recorded as
    such), held by another process, or a signal came while waiting for it."""

    LOCKED = "locked"
    FINISHED = "finished"
    ELSEWHERE = "held elsewhere"
    STOPPED = "stopped"


class _ListRunner:
    """Trains the runs of one list that this process gets the locks of, `plan.streams` at a time
    (interleaved step by step, `interleave`; a run that ends makes room for the next) or
    `plan.fuse` at a time (fused into grouped nets where their shapes agree), then waits for those
    held elsewhere and trains them."""

    def __init__(self, runs: list[Run], datasets: dict, plan: ExecutionPlan, session: Session,
                 log: Callable[[str], None]) -> None:
        self.runs, self.datasets, self.plan, self.session, self.log = runs, datasets, plan, session, log
        self.ddp = session.ddp
        self.results: dict[str, str] = {}
        self.locks: dict[str, ExitStack] = {}  # the runs being trained here
        self.stopped: list[StopRequested] = []
        self.fuser: Fuser | None = None

    def tag(self, i: int, run: Run) -> str:
        return f"[{i}/{len(self.runs)}] {run.cfg.run_id}"

    def claim(self, i: int, run: Run, wait: bool) -> tuple[Claim, ExitStack | None]:
        """Lock `run` to train it here: (LOCKED, the ExitStack holding its lock), or FINISHED (and
        recorded as such), ELSEWHERE (another process holds it), STOPPED (a signal came while
        waiting for it). Under DDP rank 0 takes the lock (waiting for it) and tells the others
        what it found."""
        ddp, stop = self.ddp, self.session.stop
        lock = ExitStack()
        if wait and not ddp.enabled and stop is not None:
            # Wait for the other process by polling, so that a Ctrl-C or SIGTERM meanwhile stops
            # this one at once (a blocking flock would sit through it, then train a step).
            while not lock.enter_context(run.lock(wait=False)):
                lock.close()
                if stop.signum is not None:
                    return Claim.STOPPED, None
                time.sleep(LOCK_POLL_S)
            held = True
        else:
            held = lock.enter_context(run.lock(wait=wait or ddp.enabled) if ddp.writer else nullcontext(True))
        status = run.status()["status"] if held else None
        # A run that failed in another process is left failed (not trained twice); one whose
        # process died resumes here.
        finished = held and (run.is_finished() or (wait and status == "failed"))
        held, status, finished = broadcast((held, status, finished), ddp)
        if held and not finished:
            return Claim.LOCKED, lock
        # A finished run's metrics, damaged or lost since, rebuilt from its checkpoint while the lock is held.
        repaired = run.repair_metrics() if held and status in ("done", "diverged") and ddp.writer else None
        lock.close()
        if not held:
            self.log(f"{self.tag(i, run)}: held by another process; "
                     + ("will wait for it at the end" if self.plan.wait_held else "left to it (--no-wait)"))
            return Claim.ELSEWHERE, None
        self.results[run.cfg.run_id] = status
        self.log(f"{self.tag(i, run)}: {status}, skipped")
        if repaired:
            self.log(repaired)
        return Claim.FINISHED, None

    def claimed(self, pending: list[tuple[int, Run]], wait: bool, held_elsewhere: list[tuple[int, Run]]
                ) -> Iterator[tuple[tuple[int, Run], Generator]]:
        """The runs of `pending` this process locks, each with its training steps; no new ones
        once a run has stopped on a signal (under DDP all processes agree on that; a single
        process also stops at its own flag)."""
        plan, stop = self.plan, self.session.stop
        for i, run in pending:
            if self.stopped:
                return
            if not self.ddp.enabled and stop is not None and stop.signum is not None:
                # a signal between runs stops the list too
                self.stopped.append(StopRequested(stop.signum, checkpointed=False))
                return
            claim, lock = self.claim(i, run, wait)
            if claim is Claim.STOPPED:
                self.stopped.append(StopRequested(stop.signum, checkpointed=False))
                return
            if claim is Claim.ELSEWHERE:
                held_elsewhere.append((i, run))
            if claim is not Claim.LOCKED:
                continue
            self.locks[run.cfg.run_id] = lock
            where = f"{self.session.device}" + (f" x {self.ddp.world} processes (DDP)" if self.ddp.enabled else "")
            where += f", interleaved with up to {plan.streams - 1} other run(s)" if plan.streams > 1 else ""
            where += f", to be fused with runs of its shape (up to {plan.fuse} at once)" if plan.fuse > 1 else ""
            self.log(f"{self.tag(i, run)}: training on {where}")
            session = replace(self.session, progress=self.session.progress if plan.runs_at_once == 1 else False,
                              stop=self.fuser.stop_latch if self.fuser else stop)
            yield (i, run), train_steps(
                run.cfg, run, self.datasets[(run.cfg.dataset, run.cfg.holdout)], plan, session,
                checkpoint_every=IMAGENET_CHECKPOINT_EVERY if run.cfg.imagenet else None,
            )

    def finished(self, key: tuple[int, Run], outcome: str | Exception) -> None:
        i, run = key
        self.locks.pop(run.cfg.run_id).close()
        if isinstance(outcome, StopRequested):
            self.stopped.append(outcome)
        elif isinstance(outcome, Exception):
            if self.ddp.enabled:
                raise outcome  # the other processes cannot carry on alone
            self.results[run.cfg.run_id] = "failed"
            self.log(f"{self.tag(i, run)}: failed ({type(outcome).__name__}: {outcome})")
        else:
            self.results[run.cfg.run_id] = outcome
            if self.ddp.writer:
                last = run.read_metrics().groupby("split", sort=False)["error_pct"].last()
                errors = ", ".join(f"{split} {error:.2f}%" for split, error in last.items())
                self.log(f"{self.tag(i, run)}: {outcome}" + (f" (final error: {errors})" if errors else ""))

    def new_fuser(self) -> Fuser | None:
        if self.plan.fuse == 1:
            return None
        return Fuser(self.session.device, capture=self.plan.cuda_graph, log=self.log, stop=self.session.stop)

    def run(self) -> dict[str, str]:
        held_elsewhere: list[tuple[int, Run]] = []
        device = self.session.device
        try:
            pending = list(enumerate(self.runs, 1))
            if self.plan.fuse > 1:  # runs that can be fused next to each other (seeds of one net, twins), else in order
                pending.sort(key=lambda item: fusion_order(item[1].cfg))
            self.fuser = self.new_fuser()
            interleave(self.claimed(pending, False, held_elsewhere), self.plan.runs_at_once, device, self.finished,
                       self.fuser)
            if not self.stopped and held_elsewhere and not self.plan.wait_held:
                self.log(f"{len(held_elsewhere)} run(s) held by another process, left to it (--no-wait): "
                         + ", ".join(run.cfg.run_id for _, run in held_elsewhere))
            elif not self.stopped:  # this process's own runs are done: wait for the others', in order, one
                # at a time (a run mid-training must not sit idle while the next claim waits for a lock)
                self.fuser = self.new_fuser()
                interleave(self.claimed(held_elsewhere, True, []), 1, device, self.finished, self.fuser)
        finally:
            for lock in self.locks.values():
                lock.close()
        if self.stopped:
            raise self.stopped[0]
        return self.results
