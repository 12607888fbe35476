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

import inspect
import signal
import sys
import time
from collections.abc import Callable, Generator
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import onetime
from ..config import RunConfig
from ..data import Data, imagenet
from ..fast.fused import Join, StepRequest, fusion_key
from ..probes import GRADIENT_EVERY, GradientNorms, append_gradients, record_responses, truncate_gradients
from ..runstore import Run
from ..stopflag import StopFlag
from ..tensorboard import LiveWriter
from . import checkpoint, signals
from .distributed import SINGLE, Distributed, Follower
from .epoch import Tally, metric_row
from .feeds import CifarFeed, make_feed
from .plan import ExecutionPlan
from .schedule import Schedule, warm_up_ends
from .step import CapturedStep, EagerStep, make_trainee

PROGRESS_EVERY = 20  # iterations between progress-bar refreshes (each costs one device sync)
# Without a progress bar (output not a terminal, --no-progress, runs trained together), a run logs
# its first epoch, its last, and in between an epoch at most this often, so that a log shows it is alive.
EPOCH_LINE_EVERY_S = 60.0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def train_run(*args: Any, **kwargs: Any) -> str:
    """Train (or resume) one run to completion: `train_steps` (same arguments) driven to its end.
    Returns the run's final status: `done` or `diverged`."""
    if kwargs.get("fuse"):
        raise ValueError("a fused run's steps are done by a Fuser: train it with run_all(fuse=K)")
    steps = train_steps(*args, **kwargs)
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value


