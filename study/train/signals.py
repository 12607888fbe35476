"""Stopping a run gracefully: SIGTERM/SIGINT set a flag that the loop polls between steps; once the
run's state is on disk the loop raises `StopRequested`."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..stopflag import StopFlag
from .distributed import Distributed

#: Iterations between the DDP processes' agreements on whether to stop (one tiny all-reduce).
AGREE_EVERY = 20


class StopRequested(Exception):
    """Raised after a SIGTERM/SIGINT once the run's state is safely on disk."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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


def stop_requested(stop: StopFlag | None, ddp: Distributed, iteration: int) -> bool:
    """Whether to stop after this step. A single process checks its flag every step; DDP processes
    agree every AGREE_EVERY steps (one tiny all-reduce), so that they all stop at one step."""
    local = stop is not None and stop.signum is not None
    if not ddp.enabled:
        return local
    if iteration % AGREE_EVERY:
        return False
    flag = torch.tensor([1.0 if local else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
