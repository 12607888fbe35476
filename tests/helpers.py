"""The tests' shorthands for training: one run driven to its end (`train_run`), and `run_all` with the
execution modes given as keywords, each building the `ExecutionPlan` that `study run` would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import study.train
from study.config import RunConfig
from study.probes import GRADIENT_EVERY
from study.runstore import Run
from study.train import ExecutionPlan, Session, train_steps
from study.train.distributed import SINGLE, Distributed

#: Wall-clock columns of metrics.parquet: they differ between runs that are otherwise equal.
TIMING_COLUMNS = ["elapsed_s", "warmup_s"]
#: The keywords `run_all` takes into its plan.
PLAN_FIELDS = ("device", "concurrency", "streams", "fuse", "compile", "cuda_graph", "workers", "decode", "sync_bn")


def plan_for(*, ddp: Distributed = SINGLE, fuse: bool | int = 1, workers: int | None = 0, **modes: Any) -> ExecutionPlan:
    """The plan of one process training a run (`fuse=True`: as a member of a fused group)."""
    return ExecutionPlan(processes=ddp.world, fuse=2 if fuse is True else int(fuse or 1), workers=workers, **modes)


def train_steps_of(cfg: RunConfig, run: Run, data: Any, device: torch.device, *, progress: bool | None = None,
                   stop: Any = None, log: Any = None, gradient_every: int = GRADIENT_EVERY, ddp: Distributed = SINGLE,
                   checkpoint_every: int | None = None, tensorboard: str | None = None, **modes: Any):
    """`train_steps` of one run, its plan built from `modes` (compile, cuda_graph, fuse, workers)."""
    session = Session(device, ddp, progress, stop, *(() if log is None else (log,)), tensorboard=tensorboard)
    return train_steps(cfg, run, data, plan_for(ddp=ddp, **modes), session, gradient_every=gradient_every,
                       checkpoint_every=checkpoint_every)


def train_run(*args: Any, **kwargs: Any) -> str:
    """Train (or resume) one run to completion (`train_steps_of`, driven to its end): `done` or `diverged`."""
    steps = train_steps_of(*args, **kwargs)
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value


def run_all(configs: list[RunConfig], runs_dir: str | Path, **kwargs: Any) -> dict[str, str]:
    """`study.train.run_all` with the plan's fields among the keywords (device, streams, fuse, ...)."""
    plan = ExecutionPlan(**{name: kwargs.pop(name) for name in PLAN_FIELDS if name in kwargs})
    return study.train.run_all(configs, runs_dir, plan, **kwargs)


def write_small_fashion_mnist(directory):
    """Raw IDX files (torchvision's names) of 96 training and 40 test images of the embedded real
    data: a step and an evaluation cost little, and every launch is mostly process start-up."""
    from study.data import load_data
    from study.data.fashion_mnist_mini.build import write_idx

    full = load_data("fashion-mnist-mini")
    directory.mkdir(parents=True)
    for prefix, split, n in (("train", full.train, 96), ("t10k", full.eval, 40)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", split.images[:n, 0].clone())
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", split.labels[:n].to(torch.uint8))
    return directory
