"""The paper's Tables 2, 3 and 6 from your runs: our final-epoch errors beside the paper's.

With several seeds a cell reads "best (mean ± std)" as the paper reports ResNet-110 (std with n - 1);
the difference is our mean minus the paper's mean where it gives one, else its single number. Only
finished (`done`) runs count; unfinished and missing runs are named in the table's notes.

Tables 2 and 3 are the paper's 10-crop testing. A table shows the 10-crop numbers `study evaluate`
wrote (`tencrop.json`, of each run's final checkpoint) only where every finished run it counts has
one; otherwise it shows the centre-crop `val` every run logged, never a mix of the two: a net's
spread over seeds, or its difference from another net, would then be mostly the gap between the two
protocols. The notes say which it is and name the runs still to test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from ..data import DataError, dataset_info
from .load import TENCROP_COLUMNS, RunData, Study, coverage, of_paper_depths, pick_study
from .paper import FIGURES, IMAGENET, PAPER_ARCHS, TABLE2, TABLE3, TABLE6, PaperError, Series, series_label

TABLE_NAMES = ("table2", "table3", "table6")
TOP5_COLUMN = "top5_error_pct"  # an optional metrics column; Table 3 shows it where runs log it


@dataclass
class Table:
    """A table in two forms: `frame` numeric (CSV) and `shown` formatted (markdown), with notes."""

    name: str
    title: str
    study: Study
    frame: pd.DataFrame
    shown: pd.DataFrame
    notes: list[str]

    def markdown(self) -> str:
        """Title, the table as GitHub markdown, and its notes."""
        notes = "".join(f"\n- {n}" for n in self.notes)
        return f"**{self.title}**\n\n{self.shown.to_markdown(index=False, disable_numparse=True)}\n{notes}\n"

    def csv(self) -> str:
        """One row per net, numeric columns: n, best, mean, std, paper, diff per measure."""
        return self.frame.to_csv(index=False)


def final_errors(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per run: identity, status, and the last logged epoch's error per split (`train`,
    `test` and/or `val`, and `top5` where the runs log `top5_error_pct` for their eval split)."""
    last = metrics.sort_values("iteration").groupby(["run_id", "split"], as_index=False).tail(1)
    wide = last.pivot(index="run_id", columns="split", values="error_pct")
    if TOP5_COLUMN in last.columns:
        top5 = last[last["split"] != "train"].set_index("run_id")[TOP5_COLUMN].rename("top5")
        wide = wide.join(top5)
    identity = last.drop_duplicates("run_id").set_index("run_id")[["arch", "depth", "shortcut", "seed", "status"]]
    return identity.join(wide).reset_index()


def format_params(count: float) -> str:
    """A parameter count in millions as the paper's Table 6 writes it: two decimals below a million
    (0.27M), one above (1.7M, 19.4M); `–` where it is unknown."""
    if math.isnan(count):
        return "–"
    return f"{count / 1e6:.2f}M" if count < 1e6 else f"{count / 1e6:.1f}M"


def series_summary(values: pd.Series) -> dict:
    """n, best (lowest error), mean and sample std (n - 1) of one net's errors over seeds."""
    values = values.dropna()
    return {"n": len(values), "best": values.min(), "mean": values.mean(), "std": values.std()}


def format_cell(n: int, best: float, mean: float, std: float) -> str:
    """`best (mean ± std)` over several seeds, the value alone for one, `–` for none."""
    if n == 0:
        return "–"
    if n == 1:
        return f"{best:.2f}"
    return f"{best:.2f} ({mean:.2f} ± {std:.2f})"


def _sort(series: set[Series]) -> list[Series]:
    return sorted(series, key=lambda s: (s[0] != "plain", s[1], s[2]))


