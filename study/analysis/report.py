"""The claims report: every figure, every table, and one verdict per claim of the paper, as Markdown
or as one self-contained HTML file (`html.py`).

Each claim of PROTOCOL.md ("Claims the study exists to test") is judged from the finished runs
present: `holds`, `does not hold`, or `cannot be judged` when the runs it needs are missing. Verdicts
compare means over seeds; the evidence line gives the numbers and the number of seeds, and each
two-way comparison of errors the difference of the means with its 95% confidence interval (Welch's t,
`scipy.stats`) and the per-seed order ("higher in 3 of 3 seeds"); claim 5 compares the nets' mean
response stds the same way. A verdict that rests on such comparisons says whether it is
significant: for one that holds, every interval excludes 0 in the claimed direction; for one that does
not hold, some interval excludes 0 in the other (the runs significantly contradict the claim).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ..config import ConfigError
from ..data import DataError, dataset_info
from .arms import judge_arms
from .load import (IMAGENET_CLASSES, NoRunsError, RunData, Study, chosen_text, one_probe_setting, pick_study,
                   require_metrics, studies, unsettled_bn, unsettled_bn_note)
from .paper import (CLAIMS, FIGURES, IMAGENET, PAPER_ARCHS, RESNET1202_TRAIN_ERROR_BELOW, TABLE2, TABLE3, TABLE6,
                    choose_series,
                    series_label)
from ..runstore import atomic_write_text, cpu_label, sessions, unwritable
from .tables import TABLE_NAMES, final_errors, with_tencrop

if TYPE_CHECKING:
    from .figures import Drawn
    from .tables import Table

HOLDS, FAILS, UNKNOWN = "holds", "does not hold", "cannot be judged"
# Claim 2: "vanishing" = some hidden layer's gradient norm (median over the recordings) below 1% of
# the largest hidden layer's (two orders of magnitude); "non-zero variance" = every layer's response
# std above 1e-3.
GRADIENT_RATIO_HEALTHY = 0.01
RESPONSE_STD_NONZERO = 1e-3
FIGURE_TITLES = {
    "fig1": "Figure 1: plain-20 vs plain-56",
    "fig4": "Figure 4: ImageNet, plain vs ResNet",
    "fig6": "Figure 6: plain nets, ResNets, ResNet-110 vs 1202",
    "fig7": "Figure 7: layer responses",
    "gradients": "Gradient norms (beyond the paper)",
    "budget": "Final error against the training budget (beyond the paper)",
    "arms": "The follow-ups' arms against depth (beyond the paper)",
}
# Claim 4: "the same low training error" = within this many percentage points.
SAME_TRAIN_ERROR_PP = 0.5
# A comparison of depths is judged only if the best net compared has learned: its training error
# below this fraction of the chance error (90% for 10 classes, so below 81%). Nets that all sit at
# chance (a demo run of a few steps) are equally untrained, and which is "better" is noise. One
# net at chance beside one that learned is judged: that is what degradation can look like.
LEARNED_FRACTION_OF_CHANCE = 0.9


def _seeds(n: int) -> str:
    return f"{n} seed{'' if n == 1 else 's'}"


@dataclass
class Claim:
    """One claim's verdict, the evidence behind it and the fewest seeds any compared net had."""

    number: int
    text: str
    verdict: str
    evidence: str
    seeds: int
    #: For a verdict that rests on two-way comparisons of means: `significant`, `not significant` or, where
    #: a comparison has no interval (one seed), `no interval` (Welch's t, 95%; `_significance`: a verdict
    #: that holds, every comparison's interval excludes 0 in the claimed direction; one that does not,
    #: some interval excludes 0 in the other); else "".
    significance: str = ""

    @property
    def verdict_text(self) -> str:
        """The verdict with its significance, as the report shows it: `holds (not significant)`."""
        return f"{self.verdict} ({self.significance})" if self.significance else self.verdict

    def line(self) -> str:
        """The one line the report and the terminal show."""
        return f"claim {self.number}: {self.verdict_text} ({_seeds(self.seeds)}): {self.evidence}"


@dataclass
class _Stat:
    """One net's final error over its seeds: `values` indexed by seed."""

    values: pd.Series

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def std(self) -> float:
        return float(self.values.std())

    @property
    def n(self) -> int:
        return len(self.values)

    def __str__(self) -> str:
        return f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.n > 1 else "")


def _stat(values: pd.Series) -> _Stat | None:
    """The non-missing `values` (indexed by seed) as a _Stat, or None if there are none."""
    values = values.dropna()
    return _Stat(values) if len(values) else None


@dataclass
class Comparison:
    """`a` against `b` (two nets' final errors over seeds): the difference of the means, its 95%
    confidence interval by Welch's t (None with fewer than 2 seeds on a side), and over the seeds
    both have, how many put `a` above `b`."""

    diff: float
    low: float | None
    high: float | None
    above: int
    paired: int
    #: How many seeds each mean is over, where the two nets' seeds differ (a net with a run still
    #: training, or diverged): the means are then over other seeds than the per-seed order. None where
    #: both nets have the same seeds.
    sizes: tuple[int, int] | None = None
    #: Of the `paired` seeds, how many give the two nets the same error (neither above nor below).
    tied: int = 0

    def significant(self, higher: bool) -> bool:
        """Whether the interval excludes 0 on the side of `a` higher (`higher`) or lower."""
        if self.low is None or self.high is None:
            return False
        return self.low > 0 if higher else self.high < 0

    def __str__(self) -> str:
        return self.__format__(".2f")

    def __format__(self, spec: str) -> str:
        """With `spec` the numbers' format (`.2f` for errors in %, `.3f` for response stds)."""
        spec = spec or ".2f"
        below = self.paired - self.above - self.tied
        side, count = ("higher", self.above) if self.diff > 0 else ("lower", below) if self.diff < 0 else ("equal", self.tied)
        ties = f" ({self.tied} tied)" if self.tied and side != "equal" else ""
        order = f"{side} in {count} of {self.paired} seeds{ties}" if self.paired else "no seed in common"
        if self.sizes is not None and self.paired:
            order += f" both have; means over {self.sizes[0]} and {self.sizes[1]} seeds"
        elif self.sizes is not None:
            order += f"; means over {self.sizes[0]} and {self.sizes[1]} seeds"
        if self.low is None:
            return f"difference {self.diff:+{spec}}, {order}"
        return f"difference {self.diff:+{spec}}, 95% CI {self.low:+{spec}} to {self.high:+{spec}} (Welch's t), {order}"


