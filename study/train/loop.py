"""One run, top to bottom: build the net, train it with the paper's schedule, evaluate every epoch,
write the epoch's rows to `metrics.parquet`, checkpoint, and resume from that checkpoint if the run
was stopped.

What survives what:
- kill -9 at any moment: files are replaced atomically; the next start resumes from the last
  end-of-epoch checkpoint, which also holds every metrics row so far (rows written after it are
  redone, never duplicated). The result equals an uninterrupted run's, bit for bit on CPU.
- SIGTERM / SIGINT: the current step finishes, a mid-epoch checkpoint is written (with the epoch's
  data order, position and running sums), the run is marked `interrupted`; resuming continues
  exactly where it stopped.
- an unreadable checkpoint: reported in one line, the previous one is used (or a clean restart).
- NaN/inf loss: the run is marked `diverged` at the iteration it happened; a grid goes on.
"""

from __future__ import annotations

import contextlib

import signal
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import onetime
from ..config import RunConfig
from ..data import Data, DataError, imagenet
from ..probes import GRADIENT_EVERY, GradientNorms, append_gradients, record_responses, truncate_gradients
from ..runstore import Run, duration, recent_speed
from ..stopflag import StopFlag
from ..tensorboard import LiveWriter
from . import checkpoint, cpupath, signals
from .distributed import SINGLE, Distributed, Follower
from .epoch import Tally, metric_row
from .feeds import CifarFeed, input_of, make_feed, quiet
from .plan import ExecutionPlan
from .schedule import Schedule, warm_up_ends
from .step import fp32_math, tune_device

PROGRESS_EVERY = 20  # iterations between progress-bar refreshes (each costs one device sync)
# Without a progress bar (output not a terminal, --no-progress, runs trained together), a run logs
# its first epoch, its last, and in between an epoch at most this often, so that a log shows it is alive.
EPOCH_LINE_EVERY_S = 60.0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class Session:
    """Where this process trains and for whom: its resolved `device`, its place in a DDP job
    (`ddp`; rank 0 alone writes), whether it shows a progress bar (`progress`, None: when stderr
    is a terminal), the flag a SIGTERM/SIGINT sets (`stop`), where its lines go (`log`) and the
    directory of its TensorBoard events (`tensorboard`, `study.tensorboard.LiveWriter`)."""

    device: torch.device
    ddp: Distributed = SINGLE
    progress: bool | None = None
    stop: StopFlag | None = None
    log: Callable[[str], None] = _stderr
    tensorboard: str | None = None