def _compare(
    name: str,
    title: str,
    data: RunData,
    study: Study,
    notes: list[str],
    wanted: list[Series],
    measures: list[tuple[str, str, dict[Series, PaperError] | None]],
    keep: Callable[[Series], bool] = lambda s: True,
    tencrop: bool = False,
    logged_note: str | None = None,
) -> Table:
    """Rows: the paper's `wanted` nets and every net the study has (that `keep` accepts). Per
    measure (heading, final_errors column, the paper's values or None, and optionally the paper's
    heading where it measured something else): ours, paper, difference.
    `tencrop`: `val` and `top5` come from the runs' 10-crop tests if every run the table counts has a
    current one, else all from what they logged (`with_tencrop`); `logged_note` is said only then."""
    runs = study.select(data.runs)
    final = final_errors(study.select(data.metrics))
    done = final[final["status"] == "done"]
    if tencrop:
        shown_nets = [keep(s) and s[0] in PAPER_ARCHS for s in zip(done["arch"], done["depth"], done["shortcut"])]
        done, crop_notes = with_tencrop(done[pd.Series(shown_nets, index=done.index, dtype=bool)], runs)
        notes = notes + crop_notes
        if logged_note is not None and not (len(done) and done["tencrop"].all()):
            notes.append(logged_note)
    present = set(zip(runs["arch"], runs["depth"], runs["shortcut"]))
    # The paper's nets only: the follow-ups' arms (`preact`, `resnet+zeroinit`, ...) are the report's own section.
    rows = _sort({s for s in present if keep(s) and s[0] in PAPER_ARCHS} | set(wanted))
    # The paper's numbers are CIFAR-10 / ImageNet ones at its budget and batch: a difference with other
    # data, or with a shortened schedule's, would mislead.
    comparable = study.on_paper_schedule
    frame_rows, shown_rows = [], []
    for s in rows:
        mine = done[(done["arch"] == s[0]) & (done["depth"] == s[1]) & (done["shortcut"] == s[2])]
        numeric = {"net": series_label(*s), "arch": s[0], "depth": s[1], "shortcut": s[2]}
        shown = {"net": series_label(*s)}
        for heading, column, paper, *paper_heading in measures:
            stats = series_summary(mine[column] if column in mine else pd.Series(dtype=float))
            numeric.update({f"{column}_{k}": v for k, v in stats.items()})
            shown.setdefault("seeds", stats["n"])  # the first measure's count (the error every run logs)
            shown[f"ours: {heading}"] = format_cell(**stats)
            if paper is None:
                continue
            ref = paper.get(s)
            diff = stats["mean"] - ref.reference if ref is not None and stats["n"] and comparable else math.nan
            # `_paper`: what `_diff` compares our mean with (the paper's mean where it gives one);
            # `_paper_best`: its best run, to set beside our `_best`.
            numeric.update({f"{column}_paper": ref.reference if ref else math.nan,
                            f"{column}_paper_best": ref.best if ref else math.nan, f"{column}_diff": diff})
            theirs = paper_heading[0] if paper_heading else heading
            shown[f"paper: {theirs}"] = str(ref) if ref else "–"
            diff_heading = f"diff {heading}" if theirs == heading else f"diff ({heading} - paper's {theirs})"
            shown[diff_heading] = f"{diff:+.2f}" if not math.isnan(diff) else "–"
        if tencrop:
            numeric["tencrop_n"] = int(mine["tencrop"].sum())  # of the runs counted, how many 10-crop: all or none
        frame_rows.append(numeric)
        shown_rows.append(shown)
    shown = pd.DataFrame(shown_rows)
    frame = pd.DataFrame(frame_rows).assign(dataset=study.dataset, iterations=study.iterations)
    drawn = [s for s in rows if s in present]
    # The paper's nets a study of its depths lacks are named; a study of others (quick's 8 and 20) lacks none.
    notes = coverage(runs, drawn, wanted if of_paper_depths(runs) else []) + notes
    if study.dataset not in ("cifar10", IMAGENET):
        notes.append(
            f"the paper's numbers are for {'ImageNet' if name != 'table6' else 'CIFAR-10'}; "
            f"yours are {study.dataset}, so no difference is computed"
        )
    elif not comparable:
        notes.append(f"your runs are {' and '.join(study.deviations())}: the paper's numbers are not for this "
                     "setting, so no difference is computed")
    elif not study.is_paper:
        notes.append(f"your runs are {' and '.join(study.deviations())}: the paper's numbers are not for this setting")
    notes.append(
        "cells: best (mean ± std over seeds, n - 1); only finished runs count; "
        "diff = our mean minus the paper's mean (its single number where it gives no mean)"
    )
    return Table(name, f"{title}: {study.label()}", study, frame, shown, notes)