def compare(a: _Stat, b: _Stat) -> Comparison:
    """`a` against `b`: see Comparison. The interval is scipy's Welch t interval of the difference."""
    from scipy import stats

    low = high = None
    # Seeds that agree to the last digit on both sides leave no spread to test against: no interval (scipy
    # would give a zero-width one, at 1 degree of freedom, that excludes any difference but 0).
    if a.n > 1 and b.n > 1 and not (a.values.nunique() == 1 and b.values.nunique() == 1):
        with warnings.catch_warnings():  # scipy warns of its own degenerate cases: said below, not warned
            warnings.simplefilter("ignore", RuntimeWarning)
            result = stats.ttest_ind(a.values.to_numpy(float), b.values.to_numpy(float), equal_var=False)
            interval = result.confidence_interval(0.95)
        low, high = float(interval.low), float(interval.high)
        if not (math.isfinite(low) and math.isfinite(high)):  # a degenerate case scipy did not resolve: no interval
            low = high = None
    both = a.values.index.intersection(b.values.index)
    above = int((a.values[both] > b.values[both]).sum())
    tied = int((a.values[both] == b.values[both]).sum())
    same = len(both) == a.n == b.n
    return Comparison(a.mean - b.mean, low, high, above, len(both), None if same else (a.n, b.n), tied)


def _significance(comparisons: list[tuple[Comparison, bool]], holds: bool) -> str:
    """Whether the runs' verdict is significant (Welch's t, 95%), given the claim's comparisons and the
    side (`higher`) each claims. A verdict that holds is `significant` if every interval excludes 0 on its
    claimed side; one that does not hold, if some interval excludes 0 on the other side (the runs
    significantly contradict the claim). Else `not significant`, or `no interval` where that turns on a
    comparison with none (a net with a single seed, or seeds that agree to the last digit: no test was
    possible, which "not significant" would not say; a tested comparison short of significance makes a
    verdict that holds `not significant` whatever the others); "" where there is no comparison."""
    if not comparisons:
        return ""
    untested = "no interval" if any(c.low is None for c, _ in comparisons) else "not significant"
    if holds:
        if all(c.significant(higher) for c, higher in comparisons):
            return "significant"
        # One tested comparison short of significance settles it; only untested ones leave it open.
        tested_short = any(c.low is not None and not c.significant(higher) for c, higher in comparisons)
        return "not significant" if tested_short else untested
    return "significant" if any(c.significant(not higher) for c, higher in comparisons) else untested


def _combine(parts: list[tuple[str | None, str]], conjunctive: bool) -> tuple[str, str]:
    """Verdict from parts (verdict or None when unjudgeable, evidence). Conjunctive: every part is
    needed for `holds`; otherwise the judged parts decide. With several parts, each judged part's
    evidence ends in its own verdict, so a claim that does not hold says which part failed."""
    judged = [v for v, _ in parts if v is not None]
    if FAILS in judged:
        verdict = FAILS
    elif judged and (not conjunctive or len(judged) == len(parts)):
        verdict = HOLDS
    else:
        verdict = UNKNOWN
    return verdict, "; ".join(f"{e} ({v})" if len(parts) > 1 and v is not None else e for v, e in parts)


def _chance_error(dataset: str, recorded: pd.Series | None = None) -> float | None:
    """The error in % of guessing one class: 100 x (1 - 1/classes); None for an unknown data set.
    ``recorded`` are the runs' own class counts (`load_run_table`'s `classes`; an ImageNet subset
    has fewer than 1000); where none recorded one, the data set's count is used."""
    known = recorded.dropna() if recorded is not None else ()
    if len(known):
        classes = int(known.max())
    else:
        try:
            classes = IMAGENET_CLASSES if dataset == IMAGENET else dataset_info(dataset).num_classes
        except DataError:
            return None
    return 100.0 * (1 - 1 / classes)


class _Finals:
    """Finished runs' final errors in one study, by net."""

    def __init__(self, data: RunData, study: Study) -> None:
        self.study = study
        done = study.select(data.runs).query("status == 'done'")
        metrics = study.select(data.metrics)
        self.df = final_errors(metrics[metrics["run_id"].isin(done["run_id"])]) if not metrics.empty else None
        self.eval = "val" if self.df is not None and "val" in self.df else "test"
        # ImageNet: the 10-crop test (`study evaluate`) replaces the logged centre-crop `val` only where
        # every run compared has a current one, as in Tables 2 and 3 (`compared` decides per comparison;
        # until a claim narrows it, over all the study's finished runs).
        self.runs: pd.DataFrame | None = None
        self.crop = ""  # ImageNet: which test `val` is, for the evidence ("10-crop" or "centre-crop (...)")
        if study.dataset == IMAGENET and self.df is not None and self.eval == "val":
            self.runs, self.logged = done, self.df
            self.df, self.crop = self._cropped(self.df)
        self.chance = _chance_error(study.dataset, done.get("classes"))

    def _cropped(self, logged: pd.DataFrame) -> tuple[pd.DataFrame, str]:
        """`logged` with the 10-crop errors if every run in it has a current one (`with_tencrop`), and
        which test that is, naming the runs to test where it is the centre-crop."""
        df, _ = with_tencrop(logged, self.runs)
        if df["tencrop"].all() and not df.empty:
            return df, "10-crop"
        if not df["tencrop_current"].any():
            return df, "centre-crop (run `study evaluate` for the paper's 10-crop)"
        untested = ", ".join(sorted(df.loc[~df["tencrop_current"], "run_id"]))
        return df, f"centre-crop (not 10-crop, which not every run compared has: run `study evaluate` for {untested})"

    def compared(self, nets: list[tuple[str, int, str]]) -> _Finals:
        """These finals for one comparison of `nets` (arch, depth, shortcut): on ImageNet, their
        10-crop errors if every finished run of them has a current one, else all their logged
        centre-crop `val`, so that a claim never sets one test protocol against the other."""
        if self.runs is None:
            return self
        logged = self.logged
        chosen = pd.Series(False, index=logged.index)
        for arch, depth, shortcut in nets:
            chosen |= (logged["arch"] == arch) & (logged["depth"] == depth) & (logged["shortcut"] == shortcut)
        view = copy.copy(self)
        view.df, view.crop = self._cropped(logged[chosen])
        return view

    def unlearned(self, train_errors: list[_Stat]) -> str | None:
        """Why a comparison of these nets (their training errors) cannot be judged, or None: when
        even the best of them has not learned beyond chance."""
        if self.chance is None or not train_errors:
            return None
        best = min(s.mean for s in train_errors)
        if best < LEARNED_FRACTION_OF_CHANCE * self.chance:
            return None
        return (f"{self.study.dataset}: no net compared has learned (best training error {best:.2f}%, "
                f"chance {self.chance:.1f}%): these runs are too short to judge; train them longer")

    def get(self, arch: str, depth: int, column: str, shortcut: str = "A") -> _Stat | None:
        if self.df is None or column not in self.df:
            return None
        df = self.df
        rows = df[(df["arch"] == arch) & (df["depth"] == depth) & (df["shortcut"] == shortcut)]
        return _stat(rows.set_index("seed")[column])

    def depths(self, arch: str, shortcut: str = "A") -> list[int]:
        if self.df is None:
            return []
        return sorted(set(self.df[(self.df["arch"] == arch) & (self.df["shortcut"] == shortcut)]["depth"]))


