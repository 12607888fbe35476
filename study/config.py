"""A run's configuration: one frozen dataclass, its validation and its directory name.

Everything that changes what a run computes is a field here and part of its id (so the same config
always maps to the same run directory); where the run executes (device, data location, runs dir) is
not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .data import DATASETS
from .models import SHORTCUTS, blocks_per_stage

ARCHS = ("plain", "resnet")
PAPER_ITERATIONS = 64_000
PAPER_BATCH_SIZE = 128
PRECISIONS = ("fp32", "bf16")


class ConfigError(ValueError):
    """An invalid setting. str(e) is one line naming the problem and the fix."""


@dataclass(frozen=True)
class RunConfig:
    """One training run. Defaults are the paper's CIFAR-10 protocol (section 4.2)."""

    arch: str
    depth: int
    dataset: str = "fashion-mnist-mini"
    shortcut: str = "A"
    seed: int = 0
    iterations: int = PAPER_ITERATIONS
    batch_size: int = PAPER_BATCH_SIZE
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # lr / 10 at these fractions of the run: 32k and 48k of 64k in the paper.
    milestones: tuple[float, ...] = (0.5, 0.75)
    # Paper: 110 layers and deeper start at lr 0.01 until the training error is below 80%.
    warmup_lr: float = 0.01
    warmup_min_depth: int = 110
    warmup_until_error: float = 80.0
    # False: train on the full training set, evaluate on the test set (the paper's curves).
    # True: hold out 10% of the training set as validation (the paper's 45k/5k split).
    holdout: bool = False
    # "fp32" (the paper) or "bf16": bf16 autocast for the forward pass, fp32 weights, optimizer
    # state and BN statistics. A deviation, so a flag; it is part of the run id.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        validate(self)

    @property
    def run_id(self) -> str:
        """Readable directory name, e.g. `cifar10-plain56-A-s0`; non-paper settings add a suffix
        (`-it2000`, `-b64`, `-val`, `-bf16`) so that a shortened run never shares a directory with a full one."""
        parts = [self.dataset, f"{self.arch}{self.depth}", self.shortcut, f"s{self.seed}"]
        if self.iterations != PAPER_ITERATIONS:
            parts.append(f"it{self.iterations}")
        if self.batch_size != PAPER_BATCH_SIZE:
            parts.append(f"b{self.batch_size}")
        if self.holdout:
            parts.append("val")
        if self.precision != "fp32":
            parts.append(self.precision)
        return "-".join(parts)

    @property
    def milestone_iterations(self) -> tuple[int, ...]:
        """The lr-decay iterations, scaled with `iterations` (32000, 48000 for 64k)."""
        return tuple(round(f * self.iterations) for f in self.milestones)

    @property
    def uses_warmup(self) -> bool:
        return self.depth >= self.warmup_min_depth

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "milestones" in kwargs:
            kwargs["milestones"] = tuple(kwargs["milestones"])
        return cls(**kwargs)


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError (one line, naming the fix) for any impossible setting."""
    if cfg.arch not in ARCHS:
        raise ConfigError(f"unknown arch {cfg.arch!r}; use --arch plain or --arch resnet")
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; use one of: {', '.join(DATASETS)}")
    try:
        blocks_per_stage(cfg.depth)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.shortcut not in SHORTCUTS:
        raise ConfigError(f"unknown shortcut option {cfg.shortcut!r}; use --shortcut A, B or C")
    if cfg.arch == "plain" and cfg.shortcut != "A":
        raise ConfigError("plain nets have no shortcuts; drop --shortcut (options B/C apply to --arch resnet)")
    for name in ("iterations", "batch_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer; got {value!r}")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer; got {cfg.seed!r}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {cfg.precision!r}; use --precision fp32 or bf16")
    if not all(0 < f < 1 for f in cfg.milestones) or list(cfg.milestones) != sorted(cfg.milestones):
        raise ConfigError(f"milestones must be increasing fractions in (0, 1); got {cfg.milestones!r}")


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` or a range `0-4` -> list of seeds; ConfigError for anything else."""
    try:
        seeds: list[int] = []
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-"))
                if hi < lo:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise ConfigError(f"malformed seeds list {text!r}; write e.g. --seeds 0,1,2 or --seeds 0-4") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"malformed seeds list {text!r}; write distinct non-negative seeds, e.g. --seeds 0,1,2")
    return seeds
