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
- two processes on one runs dir: each run is trained by whoever holds its lock; the other skips it,
  then waits for it at the end of its own list.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import RunConfig
from .data import Data, augment, eval_batches, load_data, normalize
from .models import build_model
from .probes import GRADIENT_EVERY, GradientNorms, append_gradients, record_responses, truncate_gradients
from .runstore import Run, RunStoreError, check_writable

EVAL_BATCH_SIZE = 1000
AUTO_GPU_CONCURRENCY = 4  # runs sharing one GPU when --concurrency is not given
PROGRESS_EVERY = 20  # iterations between progress-bar refreshes (each costs one device sync)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class StopRequested(Exception):
    """Raised after a SIGTERM/SIGINT once the run's state is safely on disk."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopFlag:
    """Set by a signal handler, polled by the training loop between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None


@contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    """While active, SIGTERM and SIGINT ask the loop to stop after the current step (a second
    signal of the same kind stops at once, the usual escape hatch)."""
    flag = StopFlag()

    def handler(signum: int, frame: object) -> None:
        if flag.signum is not None:
            raise KeyboardInterrupt
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is a one-line error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for but no CUDA GPU is visible; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use --device auto, cpu or cuda") from None


def lr_at(cfg: RunConfig, iteration: int, warming_up: bool) -> float:
    """The paper's step schedule counted in iterations: lr / 10 at each milestone (32k and 48k of
    64k). While a deep net warms up it uses `warmup_lr` (0.01); warm-up ends when the running
    training error drops below 80% or, at the latest, at the first milestone (the paper does not
    say what happens to a net that never gets there; this keeps the schedule from stalling)."""
    decays = sum(iteration >= m for m in cfg.milestone_iterations)
    lr = cfg.lr * 0.1**decays
    if warming_up and decays == 0:
        lr = min(lr, cfg.warmup_lr)
    return lr


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Data) -> tuple[float, float]:
    """Mean loss and error % over the whole evaluation split, BN in eval mode, no augmentation."""
    model.eval()
    loss_sum = torch.zeros((), device=data.mean.device)
    wrong = torch.zeros((), device=data.mean.device, dtype=torch.long)
    for x, y in eval_batches(data.eval, EVAL_BATCH_SIZE):
        out = model(normalize(x, data.mean))
        loss_sum += F.cross_entropy(out, y, reduction="sum")
        wrong += (out.argmax(1) != y).sum()
    n = len(data.eval.labels)
    return loss_sum.item() / n, 100.0 * wrong.item() / n