def _pair(depths: list[int], preferred: tuple[int, int]) -> tuple[int, int] | None:
    """The paper's pair of depths where both are present, else the shallowest and deepest."""
    if set(preferred) <= set(depths):
        return preferred
    return (depths[0], depths[-1]) if len(depths) >= 2 else None


def _depth_pair(f: _Finals, arch: str, pair: tuple[int, int], worse: bool = True
                     ) -> tuple[str | None, str, int, list[tuple[Comparison, bool]]]:
    """Degradation test of one pair (`worse=False`: the deeper net is better, claim 3's): (verdict, evidence,
    seeds, comparisons with their claimed side)."""
    shallow, deep = pair
    f = f.compared([(arch, shallow, "A"), (arch, deep, "A")])
    name_s, name_d = series_label(arch, shallow), series_label(arch, deep)
    tr_s, tr_d = f.get(arch, shallow, "train"), f.get(arch, deep, "train")
    te_s, te_d = f.get(arch, shallow, f.eval), f.get(arch, deep, f.eval)
    if None in (tr_s, tr_d, te_s, te_d):
        return None, f"{f.study.dataset}: {name_s} or {name_d} lacks a final training or {f.eval} error", 0, []
    if (why := f.unlearned([tr_s, tr_d])) is not None:
        return None, why, min(tr_s.n, tr_d.n), []
    holds = (tr_d.mean > tr_s.mean and te_d.mean > te_s.mean) if worse else (tr_d.mean < tr_s.mean and te_d.mean < te_s.mean)
    train, test = compare(tr_d, tr_s), compare(te_d, te_s)
    evidence = (
        f"{f.study.dataset}: training error {name_d} {tr_d} vs {name_s} {tr_s} ({train}), "
        f"{f'{f.crop} ' if f.crop else ''}{f.eval} error {te_d} vs {te_s} ({test})"
    )
    return (HOLDS if holds else FAILS), evidence, min(tr_s.n, tr_d.n), [(train, worse), (test, worse)]


def _claim1(cifar: _Finals | None, imagenet: _Finals | None) -> tuple[str, str, int, str]:
    parts, seeds, comparisons = [], [], []
    for f, preferred in ((cifar, (20, 56)), (imagenet, (18, 34))):
        if f is None:
            continue
        pair = _pair(f.depths("plain"), preferred)
        if pair is None:
            parts.append(
                (None, f"{f.study.dataset}: needs two finished plain depths, has {f.depths('plain') or 'none'}")
            )
            continue
        verdict, evidence, n, compared = _depth_pair(f, "plain", pair)
        parts.append((verdict, evidence))
        if verdict is not None:  # the seeds of the parts judged
            seeds.append(n)
        comparisons += compared
    if not parts:
        parts.append((None, "no finished plain-net runs"))
    verdict, evidence = _combine(parts, conjunctive=False)
    return verdict, evidence, min(seeds, default=0), _significance(comparisons, verdict == HOLDS) if verdict != UNKNOWN else ""


def _claim2(data: RunData, study: Study | None) -> tuple[str, str, int]:
    if study is None:
        return UNKNOWN, "no CIFAR-style runs", 0
    runs = study.select(data.runs).query("arch == 'plain' and status == 'done'")
    grads = data.gradients[data.gradients["run_id"].isin(runs["run_id"])]
    # As Figure 7: the study's responses measured with one setting of the probe's options.
    probed = set(data.responses["run_id"][data.responses["run_id"].isin(runs["run_id"])])
    resp = one_probe_setting(study.select(data.responses))[0]
    resp = resp[resp["run_id"].isin(runs["run_id"])]
    if dropped := sorted(probed - set(resp["run_id"])):
        dropped_note = (f"responses left out, measured with other `study probe` options than the study's other runs: "
                        f"{', '.join(dropped)} (probe them again with the options the others used)")
    parts, seeds = [], []
    if grads.empty:
        parts.append((None, "no gradient norms recorded for finished plain nets"))
    else:
        depth = int(grads["depth"].max())
        deepest = grads[grads["depth"] == depth]
        # The hidden layers only: the stem conv (few input channels) and the classifier have norms
        # of another scale whatever the gradient flow; they are the first and last layer recorded.
        ends = deepest.groupby("run_id")["layer_index"].transform
        hidden = deepest[(deepest["layer_index"] > ends("min")) & (deepest["layer_index"] < ends("max"))]
        per_layer = hidden.groupby(["run_id", "layer_index"])["grad_norm"].median()
        ratio = per_layer.groupby("run_id").agg(lambda s: s.min() / s.max())
        healthy = bool((ratio >= GRADIENT_RATIO_HEALTHY).all())
        parts.append(
            (
                HOLDS if healthy else FAILS,
                f"plain-{depth}: the smallest hidden layer's gradient norm (median over training) is "
                f"{ratio.min():.3g} of the largest (vanishing: below {GRADIENT_RATIO_HEALTHY:g})",
            )
        )
        seeds.append(len(ratio))
    early = unsettled_bn(resp)  # BN's running statistics not settled yet: no evidence either way
    resp = resp[~resp["run_id"].isin(early)]
    if resp.empty and early:
        parts.append((None, f"the plain nets' layer responses were {unsettled_bn_note(early)}"))
    elif resp.empty:
        parts.append((None, "no layer responses of finished plain nets (`study probe`)"))
    else:
        depth = int(resp["depth"].max())
        low = resp[resp["depth"] == depth]["std"].min()
        parts.append(
            (
                HOLDS if low > RESPONSE_STD_NONZERO else FAILS,
                f"plain-{depth}: smallest layer response std {low:.3g} (zero below {RESPONSE_STD_NONZERO:g})",
            )
        )
        seeds.append(resp[resp["depth"] == depth]["run_id"].nunique())
    verdict, evidence = _combine(parts, conjunctive=True)
    return verdict, "; ".join([evidence, dropped_note] if dropped else [evidence]), min(seeds, default=0)


