"""The paper's Figures 1, 4, 6 and 7 from your runs, and a gradient-norm figure beyond the paper.

Encoding follows the paper: x in iterations (shown in units of 1e4 for paper-length runs), y error %;
Figures 1 and 6 dashed training error and bold test error, Figure 4 thin training and bold validation
error. Where a series has several seeds the line is their mean and a band their spread (min to max).
The data set, depths and budget are the runs' own, and the figure says so; runs the paper has but the
runs directory lacks, and runs not finished, are named on the figure and returned as notes.

matplotlib and seaborn are imported inside the functions, so `study` starts fast without them.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ..config import ConfigError
from ..runstore import file_in_the_way, unwritable
from .load import (NoRunsError, RunData, Study, coverage, of_paper_depths, one_probe_setting, pick_study, studies,
                   unsettled_bn, unsettled_bn_note)
from .paper import FIGURES, PAPER_ARCHS, TABLE2, TABLE6, Series, choose_series, net_label, series_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGURE_NAMES = ("fig1", "fig4", "fig6", "fig7", "gradients", "budget", "arms")
#: Figures beyond the paper's that a report shows only where the runs allow them (a study of one
#: budget has no budget figure, and misses nothing).
OPTIONAL_FIGURES = ("budget", "arms")
SPREAD = ("pi", 100)  # seaborn's errorbar: the band spans every seed, min to max
BAND_ALPHA = 0.18
FEW_POINTS = 12  # curves with at most this many logged epochs get markers


@dataclass
class Drawn:
    """A built figure, the study it shows, and what it lacks (missing or unfinished runs)."""

    name: str
    figure: "Figure"
    study: Study
    notes: list[str]
    caption: str
    paths: list[Path] = field(default_factory=list)
    #: The caption as drawn under the panels (a matplotlib Text), for pages that set it as text instead.
    caption_label: object = None
    #: A report's heading naming what was drawn, where it may differ from the paper's (Figure 1 of
    #: plain-8 against plain-20); None: the figure's usual title.
    heading: str | None = None

    def png(self, dpi: int, *, caption: bool = True) -> bytes:
        """The figure as PNG bytes; without the caption under the panels where `caption` is false
        (a page that prints it as text), laid out again without it."""
        import io

        label, text = self.caption_label, getattr(self.caption_label, "get_text", lambda: "")()
        engine = self.figure.get_layout_engine()
        if not caption and label is not None:
            label.set_text("")
            self.figure.set_layout_engine("constrained")  # laid out anew (`save` freezes the layout)
        try:
            buffer = io.BytesIO()
            self.figure.savefig(buffer, format="png", dpi=dpi)
        finally:
            if label is not None:
                label.set_text(text)
                self.figure.set_layout_engine(engine)
        return buffer.getvalue()


# --- shared pieces ---------------------------------------------------------------------------


def _series_in(df: pd.DataFrame) -> list[Series]:
    """The (arch, depth, shortcut) series in `df`, plain before ResNet, shallow before deep."""
    keys = set(zip(df["arch"], df["depth"].astype(int), df["shortcut"]))
    return sorted(keys, key=lambda s: (s[0] != "plain", s[1], s[2]))


def _not_logged(runs: pd.DataFrame, metrics: pd.DataFrame, unreadable: set[str]) -> list[str]:
    """A note naming the runs with no epoch logged yet, and one naming those whose metrics could not be
    read (`unreadable`: run ids): a curve figure cannot draw them."""
    missing = runs[~runs["run_id"].isin(metrics["run_id"])]
    notes = []
    for words, rows in (("no epoch logged yet", missing[~missing["run_id"].isin(unreadable)]),
                        ("metrics.parquet unreadable", missing[missing["run_id"].isin(unreadable)])):
        if not rows.empty:
            names = [f"{series_label(r.arch, r.depth, r.shortcut)} s{r.seed} ({r.status})" for r in rows.itertuples()]
            notes.append(f"{words}, so not drawn: {', '.join(names)}")
    return notes


def _off_chart(metrics: pd.DataFrame, drawn: list[Series], study: Study, ylim: tuple[float, float] | None) -> list[str]:
    """A note naming the nets whose curves lie wholly above the paper's y-range (as the paper says of
    plain-110 in Figure 6), with their final errors; only where that range is used (`_error_axis`)."""
    if not study.is_paper or ylim is None:
        return []
    top, above = ylim[1], []
    for s in dict.fromkeys(drawn):
        rows = _rows_of(metrics, s)
        if rows.empty or rows["error_pct"].min() <= top:
            continue
        last = rows[rows["iteration"] == rows["iteration"].max()].groupby("split")["error_pct"].mean()
        finals = ", ".join(f"{split} {err:.1f}%" for split, err in last.items())
        above.append(f"{series_label(*s)} (final mean: {finals})")
    if not above:
        return []
    return [f"above the {top:g}% the paper's axis shows, so off the chart: {'; '.join(above)}"]


def _kind(arch: str) -> str:
    """`plain` for a plain net (a follow-up's initialisation included), else `resnet`: how a figure
    dashes it and colours it beside the others."""
    return "plain" if arch.partition("+")[0] == "plain" else "resnet"


def _rows_of(df: pd.DataFrame, series: Series) -> pd.DataFrame:
    arch, depth, shortcut = series
    return df[(df["arch"] == arch) & (df["depth"] == depth) & (df["shortcut"] == shortcut)]


def _curve_rows(metrics: pd.DataFrame, series: list[Series]) -> tuple[pd.DataFrame, dict[Series, str], list[str]]:
    """The rows each net's curve is drawn from, so that one curve is a mean over one set of seeds from
    start to end: a net with a finished run, its finished runs alone (as the tables count them); a net
    with none, all its runs, up to the last iteration every one of them has logged. Also, for each net
    drawn from unfinished runs, their statuses (`running`, `diverged`, ...), and a note saying what was
    left out of the curves (none if nothing was)."""
    frames, unfinished, left_out, cut = [], {}, [], []
    for s in series:
        rows = _rows_of(metrics, s)
        if (rows["status"] == "done").any():
            left_out += sorted({f"{series_label(*s)} s{seed}" for seed in rows.loc[rows["status"] != "done", "seed"]})
            rows = rows[rows["status"] == "done"]
        elif not rows.empty:
            unfinished[s] = ", ".join(sorted(set(rows["status"])))
            last = rows.groupby("run_id")["iteration"].max()
            if last.nunique() > 1:
                cut.append(f"{series_label(*s)} to {int(last.min()):,}")
            rows = rows[rows["iteration"] <= last.min()]
        frames.append(rows)
    notes = []
    if left_out:
        notes.append(f"drawn from finished runs alone, as the tables count them: {', '.join(left_out)} not in the curves")
    if cut:
        notes.append(f"nets with no finished run (their status in the legend) drawn as far as all their runs have "
                     f"come: {', '.join(cut)} iterations")
    return (pd.concat(frames) if frames else metrics.iloc[0:0]), unfinished, notes


def _net_labels(metrics: pd.DataFrame, series: list[Series], unfinished: dict[Series, str], runs: pd.DataFrame
                ) -> dict[Series, str]:
    """Each net's legend label: its name, with its number of seeds where that is not the figure's
    (the title's), and its runs' statuses where its curve is of unfinished runs (`_curve_rows`)."""
    everyone = len(set(runs["seed"]))
    labels = {}
    for s in series:
        n = _rows_of(metrics, s)["run_id"].nunique()
        extra = ([f"{n} seed{'s' if n != 1 else ''}"] if n != everyone else []) + ([unfinished[s]] if s in unfinished else [])
        labels[s] = series_label(*s) + (f" ({', '.join(extra)})" if extra else "")
    return labels


def _colors(series: list[Series]) -> dict[Series, tuple]:
    """One colour per depth (a plain net and its ResNet twin share it), fixed across panels."""
    import seaborn as sns

    depths = sorted({s[1] for s in series})
    palette = dict(zip(depths, sns.color_palette("tab10", max(len(depths), 1))))
    return {s: palette[s[1]] for s in series}


def _seeds_text(runs: pd.DataFrame) -> str:
    seeds = sorted(set(runs["seed"]))
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"


def _new_figure(ncols: int, nrows: int = 1, *, width: float = 4.3, height: float = 3.4,
                sharey: bool = False) -> tuple["Figure", list]:
    """A figure of panels; `sharey` gives them one error scale, so that levels compare across panels
    (plain against ResNet), as on the paper's own axes."""
    # A bare Figure (not pyplot) needs no GUI backend and is not kept alive by pyplot's registry.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    return fig, axes


def _iteration_axis(ax: "Axes", budget: int) -> None:
    """x from 0 to the budget; paper-length runs (>= 1e4 iterations) in units of 1e4, as the paper."""
    ax.set_xlim(0, budget)
    ax.set_xlabel("iterations")
    if budget >= 1e4:
        ax.ticklabel_format(axis="x", style="sci", scilimits=(4, 4))


def _error_axis(ax: "Axes", study: Study, paper_ylim: tuple[float, float] | None) -> None:
    ax.set_ylabel("error (%)")
    if study.is_paper and paper_ylim is not None:
        ax.set_ylim(*paper_ylim)
    else:
        ax.set_ylim(bottom=0)


def _curve(ax: "Axes", rows: pd.DataFrame, color: tuple, *, hollow: bool = False, **line: object) -> None:
    """Mean error over seeds against iteration, with the seeds' spread as a band. A curve of few
    points gets markers: with `hollow`, larger open rings drawn over the dots (training beside
    evaluation, one mark each when a run logged one epoch: a ring around a dot where they agree)."""
    import seaborn as sns

    if rows.empty:
        return
    # A short run logs a few epochs (one, for a run shorter than an epoch): markers keep it visible.
    few = rows["iteration"].nunique() <= FEW_POINTS
    sns.lineplot(
        data=rows,
        x="iteration",
        y="error_pct",
        estimator="mean",
        errorbar=SPREAD,
        err_kws={"alpha": BAND_ALPHA, "linewidth": 0},
        color=color,
        ax=ax,
        # (seaborn edges markers in white: a ring's edge is its colour)
        **(({**RING, "markeredgecolor": color, "clip_on": False, "zorder": 3} if hollow
            else {"marker": "o", "markersize": 6, "clip_on": False}) if few else {}),
        **line,
    )


#: Training's mark on a curve of few points: an open ring, larger than evaluation's dot.
RING = {"marker": "o", "markersize": 9, "markerfacecolor": "none", "markeredgewidth": 1.5}


def _few(metrics: pd.DataFrame, series: list[Series]) -> bool:
    """Whether any of these nets' curves is drawn with markers (`_curve`)."""
    return any(0 < _rows_of(metrics, s)["iteration"].nunique() <= FEW_POINTS for s in series)


def _mark_paper(ax: "Axes", x: float, value: float, color: tuple) -> None:
    # At the right edge: the paper's number is a final error, whatever our budget is.
    ax.plot(
        [x],
        [value],
        marker="*",
        markersize=12,
        color=color,
        markeredgecolor="black",
        markeredgewidth=0.6,
        linestyle="none",
        clip_on=False,
        zorder=5,
    )


def _legend(
    ax: "Axes", series: list[Series], colors: dict, styles: list[tuple[str, dict]], dashes: dict | None = None,
    labels: dict[Series, str] | None = None,
) -> None:
    """Legend: one entry per series (its colour, and its dash pattern if `dashes` gives one; its label
    from `labels`, else its name), then one grey entry per line style (training/test, the paper's star)."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [],
            [],
            color=colors[s],
            linewidth=2,
            label=(labels or {}).get(s, series_label(*s)),
            **({"dashes": dashes[s]} if dashes and dashes[s] else {}),
        )
        for s in series
    ]
    handles += [Line2D([], [], color="0.2", label=label, **kws) for label, kws in styles]
    # Long enough handles that a dashed line shows its dashes beside a marker's ring.
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.85, handlelength=3.5)


def _empty(ax: "Axes", text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.4", wrap=True)


def _finish(fig: "Figure", title: str, caption: str, notes: list[str]) -> tuple[str, object]:
    """Title and, under the panels, the caption and the notes on missing runs: their text, and the
    label that draws it."""
    # Wrapped to the figure's width (about 12 characters an inch at 11 pt), so that a one-panel
    # figure's title is not cut off at its edges.
    fig.suptitle(textwrap.fill(title, max(30, int(fig.get_figwidth() * 12))), fontsize=11)
    text = caption + ("\n" + "\n".join(f"Note: {n}" for n in notes) if notes else "")
    width = int(fig.get_figwidth() * 17)
    wrapped = "\n".join(textwrap.fill(line, width) for line in text.splitlines())
    label = fig.supxlabel(wrapped, fontsize=7.5, x=0.01, ha="left", color="0.15")
    return text, label


def _title(number: str, study: Study, runs: pd.DataFrame) -> str:
    return f"{number} from your runs: {study.label()}, {_seeds_text(runs)}"


# --- Figures 1, 4 and 6: error curves --------------------------------------------------------


def fig1(data: RunData, **select: object) -> Drawn:
    """Figure 1: training (left) and test (right) error of plain-20 and plain-56; without both of
    those runs, of the shallowest and deepest plain nets present."""
    spec = FIGURES["fig1"]
    wanted = spec.panels[0][1]
    study, notes = pick_study(data, "fig1", imagenet=False, wanted=wanted, **select)
    runs, metrics = study.select(data.runs), study.select(data.metrics)
    plain = [s for s in _series_in(metrics) if s[0] == "plain"]  # nets with a logged epoch
    drawn = choose_series(plain, wanted, sorted({plain[0], plain[-1]}) if plain else [])
    colors = _colors(drawn)
    curves, unfinished, curve_notes = _curve_rows(metrics, drawn)
    labels = _net_labels(curves, drawn, unfinished, runs)
    fig, axes = _new_figure(2, sharey=True)
    for ax, (split, name) in zip(axes[0], (("train", "training"), (_eval_split(metrics), study.eval_name))):
        for s in drawn:
            rows = _rows_of(curves, s)
            _curve(ax, rows[rows["split"] == split], colors[s], linewidth=1.6)
        ax.set_title(f"{name} error")
        _iteration_axis(ax, study.iterations)
        if drawn:
            _legend(ax, drawn, colors, [], labels=labels)
        else:
            _empty(ax, "no plain-net runs in this study")
    for ax in axes[0]:  # once every panel is drawn: their shared scale reaches the highest curve of any
        _error_axis(ax, study, spec.ylim)
    notes = (coverage(runs, drawn, wanted if of_paper_depths(runs) else [])
             + _not_logged(runs[runs["arch"] == "plain"], metrics, data.unreadable_metrics())
             + _off_chart(curves, drawn, study, spec.ylim) + curve_notes + notes)
    caption = (
        f"Plain nets of {' and '.join(str(s[1]) for s in drawn) or 'no'} layers (paper: 20 and 56, CIFAR-10). "
        "Line: mean over seeds; band: min to max over seeds. The paper gives no final numbers for plain nets."
    )
    text, label = _finish(fig, _title("Figure 1", study, runs), caption, notes)
    heading = f"Figure 1: {' vs '.join(series_label(*s) for s in drawn) or 'no plain nets'}"
    return Drawn("fig1", fig, study, notes, text, caption_label=label, heading=heading)


def _eval_split(metrics: pd.DataFrame) -> str:
    """The split the bold curves show: `val` where the runs logged one, else `test`."""
    return "val" if (metrics["split"] == "val").any() else "test"


def _curve_panels(
    name: str,
    number: str,
    data: RunData,
    panels: list[tuple[str, list[Series], tuple[Series, ...]]],
    study: Study,
    notes: list[str],
    *,
    train_line: dict,
    paper: dict[Series, float],
    paper_label: str,
    star_note: str = "",
) -> Drawn:
    """One panel per (title, drawn series, the paper's series): training and evaluation error. A
    panel with no runs is left out (the figure is as wide as the panels drawn), unless none has any."""
    spec = FIGURES[name]
    wanted_all = list(dict.fromkeys(s for _, _, wanted in panels for s in wanted))
    runs, metrics = study.select(data.runs), study.select(data.metrics)
    # A panel left out is named, unless all its nets are deeper than the study's deepest (the
    # quick study's 8 and 20 layers have no ResNet-110 vs 1202 to show).
    deepest = int(runs["depth"].max()) if not runs.empty else 0
    notes = notes + [f"no runs for the panel {title!r} ({', '.join(series_label(*s) for s in wanted)}): left out"
                     for title, drawn, wanted in panels if not drawn and any(s[1] <= deepest for s in wanted)]
    panels = [panel for panel in panels if panel[1]] or panels[:1]
    split = _eval_split(metrics)
    all_drawn = [s for _, drawn, _ in panels for s in drawn]
    colors = _colors(all_drawn)
    curves, unfinished, curve_notes = _curve_rows(metrics, list(dict.fromkeys(all_drawn)))
    labels = _net_labels(curves, all_drawn, unfinished, runs)
    few = _few(curves, all_drawn)
    train_mark, eval_mark = (RING, {"marker": "o"}) if few else ({}, {})
    fig, axes = _new_figure(len(panels), sharey=True)
    marked = False
    for ax, (title, drawn, wanted) in zip(axes[0], panels):
        for s in drawn:
            rows = _rows_of(curves, s)
            _curve(ax, rows[rows["split"] == "train"], colors[s], hollow=True, **train_line)
            _curve(ax, rows[rows["split"] == split], colors[s], linewidth=2.2)
            if s in paper:
                _mark_paper(ax, study.iterations, paper[s], colors[s])
                marked = True
        ax.set_title(title)
        _iteration_axis(ax, study.iterations)
        if drawn:
            styles = [("training", {**train_line, **train_mark}), (study.eval_name, {"linewidth": 2.2, **eval_mark})]
            if any(s in paper for s in drawn):
                styles.append((paper_label, {"marker": "*", "linestyle": "none", "markersize": 9}))
            _legend(ax, drawn, colors, styles, labels=labels)
        else:
            _empty(ax, "no runs: " + ", ".join(series_label(*s) for s in wanted))
    for ax in axes[0]:  # once every panel is drawn: their shared scale reaches the highest curve of any
        _error_axis(ax, study, spec.ylim)
    notes = (coverage(runs, list(dict.fromkeys(all_drawn)), wanted_all if of_paper_depths(runs) else [])
             + _not_logged(runs, metrics, data.unreadable_metrics())
             + _off_chart(curves, all_drawn, study, spec.ylim) + curve_notes + notes)
    train_word = "dashed" if train_line.get("linestyle") == "--" else "thin"
    caption = (
        f"{train_word.capitalize()}{' (rings)' if few else ''}: training error; bold"
        f"{' (filled dots)' if few else ''}: {study.eval_name} error. Line: mean over seeds; band: min to max over seeds."
    )
    if marked:
        caption += f" Star: {paper_label}, at the right edge.{star_note}"
    elif study.dataset in ("cifar10", "imagenet") and not study.on_paper_schedule:
        setting = " and ".join(d for d in study.deviations() if not d.startswith("a variant"))
        caption += f" The paper's final numbers are not marked: your runs are {setting}."
    elif study.dataset in ("cifar10", "imagenet"):
        caption += " The paper gives no final number for the nets drawn."
    else:
        caption += f" The paper's numbers are not marked: they are for {'ImageNet' if name == 'fig4' else 'CIFAR-10'}."
    text, label = _finish(fig, _title(number, study, runs), caption, notes)
    return Drawn(name, fig, study, notes, text, caption_label=label)


def fig6(data: RunData, **select: object) -> Drawn:
    """Figure 6: plain nets (left), ResNets (middle), ResNet-110 vs 1202 (right), each panel where
    the runs have its nets; dashed training error, bold test error; the paper's Table 6 errors
    starred on CIFAR-10."""
    spec = FIGURES["fig6"]
    wanted = [s for _, series in spec.panels for s in series]
    study, notes = pick_study(data, "fig6", imagenet=False, wanted=wanted, **select)
    present = _series_in(study.select(data.metrics))  # nets with a logged epoch
    (t1, w1), (t2, w2), (t3, w3) = spec.panels
    panels = [
        (t1, [s for s in present if s[0] == "plain"], w1),
        (t2, [s for s in present if s[0] == "resnet" and s[2] == "A" and s[1] != 1202], w2),
        (t3, [s for s in w3 if s in present], w3),
    ]
    # The curves are means over seeds: the paper's mean where it gives one (ResNet-110's 6.61 of
    # 5 runs, not its best 6.43), as Table 6 and the report compare.
    # Only at the paper's budget and batch: a star at the end of a shortened run's curve would mislead.
    paper = {s: e.reference for s, e in TABLE6.items()} if study.dataset == "cifar10" and study.on_paper_schedule else {}
    return _curve_panels(
        "fig6",
        "Figure 6",
        data,
        panels,
        study,
        notes,
        train_line={"linestyle": "--", "linewidth": 1.0},
        paper=paper,
        paper_label="paper's final test error (Table 6)",
        star_note=" ResNet-110's is its mean of 5 runs, as the curves are means over seeds."
                  if ("resnet", 110, "A") in present and paper else "",
    )


def fig4(data: RunData, **select: object) -> Drawn:
    """Figure 4: ImageNet plain-18/34 (left) and ResNet-18/34 (right); thin training error, bold
    validation error; the paper's Table 2 (10-crop) errors starred."""
    spec = FIGURES["fig4"]
    wanted = [s for _, series in spec.panels for s in series]
    study, notes = pick_study(data, "fig4", imagenet=True, wanted=wanted, **select)
    present = _series_in(study.select(data.metrics))  # nets with a logged epoch
    (t1, w1), (t2, w2) = spec.panels
    panels = [
        (t1, [s for s in present if s[0] == "plain"], w1),
        (t2, [s for s in present if s[0] == "resnet" and s[2] == "A"], w2),
    ]
    return _curve_panels(
        "fig4",
        "Figure 4",
        data,
        panels,
        study,
        notes,
        train_line={"linewidth": 0.8},
        paper={s: e.best for s, e in TABLE2.items()} if study.on_paper_schedule else {},
        paper_label="paper's top-1 error, 10-crop (Table 2)",
        star_note=" The curves are centre-crop, which reads higher than the paper's 10-crop test; "
                  "`study evaluate` gives your 10-crop numbers (Tables 2 and 3).",
    )


# --- Figure 7: layer responses ---------------------------------------------------------------


def _options_text(responses: pd.DataFrame) -> str:
    """How the responses were measured, from the option columns `record_responses` writes."""

    def values(col: str) -> list:
        return sorted(responses[col].dropna().unique().tolist()) if col in responses else []

    parts = []
    split = values("split")
    parts.append(f"on the {'/'.join(map(str, split))} split" if split else "on an unrecorded split")
    bn = values("bn_mode")
    parts.append(f"BN in {'/'.join(map(str, bn))} mode" if bn else "BN mode not recorded")
    reduction = values("reduction")
    kinds = {"tensor": "std over the whole response tensor", "channel": "std per channel, averaged over channels"}
    parts.append(" / ".join(kinds.get(r, str(r)) for r in reduction) or "reduction not recorded")
    first = values("include_first")
    if first:
        parts.append(" / ".join("first conv included" if f else "first conv excluded" for f in first))
    limit = values("max_images")
    if limit:
        parts.append(f"first {', '.join(str(int(v)) for v in limit)} images")
    return ", ".join(parts)


def fig7(data: RunData, **select: object) -> Drawn:
    """Figure 7: the std of each 3x3 layer's response (after BN, before ReLU or addition), top in
    layer order, bottom sorted in descending order; plain-20/56 and ResNet-20/56/110 where measured
    (else every net measured). Reads `responses.parquet` (`study probe`)."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    wanted = FIGURES["fig7"].panels[0][1]
    study, notes = pick_study(
        data, "fig7", imagenet=False, wanted=wanted, **select, needs="responses"
    )
    responses, mixed = one_probe_setting(study.select(data.responses).copy())
    notes = notes + mixed
    present = [s for s in _series_in(responses) if s[0] in PAPER_ARCHS]  # the arms: `study plot arms`
    if not present:
        raise NoRunsError(f"fig7 draws the paper's plain nets and ResNets; the probed runs of {study.label()} are "
                          "other nets (`study plot arms` draws those)")
    drawn = choose_series(present, wanted, present)
    responses = pd.concat([_rows_of(responses, s) for s in drawn], ignore_index=True)
    responses["net"] = [series_label(a, d, sc) for a, d, sc in zip(responses.arch, responses.depth, responses.shortcut)]
    responses["kind"] = responses["arch"].map(_kind)
    # Rank within each run, so the sorted curve of several seeds averages like with like.
    responses["rank"] = responses.groupby("run_id")["std"].rank(ascending=False, method="first")
    # Five series on one axis, as in the paper: a colour each, plain dashed, ResNet solid.
    colors = dict(zip(drawn, sns.color_palette("tab10", len(drawn))))
    order = [series_label(*s) for s in drawn]
    palette = {series_label(*s): colors[s] for s in drawn}
    dashes = {"plain": (4, 2), "resnet": ""}
    fig, axes = _new_figure(1, 2, width=7.5, height=2.9)
    for ax, x, xlabel in (
        (axes[0][0], "layer_index", "layer index (original)"),
        (axes[1][0], "rank", "layer index (sorted by magnitude)"),
    ):
        sns.lineplot(
            data=responses,
            x=x,
            y="std",
            hue="net",
            hue_order=order,
            palette=palette,
            style="kind",
            style_order=["plain", "resnet"],
            dashes=dashes,
            linewidth=1.3,
            errorbar=SPREAD,
            err_kws={"alpha": BAND_ALPHA, "linewidth": 0},
            legend=False,
            ax=ax,
        )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("std")
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are counted: no tick at 2.5
        _legend(ax, drawn, colors, [], dashes={s: dashes[_kind(s[0])] for s in drawn})
    runs = study.select(data.runs)
    measured = runs[runs["run_id"].isin(responses["run_id"])]
    notes = coverage(measured, drawn, wanted if of_paper_depths(measured) else []) + notes
    if early := unsettled_bn(responses):
        notes.append(unsettled_bn_note(early))
    # Only the paper's nets count: the arms have their own figure, and a pre-activation net has no responses.
    unprobed = runs[~runs["run_id"].isin(data.responses["run_id"]) & (runs["status"] == "done")
                    & runs["arch"].isin(PAPER_ARCHS)]
    if not unprobed.empty:
        notes.append(f"finished but not probed (run `study probe`): {', '.join(unprobed['run_id'])}")
    caption = (
        f"Std of each 3x3 layer's response, after BN and before ReLU or the residual addition, "
        f"{_options_text(responses)}. Line: mean over seeds; band: min to max over seeds."
    )
    text, label = _finish(fig, _title("Figure 7", study, measured), caption, notes)
    return Drawn("fig7", fig, study, notes, text, caption_label=label)


# --- Beyond the paper: gradient norms --------------------------------------------------------


def gradients(data: RunData, **select: object) -> Drawn:
    """Per-layer gradient norms, plain vs ResNet, one column per depth: top, the median over
    layers during training; bottom, each layer's norm (median over the recordings). The paper's
    claim (section 4.1) is that plain nets degrade although these stay healthy."""
    import seaborn as sns

    study, notes = pick_study(
        data, "gradients", imagenet=False, **select, needs="gradients"
    )
    grads = study.select(data.gradients).copy()
    grads = grads[grads["arch"].isin(PAPER_ARCHS)]  # plain vs ResNet, the paper's claim; not the arms
    if grads.empty:
        raise NoRunsError(f"gradients draws the paper's plain nets and ResNets; {study.label()} has none with gradients")
    drawn = _series_in(grads)
    grads["net"] = [series_label(a, d, sc) for a, d, sc in zip(grads.arch, grads.depth, grads.shortcut)]
    # Colour by kind, plain vs ResNet, within a depth's column: the comparison the claim is about.
    kind_colors = dict(zip(["plain", "resnet"], sns.color_palette("Set1", 2)))
    colors = {series_label(*s): kind_colors[_kind(s[0])] for s in drawn}
    depths = sorted({s[1] for s in drawn})
    fig, axes = _new_figure(len(depths), 2, width=3.8, height=2.8)
    over_layers = grads.groupby(["run_id", "net", "depth", "iteration"], as_index=False)["grad_norm"].median()
    # Few recordings (a short run): mark them, or a lone recording would draw nothing.
    few = over_layers.groupby("run_id")["iteration"].nunique().min() < 20
    for col, depth in enumerate(depths):
        nets = [series_label(*s) for s in drawn if s[1] == depth]
        top, bottom = axes[0][col], axes[1][col]
        sns.lineplot(
            data=over_layers[over_layers.depth == depth],
            x="iteration",
            y="grad_norm",
            hue="net",
            hue_order=nets,
            palette=colors,
            errorbar=SPREAD,
            err_kws={"alpha": BAND_ALPHA},
            marker="o" if few else None,
            markersize=4,
            ax=top,
        )
        sns.lineplot(
            data=grads[grads.depth == depth],
            x="layer_index",
            y="grad_norm",
            hue="net",
            hue_order=nets,
            palette=colors,
            estimator="median",
            errorbar=("pi", 50),
            err_kws={"alpha": BAND_ALPHA},
            marker="o",
            markersize=3,
            ax=bottom,
        )
        top.set_title(f"{depth} layers")
        _iteration_axis(top, study.iterations)
        bottom.set_xlabel("layer (conv/fc weight, input to output)")
        for ax in (top, bottom):
            ax.set_yscale("log")
            ax.set_ylabel("gradient L2 norm" if col == 0 else "")
            ax.legend(fontsize=7)
    runs = study.select(data.runs)
    measured = runs[runs["run_id"].isin(grads["run_id"])]
    notes = coverage(measured, drawn, []) + notes
    every = sorted(grads.groupby("run_id")["iteration"].min().unique())
    caption = (
        f"Top: median over layers of each weight's gradient L2 norm, recorded every {'/'.join(map(str, every))} "
        "iterations (line: mean over seeds; band: min to max). Bottom: each layer's norm, median over the "
        "recordings and seeds (band: interquartile range). Vanishing gradients would show as a norm falling "
        "by orders of magnitude towards the first layers."
    )
    text, label = _finish(fig, _title("Gradient norms", study, measured), caption, notes)
    return Drawn("gradients", fig, study, notes, text, caption_label=label)


# --- Beyond the paper: final error against the training budget --------------------------------


@dataclass(frozen=True)
class Budgets(Study):
    """Runs of one setting trained for several budgets: a study per budget, drawn together."""

    budgets: tuple[int, ...] = ()

    def label(self) -> str:
        one = super().label()
        return one.replace(f"{self.iterations:,} iterations", f"{'/'.join(f'{b:,}' for b in self.budgets)} iterations")


def _budget_group(data: RunData, select: dict) -> tuple[Budgets, pd.DataFrame, list[str]]:
    """The setting (data set, batch size, hold-out, variant) whose nets were trained for the most
    budgets (at least two), the final errors of its finished runs, and a note on those left out."""
    from .tables import final_errors

    if select.get("iterations") is not None:
        raise ConfigError("`study plot budget` draws every --iterations the runs have; drop --iterations")
    runs = data.runs[data.runs["run_id"].isin(data.metrics["run_id"])]
    for column in ("dataset", "batch_size", "holdout", "variant"):
        if select.get(column) is not None:
            runs = runs[runs[column] == select[column]]
    keys = ["dataset", "batch_size", "holdout", "variant"]
    groups = []
    for key, group in runs.groupby(keys, sort=False):
        done = group[group["status"] == "done"]
        per_net = done.groupby(["arch", "depth", "shortcut"])["iterations"].nunique()
        if not per_net.empty and per_net.max() >= 2:
            groups.append((done["iterations"].nunique(), len(done), key, group))
    if not groups:
        found = "; ".join(f"{s.label()}" for s in studies(data.runs)) or "none"
        raise NoRunsError(
            f"budget needs one net trained to the end for two or more --iterations in {data.runs_dir} "
            f"(studies found: {found}); train it again with another --iterations"
        )
    groups.sort(key=lambda g: g[:2], reverse=True)
    _, _, (dataset, batch, holdout, variant), group = groups[0]
    finals = final_errors(data.metrics[data.metrics["run_id"].isin(group["run_id"])])
    finals = finals.merge(group[["run_id", "iterations"]], on="run_id")
    budgets = tuple(sorted(group.loc[group["status"] == "done", "iterations"].astype(int).unique()))
    study = Budgets(str(dataset), budgets[-1], int(batch), bool(holdout), str(variant), budgets=budgets)
    notes = []
    unfinished = group[group["status"] != "done"]
    if not unfinished.empty:
        notes.append("unfinished, not drawn: " + ", ".join(
            f"{series_label(r.arch, r.depth, r.shortcut)} s{r.seed} at {r.iterations:,} ({r.last_iteration:,} it. so far)"
            for r in unfinished.itertuples()))
    if len(groups) > 1:
        notes.append("also trained for several budgets, not used here: "
                     + "; ".join(f"{g[2][0]} (batch {g[2][1]})" for g in groups[1:]))
    return study, finals[finals["status"] == "done"], notes


def budget(data: RunData, **select: object) -> Drawn:
    """Beyond the paper: each net's final training (left) and test error (right) against the number
    of iterations it was trained for (the paper's schedule shortened: lr / 10 at 50% and 75%), mean
    over seeds with the seeds as dots; where a deeper net's line crosses under a shallower one's,
    depth has begun to pay."""
    study, finals, notes = _budget_group(data, select)
    series = _series_in(finals)
    # One colour per depth (a plain net and its ResNet twin share it); with a follow-up's arm among
    # them, one per net, so that ResNet-56 and PreAct-ResNet-56 are told apart.
    arms = any(s[0] not in PAPER_ARCHS for s in series)
    colors = dict(zip(series, _palette(len(series)))) if arms else _colors(series)
    dashes = {s: (4, 2) if _kind(s[0]) == "plain" else None for s in series}
    eval_split = "val" if "val" in finals.columns and finals["val"].notna().any() else "test"
    fig, axes = _new_figure(2)
    for ax, (split, name) in zip(axes[0], (("train", "training"), (eval_split, study.eval_name))):
        for s in series:
            rows = _rows_of(finals, s).dropna(subset=[split])
            mean = rows.groupby("iterations")[split].agg(["mean", "min", "max"])
            line = ax.plot(mean.index, mean["mean"], color=colors[s], marker="o", markersize=5, linewidth=1.6,
                           **({"dashes": dashes[s]} if dashes[s] else {}))[0]
            line.set_clip_on(False)
            if rows["seed"].nunique() > 1:
                ax.fill_between(mean.index, mean["min"], mean["max"], color=colors[s], alpha=BAND_ALPHA, linewidth=0)
                ax.plot(rows["iterations"], rows[split], linestyle="none", marker=".", markersize=4,
                        color=colors[s], alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(study.budgets, [f"{b / 1000:g}k" if b >= 1000 else str(b) for b in study.budgets])
        ax.minorticks_off()
        ax.set_xlabel("iterations trained (the budget)")
        ax.set_ylabel("final error (%)")
        ax.set_title(f"final {name} error")
        _legend(ax, series, colors, [], dashes)
    runs = data.runs[data.runs["run_id"].isin(finals["run_id"])]
    # The caption says what is drawn: bands and dots only where a net has several seeds, the dashes only
    # where there are plain nets beside residual ones.
    seeded = any(_rows_of(finals, s)["seed"].nunique() > 1 for s in series)
    kinds = {_kind(s[0]) == "plain" for s in series}
    caption = (
        "Each point: a net's error at the end of a run of that many iterations, with the paper's protocol and "
        "its schedule shortened (lr / 10 at 50% and 75% of the run). "
        + ("Line: mean over seeds; band and dots: the seeds. " if seeded else "One seed: each point is one run. ")
        + ("Solid: residual nets; dashed: plain nets. " if len(kinds) > 1 else "")
        + "A deeper net pays off where its line falls below the shallower one's."
    )
    text, label = _finish(fig, f"Error against budget from your runs: {study.label()}, {_seeds_text(runs)}",
                          caption, notes)
    return Drawn("budget", fig, study, notes, text, caption_label=label)


# --- Beyond the paper: the follow-ups' arms ----------------------------------------------------


#: The arms figure draws its response panel on a log scale where the largest mean response is more than
#: this many times the smallest.
RESPONSE_LOG_RANGE = 10


def arms(data: RunData, **select: object) -> Drawn:
    """Beyond the paper: Figure 6's question per arm. Each net's final training (left) and test error
    (middle) against depth, one line per net (the paper's plain net and ResNet, and each arm: the
    pre-activation ResNet, a zero-init ResNet, a delta-orthogonal plain net, ...); right, where the runs
    were probed, Figure 7's layer responses of each net at the deepest depth."""
    from .tables import final_errors

    armed = data.runs[~data.runs["arch"].isin(PAPER_ARCHS)]
    wanted = list(zip(armed["arch"], armed["depth"], armed["shortcut"]))  # the studies that have arms come first
    study, notes = pick_study(data, "arms", imagenet=False, wanted=wanted, **select)
    runs = study.select(data.runs)
    done = runs[runs["status"] == "done"]
    metrics = study.select(data.metrics)
    finals = final_errors(metrics[metrics["run_id"].isin(done["run_id"])]) if not done.empty else pd.DataFrame()
    nets = sorted(set(finals["arch"]) if not finals.empty else set(), key=lambda a: (_kind(a) != "plain", a))
    if not any(a not in PAPER_ARCHS for a in nets):
        raise NoRunsError(
            f"arms needs finished runs of a follow-up's arm (--arch preact, --init zero-residual or delta-orthogonal) "
            f"in {data.runs_dir} (its study: {study.label()}); train them (`study run --grid followups`)"
        )
    eval_split = "val" if "val" in finals.columns and finals["val"].notna().any() else "test"
    # Read as Figure 7 reads them: one setting of the probe's options, and a note on runs probed too early.
    responses, mixed = one_probe_setting(study.select(data.responses).copy())
    notes = notes + mixed
    deepest = int(finals["depth"].max())
    probed = responses[(responses["depth"] == deepest) & responses["arch"].isin(nets)]
    if early := unsettled_bn(probed):
        notes.append(unsettled_bn_note(early))
    fig, axes = _new_figure(3 if not probed.empty else 2, width=4.0)
    colors = dict(zip(nets, _palette(len(nets))))
    dashes = {a: (4, 2) if _kind(a) == "plain" else None for a in nets}
    depths = sorted(set(finals["depth"].astype(int)))
    for ax, (split, name) in zip(axes[0], (("train", "training"), (eval_split, study.eval_name))):
        for a in nets:
            rows = finals[(finals["arch"] == a) & (finals["shortcut"] == "A")].dropna(subset=[split])
            mean = rows.groupby("depth")[split].mean()
            ax.plot(mean.index, mean.to_numpy(), color=colors[a], marker="o", markersize=5, linewidth=1.6,
                    **({"dashes": dashes[a]} if dashes[a] else {}))
            if rows["seed"].nunique() > 1:
                ax.plot(rows["depth"], rows[split], linestyle="none", marker=".", markersize=4, color=colors[a], alpha=0.6)
        ax.set_xticks(depths)
        ax.set_xlabel("depth (layers)")
        ax.set_ylabel("final error (%)")
        ax.set_title(f"final {name} error")
    from matplotlib.lines import Line2D

    axes[0][0].legend(handles=[Line2D([], [], color=colors[a], linewidth=2, label=net_label(a),
                                      **({"dashes": dashes[a]} if dashes[a] else {})) for a in nets],
                      fontsize=7, loc="best", framealpha=0.85, handlelength=3.5)
    log_responses = False
    if not probed.empty:
        ax = axes[0][2]
        means = {a: probed[probed["arch"] == a].groupby("layer_index")["std"].mean() for a in nets}
        means = {a: m for a, m in means.items() if not m.empty}
        for a, mean in means.items():
            ax.plot(mean.index, mean.to_numpy(), color=colors[a], linewidth=1.3,
                    **({"dashes": dashes[a]} if dashes[a] else {}))
        # Where one arm's responses dwarf the others' (a delta-orthogonal plain net's first layers: tens,
        # against about 1), a linear axis flattens every other line onto the floor.
        shown = pd.concat(means.values())
        shown = shown[shown > 0]  # a log axis leaves out the rest (and NaN), so they do not decide it
        log_responses = bool(not shown.empty and shown.max() > RESPONSE_LOG_RANGE * shown.min())
        ax.set_xlabel("layer index (original)")
        if log_responses:
            ax.set_yscale("log")
            ax.set_ylabel("std (log scale)")
        else:
            ax.set_ylabel("std")
            ax.set_ylim(bottom=0)
        ax.set_title(f"layer responses, {deepest} layers")
    # Per run, probed panel or not: a pre-activation net has no responses by design; any other finished run
    # at the deepest depth without them can still be probed.
    at_deepest = done[done["depth"] == deepest]
    preact = sorted({a for a in at_deepest["arch"] if a.partition("+")[0] == "preact"})
    unprobed = at_deepest[~at_deepest["arch"].isin(preact) & ~at_deepest["run_id"].isin(data.responses["run_id"])]
    if preact:
        notes.append(f"no layer responses for {', '.join(net_label(a) for a in preact)}: in a pre-activation "
                     "block every BN precedes its conv, so no 3x3 layer has a BN output of its own")
    if not unprobed.empty:
        notes.append(f"finished but not probed (run `study probe`): {', '.join(unprobed['run_id'])}")
    notes = coverage(runs, [(a, d, "A") for a in nets for d in depths], []) + notes
    caption = (
        "Beyond the paper: the follow-ups' answers to degradation under the paper's protocol. Line: mean final "
        "error over seeds at each depth; dots: the seeds. Dashed: plain nets (the paper's, and delta-orthogonal); "
        "solid: residual nets (the paper's ResNet, pre-activation, zero-init). "
        + ("Right: Figure 7's response std (after BN, before the nonlinearity or addition) of each 3x3 layer at "
           f"{deepest} layers, mean over seeds"
           + (f", on a log scale (they span more than a factor of {RESPONSE_LOG_RANGE})" if log_responses else "")
           + ". " if not probed.empty else "")
        + "A plain arm whose line falls with depth has no degradation; `study report` gives each arm's verdicts."
    )
    text, label = _finish(fig, _title("The follow-ups' arms", study, runs), caption, notes)
    return Drawn("arms", fig, study, notes, text, caption_label=label)


def _palette(n: int) -> list:
    import seaborn as sns

    return sns.color_palette("tab10", max(n, 1))


BUILDERS = {"fig1": fig1, "fig4": fig4, "fig6": fig6, "fig7": fig7, "gradients": gradients, "budget": budget,
            "arms": arms}


def build(name: str, data: RunData, **select: object) -> Drawn:
    """Build figure `name` (one of FIGURE_NAMES) from the runs in `data`; NoRunsError if none fit."""
    import seaborn as sns

    with sns.axes_style("whitegrid"):
        return BUILDERS[name](data, **select)


def check_out(out_dir: str | os.PathLike, names: Iterable[str],
              fix: str = "pass --out a directory they can be written to") -> None:
    """ConfigError naming the path and `fix` where `save` could not write one of the figures `names` into
    `out_dir` (a folder where a file goes, a file where the folder goes, no permission): for a check before
    any is drawn or written. Creates nothing."""
    for name in names:
        for path in (Path(out_dir) / f"{name}.png", Path(out_dir) / f"{name}.pdf"):
            if (why := unwritable(path)) is not None:
                raise ConfigError(f"cannot write figures to {out_dir}: {why}; {fix}")


def save(drawn: Drawn, out_dir: str | os.PathLike) -> list[Path]:
    """Write `<out_dir>/<name>.png` and `.pdf`; ConfigError naming the fix if that is impossible."""
    out = Path(out_dir)
    paths = [out / f"{drawn.name}.png", out / f"{drawn.name}.pdf"]
    if (blocker := file_in_the_way(out)) is not None:  # mkdir would say only "File exists"
        raise ConfigError(f"cannot write figures to {out}: {blocker} is a file, not a directory; pass --out a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        drawn.figure.savefig(paths[0], dpi=150)
        # The layout is in inches, the same for both files: computing it once more for the PDF would
        # only cost time, so it is frozen after the PNG.
        drawn.figure.set_layout_engine("none")
        drawn.figure.savefig(paths[1])
    except OSError as e:
        raise ConfigError(
            f"cannot write figures to {out} ({e.strerror or e}); pass --out a writable directory"
        ) from None
    drawn.paths = paths
    return paths
