"""A run's configuration: one frozen dataclass, its validation and its directory name.

Everything that changes what a run computes is a field here and part of its id (so the same config
always maps to the same run directory); where the run executes (device, data location, runs dir) is
not.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from decimal import Decimal

#: The paper's nets, and beyond it the pre-activation ResNet (He et al. 2016; issue 31's arms).
ARCHS = ("plain", "resnet", "preact")
#: Initialisations: the paper's He init, and the follow-ups' arms (`study.models.cifar`).
INITS = ("he", "zero-residual", "delta-orthogonal")
#: Their run-id suffixes.
INIT_SUFFIXES = {"zero-residual": "zeroinit", "delta-orthogonal": "deltaorth"}
#: The CIFAR-style data sets (`study.data` loads them); the default is the embedded demo subset.
DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "fashion-mnist", "fashion-mnist-mini")
#: Data sets whose images are ImageNet-sized: `build_model(..., dataset=...)` gives them the Table-1 nets.
IMAGENET_DATASETS: tuple[str, ...] = ("imagenet",)
#: The ImageNet nets' depths (Table 1; `study.models.imagenet.STAGE_BLOCKS` gives their stages).
IMAGENET_DEPTHS: tuple[int, ...] = (18, 34)
#: The CIFAR depths the paper trains (6n+2; Table 6, Figure 6).
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
#: The shortcut options of section 3.3 / Table 3: A zero-padding, B projections where dimensions
#: change, C projections everywhere.
SHORTCUTS = ("A", "B", "C")
PAPER_ITERATIONS = 64_000  # CIFAR-10: 64k iterations at batch 128
PAPER_BATCH_SIZE = 128
IMAGENET_ITERATIONS = 600_000  # ImageNet: "up to 60e4 iterations" at batch 256 (about 120 epochs)
IMAGENET_BATCH_SIZE = 256
PRECISIONS = ("fp32", "bf16")
#: ImageNet's mean subtraction: the paper's per-pixel mean image, or a per-channel mean (a deviation).
MEANS = ("pixel", "channel")
LR_SCHEDULES = ("step", "plateau")
#: AlexNet's PCA lighting strength; the paper uses it on ImageNet ("standard colour augmentation").
PAPER_LIGHTING = 0.1
ALL_DATASETS: tuple[str, ...] = (*DATASETS, *IMAGENET_DATASETS)


def paper_defaults(dataset: str) -> dict:
    """The paper's settings that differ between CIFAR-10 (section 4.2) and ImageNet (3.4)."""
    if dataset in IMAGENET_DATASETS:
        return dict(iterations=IMAGENET_ITERATIONS, batch_size=IMAGENET_BATCH_SIZE, lr_schedule="plateau",
                    lighting=PAPER_LIGHTING)
    return dict(iterations=PAPER_ITERATIONS, batch_size=PAPER_BATCH_SIZE, lr_schedule="step", lighting=0.0)


class ConfigError(ValueError):
    """An invalid setting. str(e) is one line naming the problem and the fix."""


def torchrun_place() -> tuple[int, int, int]:
    """This process's (rank, world size, local rank) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK
    (SLURM's launcher sets them too): (0, 1, 0) where WORLD_SIZE is unset. ConfigError, naming the
    variable and the fix, where they are not whole numbers, RANK is missing from a job of several
    processes, or a rank lies outside the job."""
    env = os.environ

    def number(name: str, default: str | None) -> int:
        text = env.get(name, default)
        if text is None:
            raise ConfigError(f"WORLD_SIZE={env['WORLD_SIZE']} but {name} is not set; start a job of several "
                              "processes with torchrun (it sets both), or unset WORLD_SIZE")
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise ConfigError(f"{name}={text!r} is not a non-negative whole number; start the job with torchrun "
                              f"(it sets {name}), or unset {name}")
        return value

    world = number("WORLD_SIZE", "1")
    if world <= 1:
        return 0, 1, 0
    rank, local_rank = number("RANK", None), number("LOCAL_RANK", "0")
    if rank >= world:
        raise ConfigError(f"RANK={rank} is outside a job of WORLD_SIZE={world} processes (0 to {world - 1}); "
                          "start the job with torchrun")
    return rank, world, local_rank