def _claim3(f: _Finals | None, imagenet: _Finals | None = None) -> tuple[str, str, int, str]:
    """The CIFAR-style study's ResNets up to 110 layers; and where there are ImageNet runs, ResNet-34 against
    ResNet-18 too (the paper's Table 2), each part judged on its own, as claim 1's."""
    cifar = _claim3_cifar(f) if f is not None or imagenet is None else None
    if imagenet is None:
        verdict, evidence, seeds, comparisons = cifar
        return verdict, evidence, seeds, _significance(comparisons, verdict == HOLDS) if comparisons else ""
    parts, seeds, comparisons = [], [], []
    for part in filter(None, (cifar, _claim3_imagenet(imagenet))):
        verdict, evidence, n, compared = part
        parts.append((None if verdict == UNKNOWN else verdict, evidence))
        if verdict != UNKNOWN:  # the seeds of the parts judged: a part that could not be has none to count
            seeds.append(n)
        comparisons += compared
    verdict, evidence = _combine(parts, conjunctive=False)
    return verdict, evidence, min(seeds, default=0), _significance(comparisons, verdict == HOLDS) if verdict != UNKNOWN else ""


def _claim3_cifar(f: _Finals | None) -> tuple[str, str, int, list[tuple[Comparison, bool]]]:
    depths = [d for d in f.depths("resnet") if d <= 110] if f else []
    lacking = [d for d in depths if f.get("resnet", d, "train") is None or f.get("resnet", d, f.eval) is None]
    if lacking:  # a finished run without a final error (NaN, or a file written by another tool)
        return (UNKNOWN, f"{f.study.dataset}: {', '.join(series_label('resnet', d) for d in lacking)} "
                f"lack{'s' if len(lacking) == 1 else ''} a final training or {f.eval} error", 0, [])
    if len(depths) < 2:
        have = min((f.get("resnet", d, "train").n for d in depths), default=0)
        return UNKNOWN, f"needs two finished ResNet depths up to 110, has {depths or 'none'}", have, []
    rows = {d: (f.get("resnet", d, "train"), f.get("resnet", d, f.eval)) for d in depths}
    if (why := f.unlearned([tr for tr, _ in rows.values()])) is not None:
        return UNKNOWN, why, min(s[0].n for s in rows.values()), []
    shallow, deep = rows[depths[0]], rows[depths[-1]]
    better = deep[0].mean < shallow[0].mean and deep[1].mean < shallow[1].mean
    listing = ", ".join(f"{series_label('resnet', d)} {tr.mean:.2f}/{te.mean:.2f}" for d, (tr, te) in rows.items())
    monotone = all(rows[a][1].mean > rows[b][1].mean for a, b in zip(depths, depths[1:]))
    train, test = compare(deep[0], shallow[0]), compare(deep[1], shallow[1])
    evidence = (
        f"{f.study.dataset}, training/{f.eval} error: {listing}; {series_label('resnet', depths[-1])} vs "
        f"{series_label('resnet', depths[0])}: training {train}, {f.eval} {test}; {f.eval} error "
        f"{'falls' if monotone else 'does not fall'} at every step in depth"
    )
    return (HOLDS if better else FAILS), evidence, min(s[0].n for s in rows.values()), [(train, False), (test, False)]


def _claim3_imagenet(f: _Finals) -> tuple[str, str, int, list[tuple[Comparison, bool]]]:
    """ResNet-34 against ResNet-18 on ImageNet (Table 2: 25.03 against 27.88% top-1, 10-crop), in training
    and validation error, the latter 10-crop where every run compared has it, as claim 1's pair."""
    pair = _pair(f.depths("resnet"), (18, 34))
    if pair is None:
        return UNKNOWN, f"{f.study.dataset}: needs two finished ResNet depths, has {f.depths('resnet') or 'none'}", 0, []
    verdict, evidence, n, compared = _depth_pair(f, "resnet", pair, worse=False)
    return verdict or UNKNOWN, evidence, n, compared


def _claim4(f: _Finals | None) -> tuple[str, str, int, str]:
    stats = {d: (f.get("resnet", d, "train"), f.get("resnet", d, f.eval)) for d in (110, 1202)} if f else {}
    if not stats or any(tr is None or te is None for tr, te in stats.values()):
        return UNKNOWN, "needs finished ResNet-110 and ResNet-1202 runs", 0, ""
    (tr110, te110), (tr1202, te1202) = stats[110], stats[1202]
    if (why := f.unlearned([tr110, tr1202])) is not None:
        return UNKNOWN, why, min(tr110.n, tr1202.n), ""
    same_train = tr1202.mean <= tr110.mean + SAME_TRAIN_ERROR_PP
    holds = same_train and te1202.mean > te110.mean
    evidence = (
        f"training error ResNet-1202 {tr1202} vs ResNet-110 {tr110} (same: within {SAME_TRAIN_ERROR_PP} points), "
        f"{f.eval} error {te1202} vs {te110} ({(test := compare(te1202, te110))}); paper: ResNet-1202's training error "
        f"under {RESNET1202_TRAIN_ERROR_BELOW}%, like 110's, test {TABLE6[('resnet', 1202, 'A')]} vs {TABLE6[('resnet', 110, 'A')]}"
    )
    significance = _significance([(test, True)], holds)
    if not same_train:  # contradicted by its training part: significant if the interval lies above the margin
        train = compare(tr1202, tr110)
        if train.low is not None and train.low > SAME_TRAIN_ERROR_PP:
            significance = "significant"
    return (HOLDS if holds else FAILS), evidence, min(tr110.n, tr1202.n), significance


