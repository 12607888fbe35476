"""A list of runs (a grid, seeds): skip the finished, resume the unfinished, leave runs another
process holds to it (waiting for them at the end), go on after a run diverges or fails; and the
`--concurrency` worker processes that work through the same list beside this one.

Two processes on one runs dir: each run is trained by whoever holds its lock; the other skips it,
then waits for it at the end of its own list.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

from ..config import RunConfig
from ..data import Data, imagenet, load_data
from ..fast.fused import Fuser, fusion_order
from ..runstore import Run, check_writable
from ..stopflag import StopFlag
from .distributed import SINGLE, Distributed, broadcast
from .feeds import pixel_mean_options
from .interleave import interleave
from .loop import train_steps
from .plan import ExecutionPlan, default_workers, resolve_device
from .signals import StopRequested, graceful_stop

LOCK_POLL_S = 0.5  # how often a process waiting for a run another process trains looks again
IMAGENET_CHECKPOINT_EVERY = 1000  # iterations between mid-epoch checkpoints of an ImageNet run
#: Runs at least this long are hours of work per net on a CPU: `run_all` says so before starting.
CPU_LONG_ITERATIONS = 10_000


def _quiet(message: str) -> None:
    pass


def run_all(
    configs: Iterable[RunConfig],
    runs_dir: str | Path,
    *,
    data_dir: str | None = None,
    device: str = "auto",
    download: bool = False,
    progress: bool | None = None,
    stop: StopFlag | None = None,
    log: Callable[[str], None] = print,
    concurrency: int | None = 1,
    compile: bool = False,
    cuda_graph: bool = False,
    ddp: Distributed = SINGLE,
    workers: int | None = None,
    streams: int = 1,
    fuse: int = 1,
    tensorboard: str | None = None,
    decode: str = "cpu",
) -> dict[str, str]:
    """Run each config in turn: skip finished runs, resume unfinished ones, leave runs that another
    process holds to it (waiting for them at the end), and go on after a run diverges or fails.

    `concurrency` K > 1 starts K-1 worker processes that work through the same list beside this
    one, sharing the device: the per-run locks hand each run to exactly one process, and each run
    is still its own run (seed, data order, metrics, checkpoint, resume), computed by the same code
    as when it trains alone. Thin nets leave a GPU mostly idle between kernel launches; several
    processes fill those gaps.

    `streams` S > 1 makes each process train S runs at once, interleaved step by step, each on
    its own CUDA stream (one process launching for several runs; their kernels can overlap on
    the GPU); when one ends, the next takes its place. Each is still its own run, computed by the
    same code as alone.

    `fuse` K > 1 makes each process train K runs at once, fusing those of one network shape into
    one grouped network (`study.fast.fused`): one kernel per layer for all of them. Each is still its
    own run; its arithmetic is the same as alone up to rounding.

    Under DDP (`ddp`, from `distributed_from_env`) every process of the job calls this with the
    same list; they train each run together, rank 0 holding its lock and writing its files.
    ImageNet runs read `data_dir` (default ./data/imagenet) with `workers` DataLoader workers per
    process; their training JPEGs are decoded by those workers (`decode="cpu"`) or, batched, on the
    GPU (`"gpu"`, `study.data.decode`).

    `tensorboard` DIR: each run's TensorBoard events in DIR/<run id>, written by the process that
    writes its metrics (`study.tensorboard`; needs the optional tensorboard package).

    Every check that can fail on bad input (device, data, runs dir, conflicting run dirs) happens
    before the first run directory is created. Returns {run_id: final status}.
    """
    configs = list(configs)
    if tensorboard is not None:
        from ..tensorboard import require

        require()
    plan = ExecutionPlan(device=device, processes=ddp.world, concurrency=concurrency, streams=streams, fuse=fuse,
                         compile=compile, cuda_graph=cuda_graph, decode=decode)
    if ddp.enabled and device in ("auto", "cuda"):  # one GPU per process: torchrun's LOCAL_RANK
        device = f"cuda:{ddp.local_rank}" if torch.cuda.is_available() or device == "cuda" else "cpu"
    dev = resolve_device(device)
    for cfg in configs:
        ddp.chunks(cfg)  # a batch split the process count cannot honour is an error before any run
    plan.check(configs, str(dev))
    datasets: dict[tuple[str, bool], Data | imagenet.ImageNetData] = {}
    for cfg in configs:
        key = (cfg.dataset, cfg.holdout)
        if key in datasets:
            continue
        if cfg.imagenet:
            datasets[key] = imagenet.open_imagenet(data_dir or os.path.join("data", "imagenet"), decode=decode)
        else:
            datasets[key] = load_data(cfg.dataset, data_dir, holdout=cfg.holdout, download=download).to(dev)
    runs = [Run(runs_dir, cfg) for cfg in configs]
    for run in runs:
        run.check_no_conflict()
    if ddp.writer:
        check_writable(Path(runs_dir))  # last checks: they create the runs dir and the TensorBoard dir
        if tensorboard is not None:
            from ..tensorboard import check_dir

            check_dir(tensorboard)
    concurrency = plan.processes_per_device(dev.type, len(runs), ddp.enabled)
    workers = default_workers() if workers is None else workers
    if any(cfg.imagenet and cfg.mean == "pixel" for cfg in configs):
        # ImageNet's per-pixel mean: one pass over train/ (or the runs dir's cache), here, before
        # any worker process starts, so that they read it rather than each making its own pass.
        for data in datasets.values():
            if isinstance(data, imagenet.ImageNetData):
                data.mean_for("pixel", runs_dir, **pixel_mean_options(workers, dev, ddp, progress, log))
    _warn_of_long_cpu_runs(runs, dev, log if ddp.writer else _quiet)

    pool = []
    if concurrency > 1:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        kwargs = dict(data_dir=data_dir, device=str(dev), download=False, progress=False, compile=compile,
                      cuda_graph=cuda_graph, workers=workers, streams=streams, fuse=fuse, tensorboard=tensorboard,
                      decode=decode)
        pool = [
            ctx.Process(target=_worker, args=(configs, str(runs_dir), kwargs, f"worker {k}"), daemon=False)
            for k in range(1, concurrency)
        ]
        for w in pool:
            w.start()
    try:
        return _run_list(runs, datasets, dev, progress=progress, stop=stop, log=log if ddp.writer else _quiet,
                         plan=plan, ddp=ddp, workers=workers, tensorboard=tensorboard)
    finally:
        for w in pool:
            if w.is_alive() and sys.exc_info()[0] is not None:
                w.terminate()  # SIGTERM: each worker checkpoints its run and exits
            w.join()


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


def _worker(configs: list[RunConfig], runs_dir: str, kwargs: dict, name: str) -> None:
    """A concurrent runner (see `run_all`); its own SIGTERM/SIGINT handling checkpoints its run."""
    def log(message: str) -> None:
        print(f"({name}) {message}", flush=True)

    with graceful_stop() as stop:
        try:
            run_all(configs, runs_dir, stop=stop, log=log, **kwargs)
        except (StopRequested, KeyboardInterrupt):
            sys.exit(1)


class _ListRunner:
    """Trains the runs of one list that this process gets the locks of (see `_run_list`)."""

    def __init__(self, runs: list[Run], datasets: dict, dev: torch.device, *, progress: bool | None,
                 stop: StopFlag | None, log: Callable[[str], None], plan: ExecutionPlan, ddp: Distributed,
                 workers: int, tensorboard: str | None = None) -> None:
        self.runs, self.datasets, self.dev, self.progress, self.stop, self.log = runs, datasets, dev, progress, stop, log
        self.plan, self.ddp, self.workers, self.tensorboard = plan, ddp, workers, tensorboard
        self.results: dict[str, str] = {}
        self.locks: dict[str, ExitStack] = {}  # the runs being trained here
        self.stopped: list[StopRequested] = []
        self.fuser: Fuser | None = None

    def tag(self, i: int, run: Run) -> str:
        return f"[{i}/{len(self.runs)}] {run.cfg.run_id}"

    def claim(self, i: int, run: Run, wait: bool) -> ExitStack | bool | None:
        """Lock `run` to train it here: the ExitStack holding its lock; True if it is finished
        (recorded as such), False if another process holds it, None if a signal came while
        waiting for it. Under DDP rank 0 takes the lock (waiting for it) and tells the others
        what it found."""
        ddp, stop = self.ddp, self.stop
        lock = ExitStack()
        if wait and not ddp.enabled and stop is not None:
            # Wait for the other process by polling, so that a Ctrl-C or SIGTERM meanwhile stops
            # this one at once (a blocking flock would sit through it, then train a step).
            while not lock.enter_context(run.lock(wait=False)):
                lock.close()
                if stop.signum is not None:
                    return None
                time.sleep(LOCK_POLL_S)
            held = True
        else:
            held = lock.enter_context(run.lock(wait=wait or ddp.enabled) if ddp.writer else nullcontext(True))
        status = run.status()["status"] if held else None
        # A run that failed in another process is left failed (not trained twice); one whose
        # process died resumes here.
        finished = held and (run.is_finished() or (wait and status == "failed"))
        held, status, finished = broadcast((held, status, finished), ddp)
        if not held or finished:
            lock.close()
            if not held:
                self.log(f"{self.tag(i, run)}: held by another process; will wait for it at the end")
                return False
            self.results[run.cfg.run_id] = status
            self.log(f"{self.tag(i, run)}: {status}, skipped")
            return True
        return lock

    def claimed(self, pending: list[tuple[int, Run]], wait: bool, held_elsewhere: list[tuple[int, Run]]
                ) -> Iterator[tuple[tuple[int, Run], Generator[None, None, str]]]:
        """The runs of `pending` this process locks, each with its training steps; no new ones
        once a run has stopped on a signal (under DDP all processes agree on that; a single
        process also stops at its own flag)."""
        plan, stop = self.plan, self.stop
        for i, run in pending:
            if self.stopped:
                return
            if not self.ddp.enabled and stop is not None and stop.signum is not None:
                self.stopped.append(StopRequested(stop.signum))  # a signal between runs stops the list too
                return
            lock = self.claim(i, run, wait)
            if lock is None:
                self.stopped.append(StopRequested(stop.signum))
                return
            if lock is False:
                held_elsewhere.append((i, run))
                continue
            if lock is True:
                continue
            self.locks[run.cfg.run_id] = lock
            where = f"{self.dev}" + (f" x {self.ddp.world} processes (DDP)" if self.ddp.enabled else "")
            where += f", interleaved with up to {plan.streams - 1} other run(s)" if plan.streams > 1 else ""
            where += f", to be fused with runs of its shape (up to {plan.fuse} at once)" if plan.fuse > 1 else ""
            self.log(f"{self.tag(i, run)}: training on {where}")
            yield (i, run), train_steps(
                run.cfg, run, self.datasets[(run.cfg.dataset, run.cfg.holdout)], self.dev,
                progress=self.progress if plan.runs_at_once == 1 else False,
                stop=self.fuser.stop_latch if self.fuser else stop,
                compile=plan.compile, cuda_graph=plan.cuda_graph, fuse=plan.fuse > 1, ddp=self.ddp,
                workers=self.workers, checkpoint_every=IMAGENET_CHECKPOINT_EVERY if run.cfg.imagenet else None,
                tensorboard=self.tensorboard,
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
        return Fuser(self.dev, capture=self.plan.cuda_graph, log=self.log, stop=self.stop)

    def run(self) -> dict[str, str]:
        held_elsewhere: list[tuple[int, Run]] = []
        try:
            pending = list(enumerate(self.runs, 1))
            if self.plan.fuse > 1:  # runs that can be fused next to each other (seeds of one net, twins), else in order
                pending.sort(key=lambda item: fusion_order(item[1].cfg))
            self.fuser = self.new_fuser()
            interleave(self.claimed(pending, False, held_elsewhere), self.plan.runs_at_once, self.dev, self.finished,
                       self.fuser)
            if not self.stopped:  # this process's own runs are done: wait for the others', in order, one
                # at a time (a run mid-training must not sit idle while the next claim waits for a lock)
                self.fuser = self.new_fuser()
                interleave(self.claimed(held_elsewhere, True, []), 1, self.dev, self.finished, self.fuser)
        finally:
            for lock in self.locks.values():
                lock.close()
        if self.stopped:
            raise self.stopped[0]
        return self.results


def _run_list(runs: list[Run], datasets: dict[tuple[str, bool], "Data | imagenet.ImageNetData"], dev: torch.device,
              *, progress: bool | None, stop: StopFlag | None, log: Callable[[str], None], plan: ExecutionPlan,
              ddp: Distributed = SINGLE, workers: int = 0, tensorboard: str | None = None) -> dict[str, str]:
    """Train the runs this process gets the locks of, `plan.streams` at a time (interleaved step by
    step, `interleave`; a run that ends makes room for the next) or `plan.fuse` at a time (fused into
    grouped nets where their shapes agree), then wait for those held elsewhere and train them."""
    return _ListRunner(runs, datasets, dev, progress=progress, stop=stop, log=log, plan=plan, ddp=ddp,
                       workers=workers, tensorboard=tensorboard).run()