def reports_errors() -> bool:
    """Whether this process prints a user error: under torchrun, rank 0 alone (one line, not one per
    process); every process that is not one of several, or whose variables are malformed."""
    try:
        return torchrun_place()[0] == 0
    except ConfigError:
        return True


def blocks_per_stage(depth: int) -> int:
    """n for a 6n+2-layer CIFAR net (section 4.2); ValueError naming the fix for any other depth."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"CIFAR depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, 1202, ...); got {depth}"
        )
    return (depth - 2) // 6


@dataclass(frozen=True)
class RunConfig:
    """One training run. Defaults are the paper's protocol (section 4.2 on CIFAR-style data, 3.4 on
    ImageNet), except `dataset`, whose default is the embedded demo data, not CIFAR-10."""

    arch: str
    depth: int
    dataset: str = "fashion-mnist-mini"
    shortcut: str = "A"
    # "he" (the paper's); beyond it "zero-residual" (every residual branch's last BN scale 0) or
    # "delta-orthogonal" (orthogonal centre taps): issue 31's arms, in the run id.
    init: str = "he"
    seed: int = 0
    # None: the paper's value for the data set (`paper_defaults`): 64k / 128 on CIFAR, 600k / 256
    # on ImageNet.
    iterations: int | None = None
    batch_size: int | None = None
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # "step": lr / 10 at `milestones` (CIFAR, the paper's 32k and 48k of 64k). "plateau": lr / 10
    # when the evaluation error has not improved by `plateau_threshold` points for
    # `plateau_patience` epochs (ImageNet: "divided by 10 when the error plateaus"; the paper gives
    # no patience, these are our choice). None: the paper's for the data set.
    lr_schedule: str | None = None
    milestones: tuple[float, ...] = (0.5, 0.75)
    plateau_patience: int = 5
    plateau_threshold: float = 0.1
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
    # BN groups per step: the batch is split into this many equal parts whose BN statistics are
    # computed separately, as on that many devices (the paper's CIFAR batch of 128 ran on two GPUs,
    # whether as 2 x 64 is ambiguous). Under DDP with per-device BN it is at least the number of
    # processes. The gradient is always the whole batch's mean.
    batch_split: int = 1
    # ImageNet only: AlexNet PCA lighting strength (alpha std); None: the paper's 0.1 on ImageNet.
    lighting: float | None = None
    # ImageNet only: "pixel" (the paper: a 224x224 mean image, `data.imagenet.pixel_mean`) or
    # "channel" (torchvision's per-channel mean, a deviation). CIFAR-style data always subtract
    # their per-pixel mean.
    mean: str = "pixel"

    def __post_init__(self) -> None:
        if isinstance(self.milestones, list):  # as read back from config.json
            object.__setattr__(self, "milestones", tuple(self.milestones))
        # Fill the data set's paper values for the fields left as None (frozen: no normal setattr).
        if self.dataset in ALL_DATASETS:
            for name, value in paper_defaults(self.dataset).items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        validate(self)

    @property
    def imagenet(self) -> bool:
        return self.dataset in IMAGENET_DATASETS

    @property
    def bf16(self) -> bool:
        """Whether the run trains under bf16 autocast (`--precision bf16`, a deviation) or in fp32."""
        return self.precision == "bf16"

    @property
    def run_id(self) -> str:
        """Readable directory name, e.g. `cifar10-plain56-A-s0`; non-paper settings add a suffix
        (`-it2000`, `-b64`, `-val`, `-bf16`; from the Python API also `-lr0.05`, `-wd0.0005`, ...) so
        that a shortened or changed run never shares a directory with the paper's."""
        paper = paper_defaults(self.dataset)
        parts = [self.dataset, f"{self.arch}{self.depth}", self.shortcut, f"s{self.seed}"]
        if self.iterations != paper["iterations"]:
            parts.append(f"it{self.iterations}")
        if self.batch_size != paper["batch_size"]:
            parts.append(f"b{self.batch_size}")
        if self.lr_schedule != paper["lr_schedule"]:
            parts.append(self.lr_schedule)
        if self.batch_split != 1:
            parts.append(f"bn{self.batch_split}")
        if self.lighting != paper["lighting"]:
            parts.append(f"light{self.lighting:g}")
        if self.mean != "pixel":
            parts.append(f"{self.mean}mean")
        if self.holdout:
            parts.append("val")
        if self.init != "he":
            parts.append(INIT_SUFFIXES[self.init])
        if self.precision != "fp32":
            parts.append(self.precision)
        for name, short in _OPTIMISER_SUFFIXES.items():
            value = getattr(self, name)
            if value != _DEFAULTS[name]:
                parts.append(short + "_".join(_number(v) for v in (value if isinstance(value, tuple) else (value,))))
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