def with_tencrop(done: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """`done` (final_errors of the finished runs one table or claim compares) with `val` and `top5`
    replaced by the runs' 10-crop tests if every one of them has a current one (`tencrop.json` of a
    checkpoint not behind the run's last iteration), else all left as the centre-crop numbers they
    logged: a mix would compare two test protocols. Boolean columns: `tencrop`, whether the run's
    numbers are 10-crop, and `tencrop_current`, whether it has a current 10-crop result; and one note
    saying which it is and naming the runs still to test."""
    # reindex: a run table built without the 10-crop columns reads as no run having one.
    crops = runs.set_index("run_id").reindex(columns=[*TENCROP_COLUMNS, "last_iteration"])
    done = done.join(crops, on="run_id")
    has = done["tencrop_top1"].notna()
    current = has & (done["tencrop_iteration"] >= done["last_iteration"])
    every = bool(current.all())
    done = done.assign(tencrop=every and not done.empty, tencrop_current=current)
    if every:
        done["val"] = done["tencrop_top1"]
        done["top5"] = done["tencrop_top5"]
    elif "top5" not in done:
        done["top5"] = math.nan
    tested = sorted(done.loc[current, "run_id"])
    logged = sorted(done.loc[~current & ~has, "run_id"])
    stale = [
        f"{r.run_id} (its tencrop.json scores iteration {int(r.tencrop_iteration):,}, the run ended at {int(r.last_iteration):,})"
        for r in done[has & ~current].sort_values("run_id").itertuples()
    ]
    if not tested and not stale and not logged:
        return done, []
    if every:
        return done, ["10-crop testing, as the paper: every run's final checkpoint, tested by `study evaluate`"]
    centre = ", ".join(logged + stale)
    if not tested:
        note = (
            "the paper's numbers are 10-crop testing; yours are the centre-crop `val` the runs logged "
            f"({centre}): run `study evaluate` for 10-crop numbers"
        )
    else:
        note = (
            "the paper's numbers are 10-crop testing; yours are the centre-crop `val` every run logged, as "
            f"not every run has a 10-crop result and one table does not mix the two (tested: {', '.join(tested)}): "
            f"run `study evaluate` for {centre} to show 10-crop numbers"
        )
    return done, [note]


def table6(data: RunData, **select: object) -> Table:
    """Table 6: CIFAR-10 final test error of the ResNets (and of the plain nets, which the paper
    gives only as curves), our training error beside it."""
    wanted = list(TABLE6)
    # Chosen as the claims and Figures 1 and 6 choose (their plain nets count too: a table of the paper's
    # plain-20/56 at its setting is not passed over for a ResNet pilot elsewhere).
    figured = [s for spec in ("fig1", "fig6") for _, series in FIGURES[spec].panels for s in series]
    study, notes = pick_study(data, "table6", imagenet=False, wanted=list(dict.fromkeys(wanted + figured)), **select)
    split = "val" if study.holdout else "test"
    if study.holdout:
        notes.append("your runs held out 10% of the training set and report its (validation) error; "
                     "the paper's Table 6 is the test error")
    table = _compare(
        "table6",
        f"Table 6, {study.eval_name} error (%)",
        data,
        study,
        notes,
        wanted,
        [(f"{study.eval_name} error", split, TABLE6, "test error"), ("training error", "train", None)],
    )
    _add_params(table)
    return table


def _add_params(table: Table) -> None:
    """The paper's "# params" column: each row's net as the study trains it (its data set's input
    channels and classes), counted by the model builder as `study models` counts it, not copied from
    the paper: `params` exact in the CSV, in millions as the paper writes them in the table."""
    from ..models import net_params

    try:
        info = dataset_info(table.study.dataset)
    except DataError:  # a data set this version does not know: no net to build
        counts = [math.nan] * len(table.frame)
    else:
        counts, unbuilt = [], []
        for arch, depth, shortcut in zip(table.frame["arch"], table.frame["depth"], table.frame["shortcut"]):
            try:
                counts.append(net_params(arch, int(depth), shortcut, dataset=info.name, num_classes=info.num_classes,
                                         in_channels=info.in_channels))
            except ValueError as e:  # a net the builder refuses (a run another tool wrote, at a depth not 6n+2)
                counts.append(math.nan)
                unbuilt.append(f"{series_label(arch, int(depth), shortcut)} ({str(e).splitlines()[0]})")
        if unbuilt:
            table.notes.insert(-1, f"parameters not counted for nets this package cannot build: {', '.join(unbuilt)}")
        if (info.in_channels, info.num_classes) != (3, 10):
            table.notes.insert(-1, f"parameters: each net as built for {info.name}'s {info.in_channels}-channel "
                                   f"images and {info.num_classes} classes; the paper counts CIFAR-10's 3 and 10 "
                                   "(`study models`)")
    table.frame.insert(table.frame.columns.get_loc("shortcut") + 1, "params", counts)
    table.shown.insert(1, "# params", [format_params(c) for c in counts])


def table2(data: RunData, **select: object) -> Table:
    """Table 2: ImageNet top-1 validation error of plain and ResNet (option A), 18 and 34 layers."""
    wanted = list(TABLE2)
    study, notes = pick_study(data, "table2", imagenet=True, wanted=wanted, **select)
    return _compare(
        "table2",
        "Table 2, ImageNet top-1 validation error (%)",
        data,
        study,
        notes,
        wanted,
        [("top-1", "val", TABLE2)],
        keep=lambda s: s[2] == "A",
        tencrop=True,
    )


def table3(data: RunData, **select: object) -> Table:
    """Table 3: ImageNet 34-layer nets, top-1 and top-5 validation error per shortcut option."""
    wanted = list(TABLE3)
    study, notes = pick_study(data, "table3", imagenet=True, wanted=wanted, **select)
    return _compare(
        "table3",
        "Table 3, ImageNet 34-layer validation error (%)",
        data,
        study,
        notes,
        wanted,
        [
            ("top-1", "val", {s: v[0] for s, v in TABLE3.items()}),
            ("top-5", "top5", {s: v[1] for s, v in TABLE3.items()}),
        ],
        keep=lambda s: s[1] == 34,
        logged_note=f"top-5 without a 10-crop test comes from the metrics column `{TOP5_COLUMN}` where runs log it",
        tencrop=True,
    )


BUILDERS = {"table2": table2, "table3": table3, "table6": table6}


def build(name: str, data: RunData, **select: object) -> Table:
    """Build table `name` (one of TABLE_NAMES) from the runs in `data`; NoRunsError if none fit."""
    return BUILDERS[name](data, **select)
