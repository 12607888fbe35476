"""One-time work (compiling, cuDNN autotune, CUDA-graph capture, building a fused group), timed
apart from training as the metrics' `warmup_s` (not the paper's learning-rate warm-up).

A run's `elapsed_s` is wall time. Part of it is work done once per process and batch shape, not
per step: compiling and recording CUDA graphs (`--compile`), cuDNN trying its algorithms on the
first step, the eager warm-up steps and the capture of a CUDA graph (`--cuda-graph`), and building
a fused group (`--fuse`). That part is summed here, per process, so that each run can log how
much of its `elapsed_s` it was: `elapsed_s - warmup_s` is the time it spent on everything else
(steps, evaluation, checkpoints), which a compile cache or a warm-up does not change.

Runs that one process trains at once share its wall clock, so each run counts all the one-time work
its process did while it was training (its partners' included), just as its `elapsed_s` does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_seconds = 0.0  # this process's one-time work so far


def total() -> float:
    """Seconds of one-time work this process has timed so far."""
    return _seconds


@contextmanager
def timed(device: torch.device, when: bool = True) -> Iterator[None]:
    """Count the block as one-time work if `when`. On CUDA the device is synchronised before and
    after, so that the time is the work's, not its launch's: once per batch shape, not per step."""
    global _seconds
    if not when:
        yield
        return
    _sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync(device)
        _seconds += time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
