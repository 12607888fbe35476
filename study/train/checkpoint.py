"""What a run's checkpoint holds, in one place: `save` writes every key, `restore` reads them back.

A checkpoint is a dict saved atomically by `Run.save_checkpoint` (`checkpoint.pt` in the run's
directory), written at the end of every epoch, on SIGTERM/SIGINT (with the interrupted epoch's
state), and every `checkpoint_every` iterations if asked (ImageNet). Its keys:

- `model`, `optimizer`: the network's and SGD's state dicts (momentum buffers included);
- `generator`: the run's random generator (data order and augmentation), so both resume exactly;
- `schedule`: the plateau schedule's state (None for the step schedule);
- `iteration`, `epoch` (completed epochs), `elapsed_s`, `warmup_s` (the one-time work in it,
  `study.onetime`: `RunState.onetime_s`; the key keeps its first name so that checkpoints written
  before the rename resume), `warming_up` (the paper's lr warm-up still on);
- `metrics`: every metrics row so far (rows written after the checkpoint are redone, never
  duplicated);
- `partial_epoch`: None at an epoch's end; in a checkpoint written mid-epoch (on a signal, or every
  `checkpoint_every` iterations), the feed's position and the epoch's running sums
  (`study.train.epoch.Tally.state`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..runstore import Run
from .schedule import Schedule
from .step import lay_out_like_params

KEYS = ("model", "optimizer", "generator", "schedule", "iteration", "epoch", "elapsed_s", "warmup_s", "warming_up",
        "metrics", "partial_epoch")


@dataclass
class RunState:
    """Where a run stands besides its tensors (iteration, epoch, time, warm-up, rows so far): what
    `restore` gives back and `save` records."""

    warming_up: bool
    iteration: int = 0
    epoch: int = 0  # completed epochs
    elapsed_s: float = 0.0  # wall time of the sessions before this one
    onetime_s: float = 0.0  # seconds of one-time work (`study.onetime`) in elapsed_s
    metrics: list[dict] = field(default_factory=list)
    partial_epoch: dict | None = None  # the state of an epoch checkpointed before its end


def save(run: Run, *, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
         schedule: Schedule, state: RunState, elapsed_s: float, onetime_s: float, partial_epoch: dict | None
         ) -> None:
    """Write the run's checkpoint: `state` with this session's `elapsed_s` and `onetime_s` totals.
    A fused run's tensors are views of its group's: saved as they are, each would carry the whole
    group's storage, so such views are copied (`owned`; other tensors are saved as they are)."""
    record = {
        "model": owned(model.state_dict()),
        "optimizer": owned(opt.state_dict()),
        "generator": gen.get_state(),
        "schedule": schedule.state_dict(),
        "iteration": state.iteration,
        "epoch": state.epoch,
        "elapsed_s": elapsed_s,
        "warmup_s": onetime_s,
        "warming_up": state.warming_up,
        "metrics": state.metrics,
        "partial_epoch": partial_epoch,
    }
    assert tuple(record) == KEYS
    run.save_checkpoint(record)


def restore(ckpt: dict, *, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
            schedule: Schedule) -> RunState:
    """Load `ckpt` into the run's model, optimizer, generator and schedule; its progress."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    lay_out_like_params(opt)
    for group in opt.param_groups:  # a --cuda-graph checkpoint's fused SGD and tensor lr
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = float(group["lr"])  # the plateau schedule's current rate: keep it
        group.update(fused=None, foreach=None)
    gen.set_state(ckpt["generator"])
    schedule.load_state_dict(ckpt.get("schedule"))
    return RunState(
        warming_up=ckpt["warming_up"],
        iteration=ckpt["iteration"],
        epoch=ckpt["epoch"],
        elapsed_s=ckpt["elapsed_s"],
        onetime_s=ckpt.get("warmup_s", 0.0),  # absent from checkpoints of before it was kept
        metrics=list(ckpt["metrics"]),
        partial_epoch=ckpt["partial_epoch"],
    )


def owned(state: Any) -> Any:
    """`state` with each tensor that is a view into a larger storage replaced by its own copy; the
    same object where there is none (a run that is not fused: its state dicts, `_metadata` and all,
    are saved as they are)."""
    if isinstance(state, torch.Tensor):
        return state.clone() if state.untyped_storage().nbytes() > state.numel() * state.element_size() else state
    if isinstance(state, dict):
        copied = {k: owned(v) for k, v in state.items()}
        return state if all(copied[k] is v for k, v in state.items()) else copied
    if isinstance(state, (list, tuple)):
        copied = [owned(v) for v in state]
        return state if all(c is v for c, v in zip(copied, state)) else type(state)(copied)
    return state