def _claim5(data: RunData, study: Study | None) -> tuple[str, str, int, str]:
    # As Figure 7: the study's responses measured with one setting of the probe's options.
    everything = study.select(data.responses) if study is not None else data.responses.iloc[0:0]

    def ours(frame: pd.DataFrame) -> pd.DataFrame:  # the paper's nets alone: the arms have their own section
        return frame[(frame["status"] == "done") & (frame["shortcut"] == "A") & frame["arch"].isin(PAPER_ARCHS)]

    resp = ours(one_probe_setting(everything)[0])
    mixed = []
    if dropped := sorted(set(ours(everything)["run_id"]) - set(resp["run_id"])):
        mixed.append(f"left out, measured with other `study probe` options than the study's other runs: "
                     f"{', '.join(dropped)} (probe them again with the options the others used)")
    # The nets Figure 7 draws: the paper's plain-20/56 and ResNet-20/56/110 where the runs span two of their
    # depths (not ResNet-32/44 or 1202, which the paper's reading does not cover), else every net measured.
    present = sorted({(a, int(d), s) for a, d, s in zip(resp["arch"], resp["depth"], resp["shortcut"])})
    drawn = set(choose_series(present, FIGURES["fig7"].panels[0][1], present))
    resp = resp[[(a, int(d), s) in drawn for a, d, s in zip(resp["arch"], resp["depth"], resp["shortcut"])]]
    if resp.empty:
        return UNKNOWN, "; ".join(["no layer responses of finished runs (`study probe`)", *mixed]), 0, ""
    if early := unsettled_bn(resp):
        return (UNKNOWN, "; ".join(["responses " + unsettled_bn_note(early), *mixed]),
                int(resp.groupby(["arch", "depth"])["run_id"].nunique().min()), "")
    # One number per run (its mean layer std), then the mean over a net's seeds.
    per_run = resp.groupby(["arch", "depth", "seed"])["std"].mean()
    per_net = per_run.groupby(["arch", "depth"]).mean()
    seeds = per_run.groupby(["arch", "depth"]).size()
    nets = per_net.to_dict()
    runs = {net: _Stat(per_run.loc[net]) for net in nets}  # each net's values, indexed by seed
    pairs = sorted(d for a, d in nets if a == "resnet" and ("plain", d) in nets)
    parts, comparisons = [], []
    if pairs:
        smaller = all(nets[("resnet", d)] < nets[("plain", d)] for d in pairs)
        compared = {d: compare(runs[("resnet", d)], runs[("plain", d)]) for d in pairs}
        comparisons += [(c, False) for c in compared.values()]
        parts.append(
            (
                HOLDS if smaller else FAILS,
                "mean response std ResNet vs plain: "
                + ", ".join(f"{d} layers {nets[('resnet', d)]:.3f} vs {nets[('plain', d)]:.3f} ({compared[d]:.3f})"
                            for d in pairs),
            )
        )
    else:
        parts.append((None, "needs a plain net and a ResNet of the same depth with responses"))
    res_depths = sorted(d for a, d in nets if a == "resnet")
    if len(res_depths) >= 2:
        shrink = all(nets[("resnet", a)] > nets[("resnet", b)] for a, b in zip(res_depths, res_depths[1:]))
        steps = {(a, b): compare(runs[("resnet", b)], runs[("resnet", a)]) for a, b in zip(res_depths, res_depths[1:])}
        comparisons += [(c, False) for c in steps.values()]
        parts.append(
            (
                HOLDS if shrink else FAILS,
                "ResNet mean response std by depth: "
                + ", ".join(f"{d}: {nets[('resnet', d)]:.3f}" for d in res_depths)
                + "".join(f", {b} vs {a}: {c:.3f}" for (a, b), c in steps.items()),
            )
        )
    else:
        parts.append((None, "needs responses of two ResNet depths to judge shrinking with depth"))
    verdict, evidence = _combine(parts, conjunctive=True)
    evidence = "; ".join([evidence, *mixed])
    return verdict, evidence, int(seeds.min()), _significance(comparisons, verdict == HOLDS) if verdict != UNKNOWN else ""


def _claim6(f: _Finals | None) -> tuple[str, str, int, str]:
    nets = [("plain", "A"), ("resnet", "A"), ("resnet", "B"), ("resnet", "C")]
    f = f.compared([(arch, 34, shortcut) for arch, shortcut in nets]) if f else None
    stats = {n: f.get(n[0], 34, f.eval, shortcut=n[1]) for n in nets} if f else {}
    if not stats or any(s is None for s in stats.values()):
        return UNKNOWN, "needs finished ImageNet plain-34 and ResNet-34 A, B and C runs", 0, ""
    a, b, c, plain = stats[("resnet", "A")], stats[("resnet", "B")], stats[("resnet", "C")], stats[("plain", "A")]
    train = [f.get(n[0], 34, "train", shortcut=n[1]) for n in nets]
    if (why := f.unlearned([t for t in train if t is not None])) is not None:
        return UNKNOWN, why, min(s.n for s in stats.values()), ""
    holds = c.mean < b.mean < a.mean < plain.mean
    steps = {"A vs plain": compare(a, plain), "B vs A": compare(b, a), "C vs B": compare(c, b)}
    paper = ", ".join(f"{series_label(*k)} {v[0]}" for k, v in TABLE3.items())
    evidence = (
        f"top-1 {f.crop or 'centre-crop'} validation error plain-34 {plain}, ResNet-34 A {a}, B {b}, C {c} "
        f"({'; '.join(f'{k}: {v}' for k, v in steps.items())}); paper (10-crop): {paper}"
    )
    return (HOLDS if holds else FAILS), evidence, min(s.n for s in stats.values()), _significance(
        [(cmp, False) for cmp in steps.values()], holds)


