"""The stop flag that a signal handler sets and the training loop polls (`study.train.graceful_stop`)."""

from __future__ import annotations


class StopFlag:
    """Set by a signal handler, polled by the training loop between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
