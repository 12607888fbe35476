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
    """Raised after a SIGTERM/SIGINT once the run's state is safely on disk: a checkpoint, or
    (`checkpointed` False) nothing yet to keep, the signal having come before the run's first step
    (while its CPU paths were measured, say)."""

    def __init__(self, signum: int, *, checkpointed: bool = True) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.checkpointed = checkpointed

    def outcome(self) -> str:
        """What the stop kept and how to go on, for the user's one line."""
        if self.checkpointed:
            return "checkpoint written, run the same command again to resume"
        return "before a run's first step, nothing to keep; run the same command again to go on"


def raise_if_stopped(stop: StopFlag | None) -> None:
    """StopRequested (nothing checkpointed) if a signal has set `stop`: for work before a run's
    first step that may take minutes (measuring its CPU paths), which a stop should not wait for."""
    if stop is not None and stop.signum is not None:
        raise StopRequested(stop.signum, checkpointed=False)


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
