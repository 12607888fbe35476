"""Several runs trained by one process at once (`--streams S`, `--fuse K`), or one: their
`train_steps` generators are driven one step each in turn, each on its own CUDA stream, or with
their steps done together by a `study.fast.fused.Fuser` (the runs' steps yield their requests,
`study.train.step.FusedMemberStep`)."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Generator, Iterator
from contextlib import nullcontext
from typing import Any

import torch

from ..data import DataError
from ..fast.fused import Fuser, Join, StepRequest


class Slot:
    """One run that `interleave` drives: its key, its steps, its stream, and what to send it next
    (a fused step's result, or the exception its step raised)."""

    __slots__ = ("key", "steps", "stream", "reply")

    def __init__(self, key: Any, steps: Generator, stream: "torch.cuda.Stream | None") -> None:
        self.key, self.steps, self.stream, self.reply = key, steps, stream, None

    def advance(self, fuser: Fuser | None) -> "StepRequest | None":
        """Run the run up to its next yield: after its next step, or (fused) to its next request."""
        reply, self.reply = self.reply, None
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            message = self.steps.throw(reply) if isinstance(reply, BaseException) else self.steps.send(reply)
            # A fused run (the runner gave a Fuser) joins at its first step, and yields None after
            # each step's bookkeeping: it goes on to its next request, which the round collects.
            while isinstance(message, Join) or (message is None and fuser is not None):
                if isinstance(message, Join):
                    fuser.join(self, message)
                message = self.steps.send(None)
        return message


def interleave(
    source: Iterator[tuple[Any, Generator]],
    slots: int,
    dev: torch.device,
    finished: Callable[[Any, "str | Exception"], None],
    fuser: Fuser | None = None,
) -> None:
    """Drive the `train_steps` generators that `source` gives, `slots` at a time, one step each in
    turn; on CUDA with several slots each has its own stream, so that one run's kernels can run
    while the host launches the next run's. With `fuser` (runs whose plan fuses them) each round
    gathers every run's step request and the fuser does them, group by group, on one stream.
    When one ends, `finished(key, outcome)` gets its final
    status or the exception that ended it (StopRequested included: the stop flag is shared, so
    every run stops after its next step, each with its own checkpoint), and the next from `source`
    takes its slot. KeyboardInterrupt and DataError stop them all: they are thrown into the others
    (which mark themselves interrupted) and raised."""
    several_streams = dev.type == "cuda" and slots > 1 and fuser is None
    free = [torch.cuda.Stream(dev) if several_streams else None for _ in range(slots)]
    active: list[Slot] = []

    def fill() -> None:
        while len(active) < slots:
            item = next(source, None)
            if item is None:
                return
            stream = free.pop()
            if stream is not None:  # the data set was put on the device on the current stream
                stream.wait_stream(torch.cuda.current_stream(dev))
            active.append(Slot(*item, stream))

    try:
        fill()
        while active:
            requests: dict[Slot, StepRequest] = {}
            if fuser is not None:
                fuser.begin_round()
            queue = list(active)
            while queue:
                slot = queue.pop(0)
                outcome: str | Exception
                try:
                    request = slot.advance(fuser)
                    if fuser is not None:
                        requests[slot] = request
                    continue
                except StopIteration as done:
                    outcome = done.value
                except DataError:
                    raise  # bad data would fail every run
                except Exception as e:  # one broken run must not take the others down
                    outcome = e
                    if slots > 1:  # free the failed run's model and graphs now
                        traceback.clear_frames(e.__traceback__)
                active.remove(slot)
                if fuser is not None:
                    fuser.leave(slot)
                if slot.stream is not None:
                    torch.cuda.current_stream(dev).wait_stream(slot.stream)
                free.append(slot.stream)
                finished(slot.key, outcome)
                filled = len(active)
                fill()
                if fuser is not None:  # a run taking the slot joins this round: one re-forming, not two
                    queue.extend(active[filled:])
            if requests:
                for slot, result in fuser.step(requests).items():
                    slot.reply = result
    except BaseException:
        for slot in active:
            try:
                slot.steps.throw(KeyboardInterrupt)
            except BaseException:  # noqa: BLE001 - each marks itself interrupted and re-raises
                pass
        raise
    finally:
        if fuser is not None:
            fuser.close()
        for stream in [*free, *(slot.stream for slot in active)]:
            if stream is not None:
                torch.cuda.current_stream(dev).wait_stream(stream)