def _study_or_none(data: RunData, *, imagenet: bool, wanted: list, **select: object) -> Study | None:
    try:
        return pick_study(data, "the claims", imagenet=imagenet, wanted=wanted, **select)[0]  # type: ignore[arg-type]
    except NoRunsError:
        return None


def _cifar_study(data: RunData, **select: object) -> Study | None:
    """The CIFAR-style study the claims are judged on: the one Figures 1 and 6 draw."""
    wanted = [s for spec in ("fig1", "fig6") for _, series in FIGURES[spec].panels for s in series]
    return _study_or_none(data, imagenet=False, wanted=wanted, **select)


def judge_study_arms(data: RunData, **select: object) -> list[Claim]:
    """The report's findings on the follow-ups' arms (`arms.judge_arms`), judged on the study the claims
    are judged on (`select` narrows it as for `classify_claims`); empty when it has no arm."""
    judged_on = _cifar_study(data, **select)
    return judge_arms(_Finals(data, judged_on)) if judged_on is not None else []


def classify_claims(data: RunData, **select: object) -> list[Claim]:
    """One Claim per PROTOCOL.md claim, judged on the CIFAR-style study closest to the paper (the
    one the figures draw) and, for the ImageNet claims, on the ImageNet runs; `select` (dataset,
    iterations, batch_size, holdout, variant: `load.pick_study`'s choosers) narrows both."""
    cifar_study = _cifar_study(data, **select)
    # ImageNet: claims 1 and 3 on the study with Table 2's pairs (18 against 34 layers), claim 6 on the one with
    # Table 3's 34-layer nets, each chosen as `study table` chooses that table's (often one and the same).
    pairs_study = _study_or_none(data, imagenet=True, wanted=list(TABLE2), **select)
    shortcuts_study = _study_or_none(data, imagenet=True, wanted=list(TABLE3), **select)
    cifar = _Finals(data, cifar_study) if cifar_study else None
    pairs = _Finals(data, pairs_study) if pairs_study else None
    shortcuts = _Finals(data, shortcuts_study) if shortcuts_study else None
    results = {
        1: _claim1(cifar, pairs),
        2: _claim2(data, cifar_study),
        3: _claim3(cifar, pairs),
        4: _claim4(cifar),
        5: _claim5(data, cifar_study),
        6: _claim6(shortcuts),
    }
    claims = [Claim(n, CLAIMS[n], *results[n]) for n in sorted(results)]
    _name_diverged(claims, data, list(dict.fromkeys(s for s in (cifar_study, pairs_study, shortcuts_study) if s is not None)))
    if chosen := chosen_text(select):  # what the choice left out is not what the runs dir lacks
        for claim in claims:
            if claim.verdict == UNKNOWN:
                claim.evidence += f" (among the runs matching {chosen})"
    return claims


#: The nets each claim judges, for naming their diverged runs (`_name_diverged`): (arch, depth, shortcut,
#: ImageNet or not) -> whether the claim's comparisons draw on that net.
_CLAIM_NETS: dict[int, Callable[[str, int, str, bool], bool]] = {
    1: lambda arch, depth, shortcut, imagenet: arch == "plain",
    2: lambda arch, depth, shortcut, imagenet: arch == "plain" and not imagenet,
    3: lambda arch, depth, shortcut, imagenet: arch == "resnet" and shortcut == "A",
    4: lambda arch, depth, shortcut, imagenet: arch == "resnet" and depth in (110, 1202) and not imagenet,
    5: lambda arch, depth, shortcut, imagenet: arch in ("plain", "resnet") and shortcut == "A" and not imagenet,
    6: lambda arch, depth, shortcut, imagenet: imagenet and depth == 34,
}


def _name_diverged(claims: list[Claim], data: RunData, studies: list[Study]) -> None:
    """Add to each claim (judged or not) whose nets (`_CLAIM_NETS`) have a diverged run in `studies` that the
    run is left out of the means: a run that failed to train would otherwise vanish from a verdict it may
    bear on (a deeper ResNet that diverged, say, against "deeper ResNets are better"), or leave a claim
    that cannot be judged without its reason."""
    diverged = pd.concat([s.select(data.runs) for s in studies]) if studies else data.runs.iloc[0:0]
    diverged = diverged[diverged["status"] == "diverged"]
    if diverged.empty:
        return
    for claim in claims:
        judges = _CLAIM_NETS.get(claim.number)
        named = sorted(f"{series_label(r.arch, r.depth, r.shortcut)} s{r.seed}" for r in diverged.itertuples()
                       if judges and judges(r.arch, int(r.depth), r.shortcut, r.dataset == IMAGENET))
        if named:
            claim.evidence += f"; diverged, so in no mean: {', '.join(named)} (runs that failed to train)"


def check_selection(data: RunData, **select: object) -> None:
    """NoRunsError (one line, naming the runs there are) if no run has metrics yet (as `study plot` and
    `study table` refuse them), or `select` matches no run a report could judge, CIFAR-style or ImageNet."""
    require_metrics(data, "the report")
    if select and _cifar_study(data, **select) is None and _study_or_none(data, imagenet=True, wanted=[], **select) is None:
        pick_study(data, "the report", imagenet=select.get("dataset") == IMAGENET, **select)  # type: ignore[arg-type]


@dataclass
class ReportFigure:
    """One figure of the report: `drawn`, or the reason it could not be (`missing`)."""

    name: str
    title: str
    drawn: Drawn | None = None
    missing: str | None = None


@dataclass
class ReportTable:
    """One table of the report: `table`, or the reason it could not be made (`missing`)."""

    name: str
    table: Table | None = None
    missing: str | None = None


@dataclass
class ReportContent:
    """Everything the report shows, gathered once by `gather`; `render_markdown` and
    `html.render` write it. Texts mark code with backticks only, which both renderers understand."""

    runs_dir: Path
    summary: str
    judged_note: str | None
    claims: list[Claim]
    figures: list[ReportFigure]
    tables: list[ReportTable]
    runs: pd.DataFrame  # the Runs section (`run_table`), shown as is: one row per run, text cells
    #: Beyond the paper: the findings on the follow-ups' arms (`arms.judge_arms`), where the study has any.
    arms: list[Claim] = field(default_factory=list)