def train_steps(
    cfg: RunConfig,
    run: Run,
    data: "Data | imagenet.ImageNetData",
    plan: ExecutionPlan,
    session: Session,
    *,
    gradient_every: int = GRADIENT_EVERY,
    checkpoint_every: int | None = None,
) -> Generator[Any, Any, str]:
    """Train (or resume) one run as `plan` says, yielding None after every step (where the process
    may turn to its other runs: `study.train.interleave` drives it) and whatever its step yields
    (a fused run's requests: `study.train.step`). Its return value (that of the StopIteration) is
    the run's final status: `done` or `diverged`.

    `data` is a device-resident `Data` (already on the session's device) or, for ImageNet, the
    scanned folders (`imagenet.ImageNetData`, loaded by `plan.workers` DataLoader workers, None: in
    this process). The caller holds `run.lock()`. A SIGTERM/SIGINT recorded in `session.stop` ends
    the run after the current step with a checkpoint and raises StopRequested; any other exception
    marks the run `failed` and propagates. `checkpoint_every` N also writes a mid-epoch checkpoint
    every N iterations (long ImageNet epochs on preemptible clusters). Under DDP every process calls
    this with the same arguments; rank 0 alone writes.
    """
    try:
        t = _Training(cfg, run, data, plan, session, gradient_every)
    except signals.StopRequested:  # a signal while the CPU paths are measured: not a failure
        raise
    except Exception as e:  # setting up (a resume's files, a full disk): recorded as the loop records its own
        if session.ddp.writer:
            st = run.status()
            with contextlib.suppress(OSError):
                run.set_status("failed", iteration=st.get("iteration", 0), epoch=st.get("epoch", 0),
                               error=f"{type(e).__name__}: {e}")
        raise
    at = t.at
    if at.iteration >= cfg.iterations and at.partial_epoch is None:
        # Its last epoch closed and checkpointed, what follows (the layer responses, `done` with the final
        # errors) not written, or lost since (a kill during the probe, a damaged status.json): written now.
        t.train_err, t.eval_err = t.last_errors()
        try:
            return t.finish()
        except Exception as e:
            t.failed(e)
            raise
        finally:
            t.feed.close()
    t.begin()
    try:
        # (A checkpoint written mid-epoch at the run's last step, on a signal after it, resumes here too: its
        # epoch is closed, evaluated and logged as it would have been.)
        while at.iteration < cfg.iterations or at.partial_epoch is not None:
            tally = t.start_epoch()
            # The rate the epoch's row records if a run stopped after an epoch's last step resumes
            # with no step left in it: its last step's (exact unless that step ended the warm-up).
            lr = t.schedule.lr(max(at.iteration - 1, 0), at.warming_up)
            while at.iteration < cfg.iterations:
                batch = t.feed.next_batch(t.gen)
                if batch is None:
                    break
                x, y, global_len = batch
                lr = t.schedule.lr(at.iteration, at.warming_up)
                loss, out = yield from t.step(x, y, lr, at.iteration, global_len)
                at.iteration += 1
                tally.add(loss, out, y, at.iteration)
                if at.warming_up and warm_up_ends(cfg, at.iteration, tally.running_error()):
                    at.warming_up = False
                t.show_progress(tally, lr)
                if signals.stop_requested(session.stop, session.ddp, at.iteration):
                    t.stop(tally)
                if checkpoint_every and at.iteration % checkpoint_every == 0:
                    t.save_mid_epoch(tally)
                yield  # the step and its bookkeeping are done: the process may turn to its other runs
            # End of an epoch, or of a shortened run inside one (that partial epoch is logged too).
            if t.end_epoch(tally, lr) == "diverged":
                return "diverged"
    except signals.StopRequested:
        raise
    except KeyboardInterrupt:  # where the run will resume: its last checkpoint (a second Ctrl-C may stop a save)
        t.run.set_status("interrupted", iteration=t.saved[0], epoch=t.saved[1])
        raise
    except Exception as e:
        t.failed(e)
        raise
    finally:
        t.close()
    try:
        return t.finish()
    except Exception as e:  # the layer responses or the status record (a full disk): the run says it failed
        t.failed(e)
        raise


