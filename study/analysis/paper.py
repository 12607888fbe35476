"""The paper's numbers (He et al. 2015, arXiv:1512.03385), as `shared/paper/PROTOCOL.md` collects them.

Every figure, table and claim compares the runs with these values; nothing here is computed.
Series are keyed by `(arch, depth, shortcut)`, the run config's own vocabulary; a plain net is listed
under shortcut "A", whose parameters it shares (the run ids use the same convention).
"""

from __future__ import annotations

from dataclasses import dataclass

CIFAR_ITERATIONS = 64_000
IMAGENET_ITERATIONS = 600_000
IMAGENET = "imagenet"

Series = tuple[str, int, str]  # (arch, depth, shortcut)


@dataclass(frozen=True)
class PaperError:
    """One error % as the paper reports it: the best run, and for repeated runs their mean +- std."""

    best: float
    mean: float | None = None
    std: float | None = None
    runs: int = 1

    @property
    def reference(self) -> float:
        """The number to compare a mean over seeds with: the paper's mean where it gives one."""
        return self.mean if self.mean is not None else self.best

    def __str__(self) -> str:
        if self.mean is None:
            return f"{self.best:.2f}"
        return f"{self.best:.2f} ({self.mean:.2f} ± {self.std:.2f})"


# Table 6: CIFAR-10 test error % of the ResNets (option A). No plain-net numbers: plain nets appear
# only as curves in Figure 6.
TABLE6: dict[Series, PaperError] = {
    ("resnet", 20, "A"): PaperError(8.75),
    ("resnet", 32, "A"): PaperError(7.51),
    ("resnet", 44, "A"): PaperError(7.17),
    ("resnet", 56, "A"): PaperError(6.97),
    ("resnet", 110, "A"): PaperError(6.43, mean=6.61, std=0.16, runs=5),
    ("resnet", 1202, "A"): PaperError(7.93),
}

# Table 2: ImageNet top-1 error %, 10-crop testing on the validation set, option A shortcuts.
TABLE2: dict[Series, PaperError] = {
    ("plain", 18, "A"): PaperError(27.94),
    ("plain", 34, "A"): PaperError(28.54),
    ("resnet", 18, "A"): PaperError(27.88),
    ("resnet", 34, "A"): PaperError(25.03),
}

# Table 3: ImageNet 34-layer nets, (top-1, top-5) error %, 10-crop validation, per shortcut option.
TABLE3: dict[Series, tuple[PaperError, PaperError]] = {
    ("plain", 34, "A"): (PaperError(28.54), PaperError(10.02)),
    ("resnet", 34, "A"): (PaperError(25.03), PaperError(7.76)),
    ("resnet", 34, "B"): (PaperError(24.52), PaperError(7.46)),
    ("resnet", 34, "C"): (PaperError(24.19), PaperError(7.40)),
}

# ResNet-1202 reaches "< 0.1%" training error (section 4.2).
RESNET1202_TRAIN_ERROR_BELOW = 0.1


@dataclass(frozen=True)
class FigureSpec:
    """A figure's series as the paper draws them, and its error axis's range. (The x axis always
    spans the runs' whole budget: the paper's Figure 1 stops at 6e4 of its 6.4e4 iterations.)"""

    title: str
    panels: tuple[tuple[str, tuple[Series, ...]], ...]  # (panel title, series)
    ylim: tuple[float, float] | None = None


def _plain(*depths: int) -> tuple[Series, ...]:
    return tuple(("plain", d, "A") for d in depths)


def _resnet(*depths: int) -> tuple[Series, ...]:
    return tuple(("resnet", d, "A") for d in depths)


FIGURES: dict[str, FigureSpec] = {
    "fig1": FigureSpec(
        "Figure 1: training and test error of 20- and 56-layer plain nets",
        (("training error", _plain(20, 56)), ("test error", _plain(20, 56))),
        ylim=(0, 20),
    ),
    "fig4": FigureSpec(
        "Figure 4: ImageNet, plain vs ResNet, 18 and 34 layers",
        (("plain", _plain(18, 34)), ("ResNet", _resnet(18, 34))),
        ylim=(20, 60),
    ),
    "fig6": FigureSpec(
        "Figure 6: CIFAR-10, plain nets, ResNets, and ResNet-110 vs 1202",
        (
            # The paper leaves plain-110 out (its error stays above 60%); runs of it are drawn, and a
            # note names it when it lies above the axis.
            ("plain", _plain(20, 32, 44, 56)),
            ("ResNet", _resnet(20, 32, 44, 56, 110)),
            ("ResNet-110 vs 1202", _resnet(110, 1202)),
        ),
        ylim=(0, 20),
    ),
    "fig7": FigureSpec(
        "Figure 7: standard deviation of the layer responses",
        (("original order", _plain(20, 56) + _resnet(20, 56, 110)),),
    ),
}

def choose_series(present: list[Series], wanted: tuple[Series, ...], fallback: list[Series]) -> list[Series]:
    """The paper's series the runs have (a figure's, `wanted`), where they span at least two depths (a comparison of
    depth, as the paper's is); else `fallback`, the depths the runs have (a study at other depths,
    such as `quick`'s 8 and 20 layers, would otherwise show one net alone)."""
    chosen = [s for s in wanted if s in present]
    return chosen if len({s[1] for s in chosen}) >= 2 else fallback


# "Claims the study exists to test" (PROTOCOL.md), numbered as there.
CLAIMS: dict[int, str] = {
    1: "Degradation: a deeper plain net has higher training error than a shallower one, so it is not over-fitting",
    2: "The plain nets' trouble is not vanishing gradients: forward signals have non-zero variance, "
    "backward gradients have healthy norms",
    3: "Residual nets reverse it: deeper ResNets reach lower training and test error (up to 110 layers on CIFAR)",
    4: "ResNet-1202 trains to the same low training error as ResNet-110 but tests worse (over-fitting)",
    5: "Residual layer responses are smaller than plain ones, and shrink as depth grows (Figure 7)",
    6: "On ImageNet, shortcut option B is slightly better than A and C slightly better than B, "
    "none essential to fixing degradation (Table 3)",
}


#: The paper's nets; any other `arch` of the analysis is a follow-up's arm (`study.analysis.arms`).
PAPER_ARCHS = ("plain", "resnet")

#: How a follow-up's initialisation (`study.analysis.load.net_of`) is named after its net.
INIT_LABELS = {"zeroinit": "zero-init", "deltaorth": "delta-orthogonal"}


def series_label(arch: str, depth: int, shortcut: str = "A") -> str:
    """The paper's name for a net: `plain-20`, `ResNet-56`; a non-A ResNet adds its option (`ResNet-34 B`).
    Beyond the paper: `PreAct-ResNet-56`, and an initialisation after the name (`ResNet-56 zero-init`,
    `plain-56 delta-orthogonal`)."""
    base, _, init = arch.partition("+")
    if base == "plain":
        name = f"plain-{depth}"
    else:
        name = ("PreAct-" if base == "preact" else "") + f"ResNet-{depth}" + ("" if shortcut == "A" else f" {shortcut}")
    return name + (f" {INIT_LABELS.get(init, init)}" if init else "")


def net_label(arch: str) -> str:
    """A net's name without its depth: `plain`, `ResNet`, `PreAct-ResNet`, `ResNet zero-init`."""
    return series_label(arch, 0).replace("-0", "")