def train_steps(
    cfg: RunConfig,
    run: Run,
    data: "Data | imagenet.ImageNetData",
    device: torch.device,
    *,
    progress: bool | None = None,
    stop: StopFlag | None = None,
    log: Callable[[str], None] = _stderr,
    compile: bool = False,
    cuda_graph: bool = False,
    gradient_every: int = GRADIENT_EVERY,
    ddp: Distributed = SINGLE,
    workers: int = 0,
    checkpoint_every: int | None = None,
    fuse: bool = False,
    tensorboard: str | None = None,
) -> Generator["None | Join | StepRequest", Any, str]:
    """Train (or resume) one run, yielding after every training step; its return value (that of
    the StopIteration) is the run's final status: `done` or `diverged`. `train_run` drives it to the
    end; `study.train.interleave` interleaves several runs' steps.

    `data` is a device-resident `Data` (already on `device`) or, for ImageNet, the scanned folders
    (`imagenet.ImageNetData`, loaded by `workers` DataLoader workers). The caller should hold
    `run.lock()`. A SIGTERM/SIGINT recorded in `stop` ends the run after the current step with a
    checkpoint and raises StopRequested; any other exception marks the run `failed` and propagates.
    `checkpoint_every` N also writes a mid-epoch checkpoint every N iterations (long ImageNet
    epochs on preemptible clusters). `cuda_graph` replays each step as one CUDA graph
    (`study.fast.graphstep`; one process, CIFAR-style data, no BN split, not with `compile`); on CPU
    the same step runs uncaptured. Under DDP (`ddp`) every process calls this with the same
    arguments; rank 0 alone writes (also `tensorboard`: `study.tensorboard.LiveWriter`'s events).

    With `fuse` the step is done by whoever drives the generator (`interleave` with a
    `study.fast.fused.Fuser`, which trains several runs as one grouped net): it first yields a `Join`
    with the run's model and optimizer, then a `StepRequest` for each step, to which it expects
    the step's (loss, logits, gradient norms) to be sent.
    """
    if not ddp.writer:
        run = Follower(run)  # type: ignore[assignment]
    ddp.chunks(cfg)  # a batch split the process count cannot honour: an error before anything is written
    plan = ExecutionPlan(processes=ddp.world, compile=compile, cuda_graph=cuda_graph, fuse=2 if fuse else 1)  # 2: fused
    plan.check([cfg])
    classes = data.num_classes if isinstance(data, imagenet.ImageNetData) else data.info.num_classes
    run.prepare(str(device), processes=ddp.world, step=plan.step_kind, classes=classes,
                **({"backend": dist.get_backend(), "sync_bn": ddp.sync_bn} if ddp.enabled else {}),
                **({"views": imagenet.views_decoder(data.decode)} if isinstance(data, imagenet.ImageNetData) else {}))
    run.clean_temporaries()
    feed = make_feed(cfg, data, device, ddp, workers=workers, runs_dir=run.dir.parent, progress=progress, log=log)
    net = make_trainee(cfg, feed.num_classes, feed.in_channels, device, ddp, compile=compile)
    model, opt = net.model, net.opt
    schedule = Schedule(cfg, opt)
    # One generator drives the data order and the augmentation, so both resume exactly.
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    at = checkpoint.RunState(warming_up=cfg.uses_warmup)
    ckpt = run.load_checkpoint(log=log)
    if ckpt is not None:
        at = checkpoint.restore(ckpt, model=model, opt=opt, gen=gen, schedule=schedule)
        if ddp.writer and at.iteration < cfg.iterations:
            log(f"{cfg.run_id}: resuming from its checkpoint at iteration {at.iteration:,} of {cfg.iterations:,}")
    # The checkpoint holds every row so far: rewriting the file from it drops rows written after
    # the checkpoint (a kill between the two writes) and repairs an unreadable file.
    run.write_metrics(at.metrics)
    if ddp.writer:
        truncate_gradients(run, at.iteration)
    # Per-layer gradient norms every `gradient_every` iterations (kept on the device until the
    # epoch ends): evidence for the paper's claim that plain nets do not suffer vanishing gradients.
    grad_norms = GradientNorms(model, every=gradient_every)
    if cuda_graph and not fuse:
        step: EagerStep | CapturedStep = CapturedStep(net, grad_norms, device, bf16=cfg.precision == "bf16", log=log)
    else:
        step = EagerStep(net, grad_norms, device, ddp, exact_mean=not ddp.enabled and ddp.chunks(cfg) == 1,
                         compile=compile)
    if at.iteration >= cfg.iterations:
        run.set_status("done", iteration=at.iteration, epoch=at.epoch)
        return "done"
    joined = None
    if fuse:
        joined = Join(model, opt, [name for name, _ in grad_norms.params], fusion_key(cfg, model),
                      bf16=cfg.precision == "bf16", name=cfg.run_id)
        yield joined

    def save(partial_epoch: dict | None) -> None:
        checkpoint.save(run, model=model, opt=opt, gen=gen, schedule=schedule, state=at, fused=fuse,
                        elapsed_s=at.elapsed_s + time.perf_counter() - start, warmup_s=warmup_s(),
                        partial_epoch=partial_epoch)

    def save_gradients() -> None:
        if ddp.writer:
            append_gradients(run, grad_norms.rows(cfg.run_id))

    def warmup_s() -> float:
        return at.warmup_s + onetime.total() - onetime_start

    show = ddp.writer and (sys.stderr.isatty() if progress is None else progress)
    bar = tqdm(total=cfg.iterations, initial=at.iteration, desc=cfg.run_id, disable=not show, dynamic_ncols=True,
               leave=False)
    start, onetime_start = time.perf_counter(), onetime.total()
    run.set_status("running", iteration=at.iteration, epoch=at.epoch)
    tb = LiveWriter(tensorboard if ddp.writer else None, cfg, at.iteration)
    last_line = None  # when this session last logged an epoch line
    try:
        while at.iteration < cfg.iterations:
            net.forward.train()
            feed.start_epoch(at.epoch, gen, at.partial_epoch)
            tally = Tally(device, ddp, at.partial_epoch)
            at.partial_epoch = None
            # The rate the epoch's row records if a run stopped after an epoch's last step resumes
            # with no step left in it: its last step's (exact unless that step ended the warm-up).
            lr = schedule.lr(max(at.iteration - 1, 0), at.warming_up)
            while at.iteration < cfg.iterations:
                batch = feed.next_batch(gen)
                if batch is None:
                    break
                x, y, global_len = batch
                lr = schedule.lr(at.iteration, at.warming_up)
                if fuse:
                    for group in opt.param_groups:  # what the checkpoint records
                        group["lr"] = lr
                    loss, out, norms = yield StepRequest(x, y, lr, norms=grad_norms.due(at.iteration + 1))
                    if norms is not None:
                        grad_norms.record(at.iteration + 1, norms)
                else:
                    loss, out = step(x, y, lr, at.iteration, global_len)
                at.iteration += 1
                tally.add(loss, out, y, at.iteration)
                if at.warming_up and warm_up_ends(cfg, at.iteration, tally.running_error()):
                    at.warming_up = False
                if show and at.iteration % PROGRESS_EVERY == 0:
                    bar.update(at.iteration - bar.n)
                    bar.set_postfix(lr=f"{lr:g}", err=f"{tally.local_error():.1f}%")
                if signals.stop_requested(stop, ddp, at.iteration):
                    save_gradients()
                    save({**feed.state(), **tally.state()})
                    signum = stop.signum if stop is not None and stop.signum is not None else signal.SIGTERM
                    run.set_status("interrupted", iteration=at.iteration, epoch=at.epoch,
                                   signal=signal.Signals(signum).name)
                    raise signals.StopRequested(signum)
                if checkpoint_every and at.iteration % checkpoint_every == 0:
                    save_gradients()
                    save({**feed.state(), **tally.state()})
                if not fuse:  # a fused run has yielded its step's request
                    yield
            # End of an epoch, or of a shortened run inside one (that partial epoch is logged too).
            at.epoch += 1
            train_loss, train_err, bad_at = tally.finish()
            if ddp.enabled:  # every process evaluates rank 0's BN statistics (the checkpoint's)
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=0)
            evaluated = feed.evaluate(model, net.autocast)
            schedule.end_epoch(evaluated["error_pct"])
            common = dict(epoch=at.epoch, iteration=at.iteration, lr=lr,
                          elapsed_s=at.elapsed_s + time.perf_counter() - start, warmup_s=warmup_s())
            at.metrics += [
                metric_row(cfg, split="train", loss=train_loss, error_pct=train_err, **common),
                metric_row(cfg, split=feed.eval_split, **evaluated, **common),
            ]
            run.write_metrics(at.metrics)
            tb.epoch(at.metrics, final=bad_at < 0 and at.iteration >= cfg.iterations)  # before the checkpoint
            save_gradients()
            if bad_at >= 0:
                # Keep the last good checkpoint; the rows show the epoch it happened in.
                run.set_status("diverged", iteration=bad_at, epoch=at.epoch)
                if ddp.writer:
                    log(f"{cfg.run_id}: loss is not finite at iteration {bad_at}; marked diverged")
                return "diverged"
            save(None)
            eval_err = evaluated["error_pct"]
            run.set_status("running", iteration=at.iteration, epoch=at.epoch, train_error=train_err,
                           eval_error=eval_err)
            bar.update(at.iteration - bar.n)
            now = time.perf_counter()
            if not show and ddp.writer and (last_line is None or now - last_line >= EPOCH_LINE_EVERY_S
                                            or at.iteration >= cfg.iterations):
                last_line = now
                log(f"{cfg.run_id}: epoch {at.epoch}, iteration {at.iteration:,} of {cfg.iterations:,}: train error "
                    f"{train_err:.2f}%, {feed.eval_split} error {eval_err:.2f}%, lr {lr:g}, {common['elapsed_s']:.0f} s")
    except signals.StopRequested:
        raise
    except KeyboardInterrupt:
        run.set_status("interrupted", iteration=at.iteration, epoch=at.epoch)
        raise
    except Exception as e:
        run.set_status("failed", iteration=at.iteration, epoch=at.epoch, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        bar.close()
        feed.close()
        tb.close()
    # Figure 7's layer responses, measured once on the finished model (defaults: eval split, BN in
    # eval mode, std over the whole tensor, first conv excluded; `study probe` re-measures).
    # Figure 7 is a CIFAR figure; ImageNet runs skip it.
    if ddp.writer and isinstance(feed, CifarFeed):
        record_responses(run, model, data, iteration=at.iteration, split=data.eval_split)
    # A --cuda-graph run whose capture failed trained eagerly (same steps, slower): say so.
    fallback_reason = (joined or step).fallback
    fallback = {"cuda_graph_fallback": fallback_reason} if cuda_graph and fallback_reason else {}
    run.set_status("done", iteration=at.iteration, epoch=at.epoch, train_error=train_err, eval_error=eval_err,
                   **fallback)
    return "done"


train_run.__signature__ = inspect.signature(train_steps).replace(return_annotation=str)  # type: ignore[attr-defined]
