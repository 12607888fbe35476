"""The learning rate: the paper's step schedule, ImageNet's plateau rule, and the paper's lr warm-up
for the deepest CIFAR net (ResNet-110: 0.01 until the training error is below 80%)."""

from __future__ import annotations

import torch

from ..config import RunConfig


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


def warm_up_ends(cfg: RunConfig, iteration: int, running_error: float) -> bool:
    """The paper's rule for ending the lr warm-up after a step: the running training error is below
    `warmup_until_error` (80%), or (step schedule) the first milestone is reached."""
    return running_error < cfg.warmup_until_error or (
        iteration >= cfg.milestone_iterations[0] and cfg.lr_schedule == "step"
    )


class Schedule:
    """The run's learning rate. `step`: `lr_at`, a function of the iteration. `plateau` (ImageNet):
    lr / 10 whenever the evaluation error has not improved by `plateau_threshold` points for more
    than `plateau_patience` epochs, decided by torch's ReduceLROnPlateau at each epoch's end."""

    def __init__(self, cfg: RunConfig, opt: torch.optim.Optimizer) -> None:
        self.cfg = cfg
        self.opt = opt
        self.plateau = None
        if cfg.lr_schedule == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="min", factor=0.1, patience=cfg.plateau_patience,
                threshold=cfg.plateau_threshold, threshold_mode="abs",
            )
        self._plateau_lr = self._group_lr()

    def _group_lr(self) -> float:
        # The scheduler's rate, read once per epoch: under --cuda-graph it is a device tensor, and
        # reading it every step would wait for the device every step.
        return float(self.opt.param_groups[0]["lr"])

    def lr(self, iteration: int, warming_up: bool) -> float:
        if self.plateau is None:
            return lr_at(self.cfg, iteration, warming_up)
        return min(self._plateau_lr, self.cfg.warmup_lr) if warming_up else self._plateau_lr

    def end_epoch(self, eval_error: float) -> None:
        if self.plateau is not None:
            self.plateau.step(eval_error)
            self._plateau_lr = self._group_lr()

    def state_dict(self) -> dict | None:
        return None if self.plateau is None else self.plateau.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """After the optimizer's own state is loaded (the plateau's rate lives in it)."""
        if self.plateau is not None and state is not None:
            self.plateau.load_state_dict(state)
        self._plateau_lr = self._group_lr()