class _Training:
    """One session of one run for `train_steps`: what it trains with (feed, network, step,
    schedule, generator), where it stands (`at`, from its checkpoint if it has one) and what it
    does at each step's and epoch's end."""

    def __init__(self, cfg: RunConfig, run: Run, data: "Data | imagenet.ImageNetData", plan: ExecutionPlan,
                 session: Session, gradient_every: int) -> None:
        ddp, device, log = session.ddp, session.device, session.log
        self.cfg, self.session, self.ddp = cfg, session, ddp
        self.run = run if ddp.writer else Follower(run)  # type: ignore[assignment]
        image_folders = isinstance(data, imagenet.ImageNetData)
        input_shape, classes = input_of(data)
        if device.type == "cpu" and ddp.writer:
            cpupath.precision_note(cfg, log)
        # On a CPU, the run's layout and compilation (measured, cached, or kept from its first session).
        plan, cpu = plan.for_run(cfg, device, ddp, input_shape=input_shape, num_classes=classes,
                                 recorded=run.recorded_cpu_path(), iterations_left=cfg.iterations - int(run.status().get("iteration", 0)),
                                 log=log if ddp.writer else quiet, stop=session.stop)
        tune_device(device)  # IEEE fp32 (and cuDNN's autotuning), as the trainee below sets it: recorded here
        session_record = dict(processes=ddp.world, step=plan.step_kind,
                              **({"cpu_path": cpu.record()} if cpu is not None else {}),
                              **({"fp32_math": fp32_math()} if device.type == "cuda" else {}),
                              classes=classes,
                              # (rank 0's record alone is written: the others' would hash the data for nothing)
                              **({"data": data.source()} if ddp.writer else {}),
                              **({"backend": dist.get_backend(), "sync_bn": plan.sync_bn} if ddp.enabled else {}),
                              **({"views": imagenet.views_decoder(data.decode)} if image_folders else {}))
        self.run.prepare(str(device), **session_record)
        self.run.clean_temporaries()
        self.feed = make_feed(cfg, data, device, ddp, workers=plan.workers or 0, runs_dir=run.dir.parent,
                              progress=session.progress, log=log, fmt=plan.memory_format(device))
        self.net = plan.trainee(cfg, self.feed.num_classes, self.feed.in_channels, device, ddp)
        self.schedule = Schedule(cfg, self.net.opt)
        # One generator drives the data order and the augmentation, so both resume exactly.
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.at = checkpoint.RunState(warming_up=cfg.uses_warmup)
        ckpt = self.run.load_checkpoint(log=log)
        if ckpt is None and run.has_checkpoint():  # none readable: the run starts over, recorded anew (by rank 0)
            self.run.prepare(str(device), anew=True, **session_record)
        if ckpt is not None:
            self.at = checkpoint.restore(ckpt, model=self.net.model, opt=self.net.opt, gen=self.gen,
                                         schedule=self.schedule)
            if self.at.iteration < cfg.iterations:
                changed = self.run.record_resume(str(device), self.at.iteration, **session_record)
                if ddp.writer:
                    log(f"{cfg.run_id}: resuming from its checkpoint at iteration {self.at.iteration:,} of {cfg.iterations:,}")
                    if changed:
                        log(f"{cfg.run_id}: note: resumed on changed ground ({changed}): it goes on, but is no longer "
                            "bit-identical to an uninterrupted run (results are exact for one device, torch and "
                            "thread count); config.json's `resumed` records it")
        # The checkpoint holds every row so far: rewriting the file from it drops rows written after
        # the checkpoint (a kill between the two writes) and repairs an unreadable file.
        self.run.write_metrics(self.at.metrics)
        if ddp.writer:
            truncate_gradients(self.run, self.at.iteration)
        # Per-layer gradient norms every `gradient_every` iterations (kept on the device until the
        # epoch ends): evidence for the paper's claim that plain nets do not suffer vanishing gradients.
        self.grad_norms = GradientNorms(self.net.model, every=gradient_every)
        self.step = plan.step(cfg, self.net, self.grad_norms, device, ddp, log)

    def begin(self) -> None:
        """Start this session's clocks, progress bar, status and TensorBoard writer."""
        at, cfg = self.at, self.cfg
        self.show = self.ddp.writer and (sys.stderr.isatty() if self.session.progress is None else self.session.progress)
        self.bar = tqdm(total=cfg.iterations, initial=at.iteration, desc=cfg.run_id, disable=not self.show,
                        dynamic_ncols=True, leave=False)
        self.start, self.onetime_start = time.perf_counter(), onetime.total()
        self.run.set_status("running", iteration=at.iteration, epoch=at.epoch)
        self.saved = (at.iteration, at.epoch)  # the (iteration, epoch) a resume starts from: the last checkpoint's
        self.tb = LiveWriter(self.session.tensorboard if self.ddp.writer else None, cfg, at.iteration)
        self.last_line: float | None = None  # when this session last logged an epoch line

    def elapsed_s(self) -> float:
        return self.at.elapsed_s + time.perf_counter() - self.start

    def onetime_s(self) -> float:
        """Seconds of one-time work (`study.onetime`) in `elapsed_s`, earlier sessions' included."""
        return self.at.onetime_s + onetime.total() - self.onetime_start

    def save(self, partial_epoch: dict | None) -> None:
        checkpoint.save(self.run, model=self.net.model, opt=self.net.opt, gen=self.gen, schedule=self.schedule,
                        state=self.at, elapsed_s=self.elapsed_s(), onetime_s=self.onetime_s(),
                        partial_epoch=partial_epoch)
        self.saved = (self.at.iteration, self.at.epoch)

    def save_mid_epoch(self, tally: Tally) -> None:
        """The gradient norms so far, then a checkpoint inside the epoch: where its data and sums stand."""
        self.save_gradients()
        self.save({**self.feed.state(), **tally.state()})

    def save_gradients(self) -> None:
        if self.ddp.writer:
            append_gradients(self.run, self.grad_norms.rows(self.cfg.run_id))

    def start_epoch(self) -> Tally:
        self.net.forward.train()
        self.feed.start_epoch(self.at.epoch, self.gen, self.at.partial_epoch)
        tally = Tally(self.session.device, self.ddp, self.at.partial_epoch)
        self.at.partial_epoch = None
        return tally

    def show_progress(self, tally: Tally, lr: float) -> None:
        if self.show and self.at.iteration % PROGRESS_EVERY == 0:
            self.bar.update(self.at.iteration - self.bar.n)
            self.bar.set_postfix(lr=f"{lr:g}", err=f"{tally.local_error():.1f}%")

    def stop(self, tally: Tally) -> None:
        """Checkpoint mid-epoch, mark the run interrupted and raise StopRequested."""
        stop, at = self.session.stop, self.at
        self.save_mid_epoch(tally)
        signum = stop.signum if stop is not None and stop.signum is not None else signal.SIGTERM
        self.run.set_status("interrupted", iteration=at.iteration, epoch=at.epoch, signal=signal.Signals(signum).name)
        raise signals.StopRequested(signum)

    def end_epoch(self, tally: Tally, lr: float) -> str:
        """Evaluate, write the epoch's rows, checkpoint: `running`, or `diverged` (the loss was not
        finite in this epoch: the last good checkpoint is kept, and the rows show the epoch)."""
        at, cfg, ddp, model = self.at, self.cfg, self.ddp, self.net.model
        at.epoch += 1
        train_loss, self.train_err, bad_at = tally.finish()
        if ddp.enabled:  # every process evaluates rank 0's BN statistics (the checkpoint's)
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        try:
            evaluated = self.feed.evaluate(model, self.net.autocast)
        except DataError:
            # An unreadable image in val/ (found by a worker only now): the epoch's training is sound and kept,
            # checkpointed at its last step as a stop there would keep it, so that once the file is fixed the
            # same command evaluates it and goes on. (Under DDP the other processes wait in the evaluation's
            # reductions: the job ends, and resumes from the epoch's start. An epoch whose loss was not finite
            # is not kept: the last good checkpoint stays, as for any diverged epoch.)
            at.epoch -= 1  # not closed: the run stands in it, at its last step
            if not ddp.enabled and bad_at < 0:
                try:
                    self.save_mid_epoch(tally)
                except OSError as e:  # (a full disk): the unreadable image stays the error the run records
                    self.session.log(f"{cfg.run_id}: the epoch's training could not be checkpointed ({e}); the run "
                                     "resumes from its last checkpoint")
            raise
        self.schedule.end_epoch(evaluated["error_pct"])
        # The metrics' column keeps its first name, `warmup_s`: published runs' files still load.
        common = dict(epoch=at.epoch, iteration=at.iteration, lr=lr, elapsed_s=self.elapsed_s(),
                      warmup_s=self.onetime_s())
        at.metrics += [
            metric_row(cfg, split="train", loss=train_loss, error_pct=self.train_err, **common),
            metric_row(cfg, split=self.feed.eval_split, **evaluated, **common),
        ]
        self.run.write_metrics(at.metrics)
        self.tb.epoch(at.metrics, final=bad_at < 0 and at.iteration >= cfg.iterations)  # before the checkpoint
        self.save_gradients()
        if bad_at >= 0:
            self.run.set_status("diverged", iteration=bad_at, epoch=at.epoch)
            if ddp.writer:
                self.session.log(f"{cfg.run_id}: loss is not finite at iteration {bad_at}; marked diverged")
            return "diverged"
        self.save(None)
        self.eval_err = evaluated["error_pct"]
        self.run.set_status("running", iteration=at.iteration, epoch=at.epoch, train_error=self.train_err,
                            eval_error=self.eval_err)
        self.bar.update(at.iteration - self.bar.n)
        now = time.perf_counter()
        if not self.show and ddp.writer and (self.last_line is None or now - self.last_line >= EPOCH_LINE_EVERY_S
                                             or at.iteration >= cfg.iterations):
            self.last_line = now
            self.session.log(f"{cfg.run_id}: epoch {at.epoch}, iteration {at.iteration:,} of {cfg.iterations:,}: "
                             f"train error {self.train_err:.2f}%, {self.feed.eval_split} error {self.eval_err:.2f}%, "
                             f"lr {lr:g}, {common['elapsed_s']:.0f} s{self.left_text(at)}")
        return "running"

    def left_text(self, at) -> str:
        """The epoch line's end: about how long the run has left, at its speed over its last epochs (as
        `study status` estimates it); nothing at its last epoch or before a step was timed."""
        import pandas as pd

        left = self.cfg.iterations - at.iteration
        try:
            timed = recent_speed(pd.DataFrame(at.metrics)) if left > 0 else None
        except Exception:  # an estimate for the log: never the reason a run of hours stops
            return ""
        if timed is None or timed[1] <= 0:
            return ""
        return f", about {duration(timed[0] / timed[1] * left)} left"

    def failed(self, error: Exception) -> None:
        """Mark the run failed with the error's one-line reason. Where the disk is full the record
        may not fit: `Run.set_status` then overwrites the old one in place, and if even that fails
        the original error is the one that propagates (and the log has it)."""
        try:
            self.run.set_status("failed", iteration=self.at.iteration, epoch=self.at.epoch,
                                error=f"{type(error).__name__}: {error}")
        except OSError:
            pass

    def close(self) -> None:
        self.bar.close()
        self.feed.close()
        self.tb.close()

    def last_errors(self) -> tuple[float | None, float | None]:
        """The training and evaluation error of the last epoch logged (the checkpoint's rows); None where none was."""
        def last(split: str) -> float | None:
            return next((float(r["error_pct"]) for r in reversed(self.at.metrics) if r["split"] == split), None)

        return last("train"), last(self.feed.eval_split)

    def finish(self) -> str:
        """After the last epoch: Figure 7's layer responses (CIFAR-style runs; defaults: eval split,
        BN in eval mode, std over the whole tensor, first conv excluded; `study probe` re-measures),
        and the run marked done (with why a --cuda-graph capture failed, if it did: it trained
        eagerly, the same steps, slower)."""
        at = self.at
        if self.ddp.writer and isinstance(self.feed, CifarFeed):
            record_responses(self.run, self.net.model, self.feed.data, iteration=at.iteration,
                             split=self.feed.data.eval_split)
        fallback = {"cuda_graph_fallback": self.step.fallback} if self.step.fallback else {}
        self.run.set_status("done", iteration=at.iteration, epoch=at.epoch, train_error=self.train_err,
                            eval_error=self.eval_err, **fallback)
        return "done"