# What `study run` records in config.json's provenance, as the Runs section shows it. A column of
# the same name in RunData.runs is used where the run table carries it.
PROVENANCE_KEYS = ("torch_version", "python_version", "package_version", "device", "device_name", "cpu", "cpu_flags",
                   "cpu_capability", "git_commit", "git_dirty", "data", "resumed")
REPORT_FORMATS = ("md", "html")


def _json_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _provenance(data: RunData, row: pd.Series, keys: tuple[str, ...] = PROVENANCE_KEYS) -> dict:
    """One run's provenance (`keys` of its config.json's) and its status date (`updated`), None where unknown."""
    record = _json_record(data.runs_dir / row["run_id"] / "config.json").get("provenance")
    record = record if isinstance(record, dict) else {}
    out = {k: row[k] if k in row.index else record.get(k) for k in keys}
    out["updated"] = _json_record(data.runs_dir / row["run_id"] / "status.json").get("updated")
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


def by_session(prov: dict, describe: Callable[[dict], str | None]) -> str | None:
    """`describe` of a run's first session, then of each session that resumed it where that changed
    ("cpu: AMD EPYC; from iteration 18,000: cpu: Intel Xeon (AVX512, AMX-BF16)"); None if it says
    nothing of any session."""
    described = [(session, describe(session)) for session in sessions(prov)]
    if not any(text for _, text in described):
        return None
    parts = [described[0][1] or "–"]
    for (_, before), (session, text) in zip(described, described[1:]):
        if text != before:
            parts.append(f"from iteration {int(session.get('from_iteration') or 0):,}: {text or '–'}")
    return "; ".join(parts)


def device_text(session: dict) -> str | None:
    """A session's device as the report's Runs section names it: a CPU with its kernels ("cpu: AMD EPYC
    (AVX2)"), else the device and its name."""
    cpu = cpu_label(session) if session.get("device") == "cpu" else None
    return f"cpu: {cpu}" if cpu else " ".join(filter(None, [
        session.get("device"), f"({session['device_name']})" if session.get("device_name") else None])) or None


def commit_text(session: dict, width: int = 10) -> str | None:
    """A session's git commit, shortened to `width`, and "(dirty)" where its tree had uncommitted changes."""
    commit = session.get("git_commit")
    return str(commit)[:width] + (" (dirty)" if session.get("git_dirty") else "") if commit else None


def data_text(session: dict, *, folder: bool = True) -> str | None:
    """What a session read (`Data.source`), as the Runs section names it: the sha256 of the images and
    labels, shortened, or for ImageNet (not hashed) its image counts and, with `folder`, its folder;
    None where unrecorded."""
    source = session.get("data")
    if not isinstance(source, dict):
        return None
    if source.get("sha256"):
        return f"sha256 {str(source['sha256'])[:12]}"
    images = source.get("images") if isinstance(source.get("images"), dict) else {}
    counts = " + ".join(f"{n:,} {split}" for split, n in images.items() if isinstance(n, int))
    return ", ".join(filter(None, [f"{counts} images" if counts else None,
                                   source.get("dir") if folder else None])) or None


def mixed_data_notes(data: RunData) -> list[str]:
    """One line for each study whose runs (or a run's sessions) read different data: a study's verdicts
    assume one data set, which the data set's name alone does not prove (two copies of a release, one
    damaged but still readable, or a data dir that changed between sessions)."""
    notes = []
    for study in studies(data.runs):
        seen: dict[str, list[str]] = {}
        for _, run in study.select(data.runs).iterrows():
            prov = _provenance(data, run, ("data", "resumed"))
            # One copy in several folders (each node's scratch disk, say) is one data set.
            for text in {data_text(s, folder=False) for s in sessions(prov)} - {None}:
                seen.setdefault(text, []).append(run["run_id"])
        if len(seen) > 1:
            notes.append(f"the runs of {study.label()} read different data ("
                         + "; ".join(f"{text}: {', '.join(sorted(ids))}" for text, ids in sorted(seen.items()))
                         + "); train them again on one copy (`--data-dir`)")
    return notes


def run_table(data: RunData) -> pd.DataFrame:
    """The report's Runs section: each run read, its study, status, progress, final errors (last
    logged epoch) and provenance, as text. Provenance columns no run recorded are left out."""
    finals = final_errors(data.metrics).set_index("run_id") if not data.metrics.empty else pd.DataFrame()
    labels = {}
    for study in studies(data.runs):
        labels.update(dict.fromkeys(study.select(data.runs)["run_id"], study.label()))
    splits = {"train": "training error (%)", "test": "test error (%)", "val": "validation error (%)",
              "top5": "top-5 error (%)"}

    def pct(value: object) -> str:
        return "–" if value is None or pd.isna(value) else f"{float(value):.2f}"

    rows = []
    for _, run in data.runs.iterrows():
        prov = _provenance(data, run)
        final = finals.loc[run["run_id"]] if run["run_id"] in finals.index else pd.Series(dtype=object)
        # A CPU run names its CPU, and the kernels torch ran on it, where it recorded them; a run resumed
        # on another machine, torch or commit, each session's from the iteration it resumed at.
        device, commit = by_session(prov, device_text), by_session(prov, commit_text)
        torch_version = by_session(prov, lambda s: s.get("torch_version"))
        rows.append({
            "run": run["run_id"],
            "study": labels.get(run["run_id"], ""),
            "status": run["status"],
            "iterations": f"{int(run['last_iteration']):,} / {int(run['iterations']):,}",
            **{label: pct(final.get(split)) for split, label in splits.items() if split in finals.columns},
            **({"10-crop top-1 (%)": pct(run["tencrop_top1"])} if data.runs["tencrop_top1"].notna().any() else {}),
            "torch": torch_version, "python": prov["python_version"], "study version": prov["package_version"],
            "device": device or None, "data": by_session(prov, data_text), "git commit": commit,
            "status updated": prov["updated"],
        })
    table = pd.DataFrame(rows)
    table = table.dropna(axis=1, how="all")  # provenance no run recorded (runs written by other tools)
    return table.fillna("–").astype(str)