def sgd_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    data: Data,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    lr: float,
    autocast: torch.autocast,
    fmt: torch.memory_format,
    before_update: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step of the paper's protocol on a uint8 batch: mean subtraction, per-image
    pad/crop/flip, forward (under `autocast`), cross-entropy, backward, SGD update at `lr`.
    `before_update` runs between backward and the update (to read the gradients). Returns the
    detached loss and logits; nothing here waits for the device."""
    for group in opt.param_groups:
        group["lr"] = lr
    x = augment(normalize(x_u8, data.mean), gen).contiguous(memory_format=fmt)
    with autocast:
        out = forward(x)
        loss = F.cross_entropy(out, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if before_update is not None:
        before_update()
    opt.step()
    return loss.detach(), out.detach()


def _metric_row(cfg: RunConfig, **values: object) -> dict:
    return {
        "run_id": cfg.run_id,
        "dataset": cfg.dataset,
        "arch": cfg.arch,
        "depth": cfg.depth,
        "shortcut": cfg.shortcut,
        "seed": cfg.seed,
        **values,
    }


def train_run(
    cfg: RunConfig,
    run: Run,
    data: Data,
    device: torch.device,
    *,
    progress: bool | None = None,
    stop: StopFlag | None = None,
    log: Callable[[str], None] = _stderr,
    compile: bool = False,
    gradient_every: int = GRADIENT_EVERY,
) -> str:
    """Train (or resume) one run to completion. Returns its final status: `done` or `diverged`.

    `data` must already be on `device`. The caller should hold `run.lock()`. A SIGTERM/SIGINT
    recorded in `stop` ends the run after the current step with a checkpoint and raises
    StopRequested; any other exception marks the run `failed` and propagates.
    """
    run.prepare(str(device))
    run.clean_temporaries()
    torch.manual_seed(cfg.seed)  # the model's initial weights depend on the seed alone
    model = build_model(
        cfg.arch,
        cfg.depth,
        shortcut=cfg.shortcut,
        num_classes=data.info.num_classes,
        in_channels=data.info.in_channels,
    ).to(device)
    # Channels-last lets cuDNN pick its fastest kernels on tensor cores; on CPU it buys nothing.
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    # The compiled module shares its parameters with `model`; checkpoints keep using `model`, so
    # they load with or without --compile. On CUDA "max-autotune" also captures CUDA graphs,
    # removing the launch overhead that dominates these thin nets. Compilation happens on the
    # first steps; the run's elapsed_s includes that time.
    forward = model
    if compile:
        forward = torch.compile(model, mode="max-autotune" if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # One generator drives the data order and the augmentation, so both resume exactly.
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    iteration, epoch, elapsed_before, warming_up = 0, 0, 0.0, cfg.uses_warmup
    rows: list[dict] = []
    partial = None  # the state of an epoch interrupted by a signal

    ckpt = run.load_checkpoint(log=log)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        iteration, epoch = ckpt["iteration"], ckpt["epoch"]
        elapsed_before, warming_up = ckpt["elapsed_s"], ckpt["warming_up"]
        rows, partial = list(ckpt["metrics"]), ckpt["partial_epoch"]
    # The checkpoint holds every row so far: rewriting the file from it drops rows written after
    # the checkpoint (a kill between the two writes) and repairs an unreadable file.
    run.write_metrics(rows)
    truncate_gradients(run, iteration)
    # Per-layer gradient norms every `gradient_every` iterations (kept on the device until the
    # epoch ends): evidence for the paper's claim that plain nets do not suffer vanishing gradients.
    grad_norms = GradientNorms(model, every=gradient_every)
    if iteration >= cfg.iterations:
        run.set_status("done", iteration=iteration, epoch=epoch)
        return "done"

    def checkpoint(partial_epoch: dict | None) -> None:
        run.save_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "iteration": iteration,
                "epoch": epoch,  # completed epochs
                "elapsed_s": elapsed_before + time.perf_counter() - start,
                "warming_up": warming_up,
                "metrics": rows,
                "partial_epoch": partial_epoch,
            }
        )

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(
        total=cfg.iterations, initial=iteration, desc=cfg.run_id, disable=not show, dynamic_ncols=True, leave=False
    )
    start = time.perf_counter()
    n_train = len(data.train.labels)
    run.set_status("running", iteration=iteration, epoch=epoch)
    try:
        while iteration < cfg.iterations:
            model.train()
            if partial is None:
                order = torch.randperm(n_train, generator=gen, device=device)
                pos, seen = 0, 0
                # Sums stay on the device: no host sync per step.
                loss_sum = torch.zeros((), device=device)
                wrong = torch.zeros((), device=device, dtype=torch.long)
                # -1 until a step's loss is not finite, then that step's iteration number.
                first_bad = torch.full((), -1, device=device, dtype=torch.long)
            else:
                order, pos, seen = partial["order"].to(device), partial["pos"], partial["seen"]
                loss_sum, wrong = partial["loss_sum"].to(device), partial["wrong"].to(device)
                first_bad = partial["first_bad"].to(device)
                partial = None
            while pos < n_train and iteration < cfg.iterations:
                idx = order[pos : pos + cfg.batch_size]
                x_u8, y = data.train.images.index_select(0, idx), data.train.labels.index_select(0, idx)
                pos += len(idx)
                lr = lr_at(cfg, iteration, warming_up)
                loss, out = sgd_step(
                    forward, opt, data, x_u8, y, gen, lr, autocast, fmt,
                    before_update=lambda: grad_norms.maybe_record(iteration + 1),
                )
                iteration += 1
                loss_sum += loss * len(y)
                wrong += (out.argmax(1) != y).sum()
                seen += len(y)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), iteration, first_bad)
                if warming_up and (
                    100.0 * wrong.item() / seen < cfg.warmup_until_error
                    or iteration >= cfg.milestone_iterations[0]
                ):
                    warming_up = False
                if show and iteration % PROGRESS_EVERY == 0:
                    bar.update(iteration - bar.n)
                    bar.set_postfix(lr=f"{lr:g}", err=f"{100.0 * wrong.item() / seen:.1f}%")
                if stop is not None and stop.signum is not None:
                    append_gradients(run, grad_norms.rows(cfg.run_id))
                    checkpoint(
                        {"order": order, "pos": pos, "seen": seen, "loss_sum": loss_sum, "wrong": wrong, "first_bad": first_bad}
                    )
                    run.set_status("interrupted", iteration=iteration, epoch=epoch, signal=signal.Signals(stop.signum).name)
                    raise StopRequested(stop.signum)
            # End of an epoch, or of a shortened run inside one (that partial epoch is logged too).
            epoch += 1
            train_loss, train_err = loss_sum.item() / seen, 100.0 * wrong.item() / seen
            with autocast:
                eval_loss, eval_err = evaluate(model, data)
            common = dict(epoch=epoch, iteration=iteration, lr=lr, elapsed_s=elapsed_before + time.perf_counter() - start)
            rows += [
                _metric_row(cfg, split="train", loss=train_loss, error_pct=train_err, **common),
                _metric_row(cfg, split=data.eval_split, loss=eval_loss, error_pct=eval_err, **common),
            ]
            run.write_metrics(rows)
            append_gradients(run, grad_norms.rows(cfg.run_id))
            bad_at = int(first_bad.item())
            if bad_at >= 0:
                # Keep the last good checkpoint; the rows show the epoch it happened in.
                run.set_status("diverged", iteration=bad_at, epoch=epoch)
                log(f"{cfg.run_id}: loss is not finite at iteration {bad_at}; marked diverged")
                return "diverged"
            checkpoint(None)
            run.set_status("running", iteration=iteration, epoch=epoch, train_error=train_err, eval_error=eval_err)
            bar.update(iteration - bar.n)
    except StopRequested:
        raise
    except KeyboardInterrupt:
        run.set_status("interrupted", iteration=iteration, epoch=epoch)
        raise
    except Exception as e:
        run.set_status("failed", iteration=iteration, epoch=epoch, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        bar.close()
    # Figure 7's layer responses, measured once on the finished model (defaults: eval split, BN in
    # eval mode, std over the whole tensor, first conv excluded; `study probe` re-measures).
    record_responses(run, model, data, split=data.eval_split)
    run.set_status("done", iteration=iteration, epoch=epoch, train_error=train_err, eval_error=eval_err)
    return "done"


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
) -> dict[str, str]:
    """Run each config in turn: skip finished runs, resume unfinished ones, leave runs that another
    process holds to it (waiting for them at the end), and go on after a run diverges or fails.

    `concurrency` K > 1 starts K-1 worker processes that work through the same list beside this
    one, sharing the device: the per-run locks hand each run to exactly one process, and each run
    is still its own run (seed, data order, metrics, checkpoint, resume), computed by the same code
    as when it trains alone. Thin nets leave a GPU mostly idle between kernel launches; several
    processes fill those gaps.

    Every check that can fail on bad input (device, data, runs dir, conflicting run dirs) happens
    before the first run directory is created. Returns {run_id: final status}.
    """
    configs = list(configs)
    dev = resolve_device(device)
    datasets: dict[tuple[str, bool], Data] = {}
    for cfg in configs:
        key = (cfg.dataset, cfg.holdout)
        if key not in datasets:
            datasets[key] = load_data(cfg.dataset, data_dir, holdout=cfg.holdout, download=download).to(dev)
    runs = [Run(runs_dir, cfg) for cfg in configs]
    for run in runs:
        if run.conflicts():
            raise RunStoreError(
                f"{run.dir} holds a run with a different or unreadable config.json; "
                "move that directory away or use another --runs-dir"
            )
    check_writable(Path(runs_dir))  # last check: it creates the runs dir
    if concurrency is None:  # auto: share a GPU between a few runs, one at a time on a CPU
        concurrency = min(AUTO_GPU_CONCURRENCY, len(runs)) if dev.type == "cuda" else 1

    workers = []
    if concurrency > 1:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        kwargs = dict(data_dir=data_dir, device=str(dev), download=False, progress=False, compile=compile)
        workers = [
            ctx.Process(target=_worker, args=(configs, str(runs_dir), kwargs, f"worker {k}"), daemon=False)
            for k in range(1, concurrency)
        ]
        for w in workers:
            w.start()
    try:
        results = _run_list(runs, datasets, dev, progress=progress, stop=stop, log=log, compile=compile)
    finally:
        for w in workers:
            if w.is_alive() and sys.exc_info()[0] is not None:
                w.terminate()  # SIGTERM: each worker checkpoints its run and exits
            w.join()
    return results


def _worker(configs: list[RunConfig], runs_dir: str, kwargs: dict, name: str) -> None:
    """A concurrent runner (see `run_all`); its own SIGTERM/SIGINT handling checkpoints its run."""
    def log(message: str) -> None:
        print(f"({name}) {message}", flush=True)

    with graceful_stop() as stop:
        try:
            run_all(configs, runs_dir, stop=stop, log=log, **kwargs)
        except (StopRequested, KeyboardInterrupt):
            sys.exit(1)


def _run_list(
    runs: list[Run],
    datasets: dict[tuple[str, bool], Data],
    dev: torch.device,
    *,
    progress: bool | None,
    stop: StopFlag | None,
    log: Callable[[str], None],
    compile: bool,
) -> dict[str, str]:
    results: dict[str, str] = {}
    total = len(runs)

    def attempt(i: int, run: Run, wait: bool) -> bool:
        """Train `run` if this process gets its lock; False if another process holds it."""
        tag = f"[{i}/{total}] {run.cfg.run_id}"
        with run.lock(wait=wait) as held:
            if not held:
                log(f"{tag}: held by another process; will wait for it at the end")
                return False
            status = run.status()["status"]
            # A run that failed in another process is left failed (not trained twice); one whose
            # process died resumes here.
            if run.is_finished() or (wait and status == "failed"):
                results[run.cfg.run_id] = status
                log(f"{tag}: {status}, skipped")
                return True
            log(f"{tag}: training on {dev}")
            data = datasets[(run.cfg.dataset, run.cfg.holdout)]
            try:
                results[run.cfg.run_id] = train_run(
                    run.cfg, run, data, dev, progress=progress, stop=stop, compile=compile
                )
            except (StopRequested, KeyboardInterrupt):
                raise
            except Exception as e:  # one broken run must not take the grid down
                results[run.cfg.run_id] = "failed"
                log(f"{tag}: failed ({type(e).__name__}: {e})")
                return True
            last = run.read_metrics().groupby("split")["error_pct"].last().round(2).to_dict()
            log(f"{tag}: {results[run.cfg.run_id]} (last error %: {last})")
            return True

    held_elsewhere = [(i, run) for i, run in enumerate(runs, 1) if not attempt(i, run, wait=False)]
    for i, run in held_elsewhere:
        attempt(i, run, wait=True)
    return results
