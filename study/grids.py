"""Named grids of runs (`study grids` lists them, `study run --grid NAME` runs them)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import IMAGENET_DATASETS, ConfigError, RunConfig

PAPER_DEPTHS = (20, 32, 44, 56, 110)


@dataclass(frozen=True)
class Grid:
    name: str
    description: str
    configs: tuple[RunConfig, ...]
    #: The seeds `study run --grid NAME` trains when `--seeds` is not given.
    seeds: tuple[int, ...] = (0,)


def _pairs(depths: tuple[int, ...], **kw) -> tuple[RunConfig, ...]:
    """Plain and residual twins at each depth, plain first."""
    return tuple(RunConfig(arch=a, depth=d, **kw) for d in depths for a in ("plain", "resnet"))


# The quick study (issue 19): the smallest CPU-scale budget tried at which the whole degradation
# story shows on real data, averaged over 3 seeds (results/quick/, and docs/laptop-study.md for the
# budgets tried and the per-seed numbers): plain-20 trains worse than plain-8, ResNet-20 better
# than ResNet-8, and better than its plain twin. 125 iterations was too few for ResNet-20.
QUICK_DEPTHS = (8, 20)
QUICK_ITERATIONS = 250
QUICK_SEEDS = (0, 1, 2)
QUICK_MINUTES = "5 to 11"  # measured on 2 idle cores: 5 min 27 s (AMD EPYC with AVX-512, 2026-12-06), 7 min 20 s
# (Intel Xeon, 2026-12-06), 10 min 40 s (AMD EPYC with AVX2 only, 2026-12-07)

# The same study four times longer (results/laptop/): the ResNets' gain is larger, the plain nets'
# degradation only a tendency (not significant over 3 seeds).
LAPTOP_DEPTHS = QUICK_DEPTHS
LAPTOP_ITERATIONS = 1000

# Issue 29: the paper's own pair, 20 and 56 layers, on a CPU. The full Fashion-MNIST (60,000 images:
# the embedded 10,000 may be memorised by both nets at these budgets), the paper's protocol and batch
# with only the iterations shortened, in bf16 on the CPU's matrix units (a deviation, in the run ids).
# The pilot trains the ResNets alone at growing budgets, to find where ResNet-56 passes ResNet-20
# (results/paper-depths-pilot/); the study trains both pairs at the pilot's largest budget, over 3 seeds:
# in seed 0 ResNet-56 passes ResNet-20 in training error first at 32k (2.79 against 3.07%; at 16k it was
# still a point behind), which is also the most a 2-core CPU campaign can afford (about 32 core-hours:
# seed 0's four runs took 10.6 hours by their own clocks, one thread each, on an AMD EPYC).
PAIR_DEPTHS = (20, 56)
PILOT_BUDGETS = (4000, 8000, 16000, 32000)
PAIR_ITERATIONS = PILOT_BUDGETS[-1]
PAIR = dict(dataset="fashion-mnist", precision="bf16")
# bf16 is a deviation: the same nets at the pilot's first budget in fp32 and bf16 say whether it keeps
# fp32's verdicts.
BF16_CHECK_ITERATIONS = 4000

# Issue 31: the follow-ups' answers to degradation beside the paper's nets, at the paper-depths pilot's
# first budget (4k: ResNet-56 still behind ResNet-20 there; do the arms that start each block as the
# identity change that?), in bf16 like the paper-depths study, 3 seeds.
FOLLOWUP_ITERATIONS = 4000
FOLLOWUP_NETS = (("plain", "he"), ("resnet", "he"), ("preact", "he"), ("resnet", "zero-residual"),
                 ("plain", "delta-orthogonal"))

GRIDS = {
    g.name: g
    for g in (
        Grid(
            "degradation",
            "plain and residual (option A) x 20/32/44/56/110 on CIFAR-10, paper schedule (64k iterations; "
            "about 2 h a seed on one H200, 4 runs at once, projected from bf16/TF32 throughput: docs/performance.md)",
            _pairs(PAPER_DEPTHS, dataset="cifar10"),
        ),
        Grid(
            "degradation-1202",
            "ResNet-110 vs ResNet-1202 on CIFAR-10, paper schedule (Figure 6 right)",
            tuple(RunConfig(arch="resnet", depth=d, dataset="cifar10") for d in (110, 1202)),
        ),
        Grid(
            "degradation-imagenet",
            "plain and residual (option A) x 18/34 on ImageNet, paper protocol (Figure 4, Table 2)",
            _pairs((18, 34), dataset="imagenet"),
        ),
        Grid(
            "shortcuts-imagenet",
            "plain-34 and ResNet-34 with shortcut options A, B and C on ImageNet (Table 3)",
            (RunConfig(arch="plain", depth=34, dataset="imagenet"),)
            + tuple(RunConfig(arch="resnet", depth=34, dataset="imagenet", shortcut=o) for o in "ABC"),
        ),
        Grid(
            "quick",
            f"CPU study: plain and residual x {'/'.join(map(str, QUICK_DEPTHS))} on the embedded fashion-mnist-mini, "
            f"{QUICK_ITERATIONS} iterations, seeds {QUICK_SEEDS[0]}-{QUICK_SEEDS[-1]}: the whole effect "
            f"(results/quick/; {QUICK_MINUTES} minutes on 2 cores)",
            _pairs(QUICK_DEPTHS, dataset="fashion-mnist-mini", iterations=QUICK_ITERATIONS),
            seeds=QUICK_SEEDS,
        ),
        Grid(
            "paper-depths-pilot",
            f"ResNet-20 vs ResNet-56 on the full fashion-mnist at {'/'.join(f'{b // 1000}k' for b in PILOT_BUDGETS)} "
            "iterations, seed 0, bf16 (a deviation): how long depth takes to pay (results/paper-depths-pilot/; "
            "about 14 core-hours on an AMD EPYC, by its runs' own clocks)",
            tuple(RunConfig(arch="resnet", depth=d, iterations=b, **PAIR) for b in PILOT_BUDGETS for d in PAIR_DEPTHS),
        ),
        Grid(
            "paper-depths",
            f"plain and residual x {'/'.join(map(str, PAIR_DEPTHS))} on the full fashion-mnist, {PAIR_ITERATIONS:,} "
            "iterations, bf16 (a deviation), seeds 0-2: the paper's pair on a CPU (results/paper-depths/; about "
            "32 core-hours on an AMD EPYC, by seed 0's runs' own clocks)",
            _pairs(PAIR_DEPTHS, iterations=PAIR_ITERATIONS, **PAIR),
            seeds=QUICK_SEEDS,
        ),
        Grid(
            "paper-depths-bf16-check",
            f"plain and residual x {'/'.join(map(str, PAIR_DEPTHS))} on the full fashion-mnist, "
            f"{BF16_CHECK_ITERATIONS:,} iterations, seed 0, in fp32 and in bf16: whether bf16 keeps fp32's "
            "verdicts (results/paper-depths-bf16-check/; about 4 core-hours on an AMD EPYC, by its runs' own clocks)",
            _pairs(PAIR_DEPTHS, iterations=BF16_CHECK_ITERATIONS, dataset="fashion-mnist")
            + _pairs(PAIR_DEPTHS, iterations=BF16_CHECK_ITERATIONS, **PAIR),
        ),
        Grid(
            "followups",
            f"beyond the paper: plain, ResNet, pre-activation ResNet, zero-init ResNet and delta-orthogonal plain x "
            f"{'/'.join(map(str, PAIR_DEPTHS))} on the full fashion-mnist, {FOLLOWUP_ITERATIONS:,} iterations, bf16, "
            "seeds 0-2 (docs/followups.md, results/followups/; about 9.5 core-hours on an AMD EPYC, by its runs' own clocks)",
            tuple(RunConfig(arch=a, depth=d, init=i, iterations=FOLLOWUP_ITERATIONS, **PAIR)
                  for d in PAIR_DEPTHS for a, i in FOLLOWUP_NETS),
            seeds=QUICK_SEEDS,
        ),
        Grid(
            "laptop",
            f"the quick study, {LAPTOP_ITERATIONS} iterations: a larger ResNet gain, plain degradation only a "
            "tendency (results/laptop/; 20 to 45 minutes on 2 cores)",
            _pairs(LAPTOP_DEPTHS, dataset="fashion-mnist-mini", iterations=LAPTOP_ITERATIONS),
            seeds=QUICK_SEEDS,
        ),
    )
}


def grid_configs(
    name: str,
    *,
    dataset: str | None = None,
    seeds: list[int] | None = None,
    **settings: object,
) -> list[RunConfig]:
    """The grid's runs, with any RunConfig field in `settings` (and `dataset`) overridden where it is
    not None, one copy per seed (``seeds``, else the grid's own). A grid's data set can change only within its family (CIFAR-style
    data sets, or ImageNet): the depths differ between the two."""
    if name not in GRIDS:
        raise ConfigError(f"unknown grid {name!r}; `study grids` lists them: {', '.join(GRIDS)}")
    overrides = {k: v for k, v in settings.items() if v is not None}
    out = []
    for seed in seeds if seeds is not None else GRIDS[name].seeds:
        for cfg in GRIDS[name].configs:
            if dataset is not None and (dataset in IMAGENET_DATASETS) != cfg.imagenet:
                fix = "--dataset imagenet" if cfg.imagenet else "a CIFAR-style --dataset"
                family = "ImageNet" if cfg.imagenet else "CIFAR-style"
                raise ConfigError(f"grid {name!r} is for {family} data; use {fix} or another grid (`study grids`)")
            changed = {**overrides, **({"dataset": dataset} if dataset is not None else {})}
            out.append(replace(cfg, seed=seed, **changed))
    return out
