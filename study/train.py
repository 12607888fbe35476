"""One run, top to bottom: build the net, train it with the paper's schedule, evaluate every epoch,
append the epoch's rows to `metrics.parquet`, checkpoint, and resume from that checkpoint if the run
was stopped.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import RunConfig
from .data import Data, augment, eval_batches, load_data, normalize, train_batches
from .models import build_model
from .runstore import Run, check_writable

EVAL_BATCH_SIZE = 1000
PROGRESS_EVERY = 20  # iterations between progress-bar refreshes (each costs one device sync)


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


def train_run(cfg: RunConfig, run: Run, data: Data, device: torch.device, *, progress: bool | None = None) -> str:
    """Train (or resume) one run to completion. Returns its final status: `done` or `diverged`.

    `data` must already be on `device`. On an exception the run is marked `interrupted` (Ctrl-C) or
    `failed`; the last end-of-epoch checkpoint stays the resume point.
    """
    run.prepare(str(device))
    torch.manual_seed(cfg.seed)  # the model's initial weights depend on the seed alone
    model = build_model(
        cfg.arch,
        cfg.depth,
        shortcut=cfg.shortcut,
        num_classes=data.info.num_classes,
        in_channels=data.info.in_channels,
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # One generator drives the data order and the augmentation, so both resume exactly.
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    iteration, epoch, elapsed_before, warming_up = 0, 0, 0.0, cfg.uses_warmup

    ckpt = run.load_checkpoint()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        iteration, epoch = ckpt["iteration"], ckpt["epoch"]
        elapsed_before, warming_up = ckpt["elapsed_s"], ckpt["warming_up"]
    # Rows written after the last checkpoint (a kill between the two writes) are redone.
    run.truncate_metrics(epoch)
    if iteration >= cfg.iterations:
        run.set_status("done", iteration=iteration, epoch=epoch)
        return "done"

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(
        total=cfg.iterations, initial=iteration, desc=cfg.run_id, disable=not show, dynamic_ncols=True, leave=False
    )
    start = time.perf_counter()
    run.set_status("running", iteration=iteration, epoch=epoch)
    try:
        while iteration < cfg.iterations:
            epoch += 1
            model.train()
            # Sums stay on the device: no host sync per step.
            loss_sum = torch.zeros((), device=device)
            wrong = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            for x_u8, y in train_batches(data.train, cfg.batch_size, gen):
                lr = lr_at(cfg, iteration, warming_up)
                for group in opt.param_groups:
                    group["lr"] = lr
                x = augment(normalize(x_u8, data.mean), gen)
                out = model(x)
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(y)
                wrong += (out.detach().argmax(1) != y).sum()
                seen += len(y)
                iteration += 1
                if warming_up and (
                    100.0 * wrong.item() / seen < cfg.warmup_until_error
                    or iteration >= cfg.milestone_iterations[0]
                ):
                    warming_up = False
                if show and iteration % PROGRESS_EVERY == 0:
                    bar.update(iteration - bar.n)
                    bar.set_postfix(lr=f"{lr:g}", err=f"{100.0 * wrong.item() / seen:.1f}%")
                if iteration >= cfg.iterations:
                    break  # a shortened run may end inside an epoch: that partial epoch is logged too
            train_loss, train_err = loss_sum.item() / seen, 100.0 * wrong.item() / seen
            eval_loss, eval_err = evaluate(model, data)
            elapsed = elapsed_before + time.perf_counter() - start
            common = dict(epoch=epoch, iteration=iteration, lr=lr, elapsed_s=elapsed)
            run.append_metrics(
                [
                    _metric_row(cfg, split="train", loss=train_loss, error_pct=train_err, **common),
                    _metric_row(cfg, split=data.eval_split, loss=eval_loss, error_pct=eval_err, **common),
                ]
            )
            if not math.isfinite(train_loss):
                run.set_status("diverged", iteration=iteration, epoch=epoch)
                return "diverged"
            run.save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "iteration": iteration,
                    "epoch": epoch,
                    "elapsed_s": elapsed,
                    "warming_up": warming_up,
                }
            )
            run.set_status("running", iteration=iteration, epoch=epoch, train_error=train_err, eval_error=eval_err)
            bar.update(iteration - bar.n)
    except KeyboardInterrupt:
        run.set_status("interrupted", iteration=iteration, epoch=epoch)
        raise
    except Exception as e:
        run.set_status("failed", iteration=iteration, epoch=epoch, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        bar.close()
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
    log=print,
) -> dict[str, str]:
    """Run each config in turn (skipping finished runs, resuming unfinished ones).

    All checks that can fail on bad input (device, runs dir, data) happen before the first run
    directory is created. Returns {run_id: final status}.
    """
    configs = list(configs)
    dev = resolve_device(device)
    datasets: dict[tuple[str, bool], Data] = {}
    for cfg in configs:
        key = (cfg.dataset, cfg.holdout)
        if key not in datasets:
            datasets[key] = load_data(cfg.dataset, data_dir, holdout=cfg.holdout, download=download).to(dev)
    check_writable(Path(runs_dir))  # last check: it creates the runs dir
    results = {}
    for i, cfg in enumerate(configs, 1):
        run = Run(runs_dir, cfg)
        if run.status().get("status") == "done":
            log(f"[{i}/{len(configs)}] {cfg.run_id}: done, skipped")
            results[cfg.run_id] = "done"
            continue
        log(f"[{i}/{len(configs)}] {cfg.run_id}: training on {dev}")
        results[cfg.run_id] = train_run(cfg, run, datasets[(cfg.dataset, cfg.holdout)], dev, progress=progress)
        final = run.read_metrics().groupby("split").last()["error_pct"].round(2).to_dict()
        log(f"[{i}/{len(configs)}] {cfg.run_id}: {results[cfg.run_id]} (error % {final})")
    return results