#: Settings only the Python API changes, and their run-id suffixes (`-lr0.05`, `-ms0.4_0.8`, ...).
_OPTIMISER_SUFFIXES = {
    "lr": "lr", "momentum": "mom", "weight_decay": "wd", "milestones": "ms", "plateau_patience": "pp",
    "plateau_threshold": "pt", "warmup_lr": "wlr", "warmup_min_depth": "wdepth", "warmup_until_error": "wuntil",
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)}


def _number(value: float) -> str:
    """A number for a directory name, positional and without a minus (0.0005, not 5e-04)."""
    return format(Decimal(repr(value)).normalize(), "f")


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError (one line, naming the fix) for any impossible setting."""
    if cfg.arch not in ARCHS:
        raise ConfigError(f"unknown arch {cfg.arch!r}; use --arch plain or --arch resnet (or preact)")
    if cfg.init not in INITS:
        raise ConfigError(f"unknown init {cfg.init!r}; use --init he (the paper's), zero-residual or delta-orthogonal")
    if cfg.init == "zero-residual" and cfg.arch == "plain":
        raise ConfigError("--init zero-residual zeroes residual branches, which a plain net has none of; "
                          "use --arch resnet or preact")
    if cfg.dataset in IMAGENET_DATASETS and (cfg.arch == "preact" or cfg.init != "he"):
        what = "--arch preact" if cfg.arch == "preact" else f"--init {cfg.init}"
        raise ConfigError(f"{what} is built for the CIFAR-style nets only; drop it for ImageNet")
    if cfg.dataset not in ALL_DATASETS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; use one of: {', '.join(ALL_DATASETS)}")
    if cfg.imagenet:
        if cfg.depth not in IMAGENET_DEPTHS:
            raise ConfigError(
                f"ImageNet nets have depth {' or '.join(map(str, IMAGENET_DEPTHS))} (Table 1); got {cfg.depth!r}"
            )
        if cfg.holdout:
            raise ConfigError("--holdout does not apply to ImageNet (it trains on train/ and validates on val/)")
    else:
        try:
            blocks_per_stage(cfg.depth)
        except ValueError as e:
            hint = f" ({cfg.depth} is an ImageNet depth: add --dataset imagenet)" if cfg.depth in IMAGENET_DEPTHS else ""
            raise ConfigError(f"{e}{hint}") from None
        if cfg.lighting:
            raise ConfigError("--lighting (PCA colour augmentation) applies to ImageNet only; drop it")
        if cfg.mean != "pixel":
            raise ConfigError("--mean applies to ImageNet only (CIFAR-style data subtract their per-pixel mean); drop it")
    if cfg.mean not in MEANS:
        raise ConfigError(f"unknown mean {cfg.mean!r}; use --mean pixel (the paper's) or --mean channel")
    if cfg.shortcut not in SHORTCUTS:
        raise ConfigError(f"unknown shortcut option {cfg.shortcut!r}; use --shortcut A, B or C")
    if cfg.arch == "plain" and cfg.shortcut != "A":
        raise ConfigError("plain nets have no shortcuts; drop --shortcut (options B/C apply to --arch resnet)")
    for name in ("iterations", "batch_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer; got {value!r}")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be a whole number from 0 to {MAX_SEED:,}; got {cfg.seed!r}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {cfg.precision!r}; use --precision fp32 or bf16")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr schedule {cfg.lr_schedule!r}; use --lr-schedule step or plateau")
    if not isinstance(cfg.batch_split, int) or cfg.batch_split <= 0 or cfg.batch_size % cfg.batch_split:
        raise ConfigError(
            f"--batch-split {cfg.batch_split!r} must be a positive divisor of the batch size {cfg.batch_size}"
        )
    if not isinstance(cfg.plateau_patience, int) or cfg.plateau_patience <= 0:
        raise ConfigError(f"plateau patience must be a positive number of epochs; got {cfg.plateau_patience!r}")
    if cfg.lighting is not None and not 0 <= cfg.lighting < math.inf:
        raise ConfigError(f"--lighting must be a finite number >= 0 (0 turns it off; the paper's is "
                          f"{PAPER_LIGHTING}); got {cfg.lighting!r}")
    for name, ok, what in (
        ("lr", cfg.lr > 0, "> 0"), ("warmup_lr", cfg.warmup_lr > 0, "> 0"),
        ("momentum", 0 <= cfg.momentum < 1, "in [0, 1)"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("plateau_threshold", cfg.plateau_threshold >= 0, ">= 0"),
        ("warmup_until_error", cfg.warmup_until_error >= 0, ">= 0"),
    ):
        if not ok or not math.isfinite(getattr(cfg, name)):
            raise ConfigError(f"{name} must be {what} and finite; got {getattr(cfg, name)!r}")
    if not isinstance(cfg.warmup_min_depth, int) or cfg.warmup_min_depth <= 0:
        raise ConfigError(f"warmup_min_depth must be a positive integer; got {cfg.warmup_min_depth!r}")
    if not all(0 < f < 1 for f in cfg.milestones) or list(cfg.milestones) != sorted(cfg.milestones):
        raise ConfigError(f"milestones must be increasing fractions in (0, 1); got {cfg.milestones!r}")


#: The largest seed: torch's generators take 64-bit seeds, and a run mixes its seed with the epoch.
MAX_SEED = 2**63 - 1
#: The most seeds one --seeds list names: a range beyond it is a typo, and would fill the memory.
MAX_SEEDS = 10_000


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` or a range `0-4` -> list of seeds; ConfigError for anything else."""
    try:
        parts: list[range] = []  # counted before they are listed: a range of billions would fill the memory
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            parts.append(range(int(lo), int(hi if dash else lo) + 1))
    except ValueError:
        raise ConfigError(f"malformed seeds list {text!r}; write e.g. --seeds 0,1,2 or --seeds 0-4") from None
    if (count := sum(len(r) for r in parts)) > MAX_SEEDS:
        raise ConfigError(f"--seeds {text} names {count:,} seeds, more than {MAX_SEEDS:,}; name fewer, e.g. --seeds 0-4")
    seeds = [seed for r in parts for seed in r]
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds) or not all(parts):
        raise ConfigError(f"malformed seeds list {text!r}; write distinct non-negative seeds, e.g. --seeds 0,1,2")
    if max(seeds) > MAX_SEED:
        raise ConfigError(f"seed {max(seeds)} is too large; seeds run from 0 to {MAX_SEED:,}")
    return seeds


#: How a run's step may run on a CPU (`study run --cpu-path`; `study.train.cpupath` measures them):
#: name -> (channels-last tensors, compiled).
CPU_PATHS = {
    "eager": (False, False),
    "channels-last": (True, False),
    "compiled": (False, True),
    "channels-last-compiled": (True, True),
}
CPU_PATH_CHOICES = ("auto", *CPU_PATHS)