def summary_text(data: RunData) -> str:
    """The report's first paragraph: the runs read, by status, the studies they form, the runs left out
    and, where one study's runs read different data, a warning."""
    statuses = data.runs["status"].value_counts().to_dict()
    return (
        f"Runs in `{data.runs_dir}`: {len(data.runs)} ({', '.join(f'{v} {k}' for k, v in statuses.items())}); "
        f"studies: {'; '.join(s.label() for s in studies(data.runs))}."
        + "".join(f" Left out: {note}." for note in data.notes())
        + "".join(f" Warning: {note}." for note in mixed_data_notes(data))
    )


def gather(data: RunData, *, log=print, **select: object) -> ReportContent:
    """Judge the claims (one line each through `log`), build every figure and table the runs
    allow, and the Runs section: the content both report formats show. `select` (`load.pick_study`'s
    choosers) narrows the claims, figures and tables to one study; NoRunsError if it matches no run."""
    from . import figures, tables

    check_selection(data, **select)  # a choice that matches nothing is the user's mistake, not an empty report

    summary = summary_text(data)
    claims = classify_claims(data, **select)
    for claim in claims:
        log(claim.line())
    judged_on = _cifar_study(data, **select)
    note = None
    if judged_on is not None and not judged_on.is_paper:
        note = (f"Judged on {judged_on.label()}; the paper's claims are about CIFAR-10 nets trained for 64,000 "
                "iterations, so a verdict here says what these runs show, not whether the paper is right.")
    shown = []
    for name in figures.FIGURE_NAMES:
        try:
            # The budget figure draws every budget of the chosen setting: --iterations does not narrow it.
            chosen = {k: v for k, v in select.items() if not (name == "budget" and k == "iterations")}
            drawn = figures.build(name, data, **chosen)
            shown.append(ReportFigure(name, drawn.heading or FIGURE_TITLES[name], drawn=drawn))
        except NoRunsError as e:
            if name not in figures.OPTIONAL_FIGURES:
                shown.append(ReportFigure(name, FIGURE_TITLES[name], missing=str(e)))
    made = []
    for name in TABLE_NAMES:
        try:
            made.append(ReportTable(name, table=tables.build(name, data, **select)))
        except NoRunsError as e:
            made.append(ReportTable(name, missing=str(e)))
    arms = judge_study_arms(data, **select)
    for finding in arms:
        log(f"arm {finding.number}: {finding.verdict_text} ({_seeds(finding.seeds)}): {finding.text}")
    return ReportContent(data.runs_dir, summary, note, claims, shown, made, run_table(data), arms)


def render_markdown(content: ReportContent, out_dir: Path) -> str:
    """The report as Markdown; each drawn figure is saved (PNG and PDF) into `out_dir`, beside it."""
    from . import figures

    lines = ["# The degradation study: your runs against the paper", "", content.summary, "", "## Claims", ""]
    if content.judged_note:
        lines += [content.judged_note, ""]
    for claim in content.claims:
        lines.append(
            f"{claim.number}. **{claim.verdict}**{f' ({claim.significance})' if claim.significance else ''}: {claim.text}. "
            f"Evidence ({_seeds(claim.seeds)}): {claim.evidence}."
        )
    if content.arms:
        lines += ["", "## Beyond the paper: the follow-ups' arms", "",
                  "Each arm against depth and against the paper's net of its kind (`docs/followups.md`).", ""]
        for f in content.arms:
            lines.append(f"{f.number}. {f.text} **{f.verdict}**{f' ({f.significance})' if f.significance else ''}. "
                         f"Evidence ({_seeds(f.seeds)}): {f.evidence}.")
    lines += ["", "## Figures", ""]
    for fig in content.figures:
        heading = f"### {fig.title} (`study plot {fig.name}`)"
        if fig.drawn is None:
            lines += [heading, "", f"Not drawn: {fig.missing}", ""]
            continue
        figures.save(fig.drawn, out_dir)
        lines += [heading, "", f"![{fig.name}]({fig.name}.png)", "", fig.drawn.caption.replace("\n", "  \n"), ""]
    lines += ["## Tables", ""]
    for tab in content.tables:
        lines += [tab.table.markdown() if tab.table else f"**{tab.name}**: not made: {tab.missing}", ""]
    return "\n".join(lines) + "\n"


def check_out(out: str | os.PathLike, format: str = "md") -> None:  # noqa: A002
    """ConfigError (one line, naming the path and the fix) where the report could not be written to `out`,
    nor, in Markdown, a figure beside it: a folder there, a file in the way of its folder, no permission.
    For a check before anything is read, drawn, printed or written; creates nothing."""
    from .figures import FIGURE_NAMES, check_out as check_figures

    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; name the report file in it, e.g. --out {out / f'report.{format}'}")
    if (why := unwritable(out)) is not None:
        raise ConfigError(f"cannot write the report to {out}: {why}; pass --out a path you can write")
    if format == "md":  # its figures go beside it
        check_figures(out.parent, FIGURE_NAMES, "pass --out a report path in another directory")


def write_report(data: RunData, out: str | os.PathLike, *, log=print, format: str = "md",  # noqa: A002
                 **select: object) -> Path:
    """Write the report to `out`: Markdown (`md`) with every figure (PNG and PDF) beside it, or
    one self-contained HTML file (`html`: figures embedded, and a Runs section with each run's
    provenance). A figure or table with no runs to draw from is listed as such. Prints one line
    per claim through `log`. The file is written whole or not at all (temporary file, renamed).
    `select` chooses the study (`gather`)."""
    if format not in REPORT_FORMATS:
        raise ValueError(f"report format {format!r}: one of {', '.join(REPORT_FORMATS)}")
    check_out(out, format)  # before anything is created or printed
    check_selection(data, **select)
    out = Path(out)
    out_dir = out.parent
    content = gather(data, log=log, **select)
    if format == "html":
        from .html import render

        text = render(content)
    else:
        text = render_markdown(content, out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
    except OSError as e:
        raise ConfigError(f"cannot write {out} ({e.strerror or e}); pass --out a writable path") from None
    return out
