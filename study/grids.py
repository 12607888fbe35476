"""Named grids of runs (`study grids` lists them, `study run --grid NAME` runs them)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import ConfigError, RunConfig

PAPER_DEPTHS = (20, 32, 44, 56, 110)


@dataclass(frozen=True)
class Grid:
    name: str
    description: str
    configs: tuple[RunConfig, ...]


def _pairs(depths: tuple[int, ...], **kw) -> tuple[RunConfig, ...]:
    """Plain and residual twins at each depth, plain first."""
    return tuple(RunConfig(arch=a, depth=d, **kw) for d in depths for a in ("plain", "resnet"))


# The quick demo: chosen so that 2 CPU cores finish it in about 15 minutes and it already shows the
# study's point (see the README): plain-56 trains worse than plain-20, ResNet-56 better than plain-56.
QUICK_DEPTHS = (20, 56)
QUICK_ITERATIONS = 300

GRIDS = {
    g.name: g
    for g in (
        Grid(
            "degradation",
            "plain and residual (option A) x 20/32/44/56/110 on CIFAR-10, paper schedule (64k iterations)",
            _pairs(PAPER_DEPTHS, dataset="cifar10"),
        ),
        Grid(
            "degradation-1202",
            "ResNet-110 vs ResNet-1202 on CIFAR-10, paper schedule (Figure 6 right)",
            tuple(RunConfig(arch="resnet", depth=d, dataset="cifar10") for d in (110, 1202)),
        ),
        Grid(
            "quick",
            f"CPU demo: plain and residual x {'/'.join(map(str, QUICK_DEPTHS))} on the embedded "
            f"fashion-mnist-mini, {QUICK_ITERATIONS} iterations (about 15 minutes on 2 cores)",
            _pairs(QUICK_DEPTHS, dataset="fashion-mnist-mini", iterations=QUICK_ITERATIONS),
        ),
    )
}


def grid_configs(
    name: str,
    *,
    dataset: str | None = None,
    seeds: list[int] | None = None,
    iterations: int | None = None,
    batch_size: int | None = None,
    holdout: bool | None = None,
    precision: str | None = None,
) -> list[RunConfig]:
    """The grid's runs, with any of these settings overridden, one copy per seed."""
    if name not in GRIDS:
        raise ConfigError(f"unknown grid {name!r}; `study grids` lists them: {', '.join(GRIDS)}")
    overrides = {
        k: v
        for k, v in dict(
            dataset=dataset, iterations=iterations, batch_size=batch_size, holdout=holdout, precision=precision
        ).items()
        if v is not None
    }
    return [
        replace(cfg, seed=seed, **overrides)
        for seed in (seeds if seeds is not None else [0])
        for cfg in GRIDS[name].configs
    ]
