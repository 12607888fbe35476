"""Reading run directories into long-form pandas tables, and choosing which runs form one study.

Everything here reads files only (`config.json`, `status.json`, `metrics.parquet`, `responses.parquet`,
`gradients.parquet`, and `tencrop.json`, the 10-crop test that `study evaluate` writes); nothing
imports the trainer. A run directory written by another tool (an ImageNet run, say, whose data set or
depth `RunConfig` does not know) is read all the same: its `config.json` is taken as plain JSON, and
without one the identity comes from its metrics rows. A `config.json` that is there but cannot be read
(`runstore.read_config`) is damage, not a run without one: the run is left out with a note, as a damaged
Parquet file's rows are (`RunData.notes`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import CIFAR_DEPTHS, IMAGENET_BATCH_SIZE, IMAGENET_DEPTHS, PAPER_BATCH_SIZE, ConfigError
from ..evaluate import TENCROP_FILE
from ..probes import PROBE_DEFAULTS
from ..runstore import METRIC_COLUMNS, list_runs, missing_runs_dir, read_config, read_json, unreadable_note, unreadable_reason
from .paper import CIFAR_ITERATIONS, IMAGENET, IMAGENET_ITERATIONS, Series, series_label

IDENTITY = ["run_id", "dataset", "arch", "depth", "shortcut", "seed"]
STUDY_KEY = ["dataset", "iterations", "batch_size", "holdout", "variant"]
RUN_COLUMNS = IDENTITY + ["iterations", "batch_size", "holdout", "variant", "status", "last_iteration"]
IMAGENET_CLASSES = 1000  # the full ILSVRC set: the paper's
#: The variant part naming an ImageNet subset (`classes100`: a run whose data held 100 of the 1000 classes).
SUBSET_PART = "classes"


def net_of(cfg: dict) -> str:
    """The net a run trained, as the analysis keys its series: its `arch` (`plain`, `resnet`,
    `preact`), with a follow-up's initialisation after a `+` (`resnet+zeroinit`, `plain+deltaorth`).
    An arm is its own series of the study, beside the paper's nets, not a variant of it."""
    from ..config import INIT_SUFFIXES

    init = cfg.get("init", "he")
    return str(cfg["arch"]) + (f"+{INIT_SUFFIXES[init]}" if init in INIT_SUFFIXES else "")


def variant_of(cfg: dict) -> str:
    """A run's settings that differ from the paper's, other than budget, batch and hold-out, as the
    run id's suffixes name them (`bf16`, `bn2`, `light0`, `plateau`, ...), sorted and comma-joined;
    "" for the paper's protocol. Runs of different variants are different studies."""
    from ..config import ALL_DATASETS, ConfigError as _ConfigError, RunConfig

    if cfg.get("dataset") not in ALL_DATASETS:
        return ""
    try:
        run = RunConfig.from_dict(cfg)
        paper = RunConfig(arch=run.arch, depth=run.depth, dataset=run.dataset, shortcut=run.shortcut, seed=run.seed,
                          iterations=run.iterations, batch_size=run.batch_size, holdout=run.holdout, init=run.init)
    except (_ConfigError, TypeError, ValueError):
        return ""
    base = paper.run_id
    return ",".join(sorted(p for p in run.run_id[len(base):].split("-") if p)) if run.run_id.startswith(base) else ""
# From `tencrop.json` (ImageNet runs that `study evaluate` has tested): 10-crop top-1 and top-5
# error % and the checkpoint iteration they score; NaN for runs without one.
TENCROP_COLUMNS = ["tencrop_top1", "tencrop_top5", "tencrop_iteration"]
RESPONSE_COLUMNS = ["run_id", "layer_index", "layer_name", "std", "bn_scale_rms"]
GRADIENT_COLUMNS = ["run_id", "iteration", "layer_index", "layer_name", "grad_norm"]


class NoRunsError(ConfigError):
    """No run matches what was asked for. str(e) is one line naming the fix."""


def _run_row(run_dir: Path, unreadable: list[tuple[str, str]] | None = None) -> dict | None:
    """One run's identity, budget and status, or None for a directory that is not a run, or a run left out
    because its config.json is damaged (`read_config`), or, without config.json, its metrics, which would
    name it, are unreadable (those added to `unreadable`, else warned of)."""
    record, cfg = None, None
    if (run_dir / "config.json").exists():
        record, why = read_config(run_dir / "config.json")
        if record is None:  # damage, not a run written without one: its metrics would file it under another study
            _unreadable(run_dir / "config.json", str(why), unreadable)
            return None
        cfg = record["config"]
    metrics_path = run_dir / "metrics.parquet"
    if cfg is None:
        if not metrics_path.exists():
            return None
        # No config.json (a run another tool wrote): the metrics rows carry the identity; the budget is
        # unknown, so the last logged iteration stands in for it.
        try:
            metrics = pd.read_parquet(metrics_path)
        except (OSError, ValueError) as e:  # pyarrow's errors are ValueErrors
            _unreadable(metrics_path, unreadable_reason(e), unreadable)
            return None
        if metrics.empty or not {"arch", "depth", "dataset"} <= set(metrics.columns):
            return None
        cfg = metrics.iloc[0].to_dict()
        cfg["iterations"] = int(metrics["iteration"].max())
    if "arch" not in cfg or "depth" not in cfg or "dataset" not in cfg:
        return None
    status, why = read_json(run_dir / "status.json") if (run_dir / "status.json").exists() else ({}, None)
    if why is not None:  # there but unreadable: where the run stands is unknown
        status = {"status": "unknown"}
        _unreadable(run_dir / "status.json", why, unreadable)
    provenance = record.get("provenance") if record else None
    classes = _class_count(provenance.get("classes") if isinstance(provenance, dict) else None)
    return {
        "run_id": run_dir.name,
        "dataset": str(cfg["dataset"]),
        "arch": net_of(cfg),
        "depth": int(cfg["depth"]),
        "shortcut": str(cfg.get("shortcut", "A")),
        "seed": int(cfg.get("seed", 0)),
        "iterations": int(cfg.get("iterations", CIFAR_ITERATIONS)),
        "batch_size": int(cfg.get("batch_size", PAPER_BATCH_SIZE)),
        "holdout": bool(cfg.get("holdout", False)),
        "variant": _with_subset(variant_of(cfg), str(cfg["dataset"]), classes),
        "status": str(status.get("status", "new")),
        "last_iteration": int(status.get("iteration", 0)),
        "classes": classes,
        **_tencrop(run_dir),
    }


def _with_subset(variant: str, dataset: str, classes: float) -> str:
    """`variant` with `classesN` added where an ImageNet run's data held fewer than its 1000 classes (the
    count its provenance recorded): such runs are not the paper's setting, and not one study with runs on
    the whole set. A count not recorded (runs written before provenance had it) is taken as the whole set."""
    if dataset != IMAGENET or not (classes < IMAGENET_CLASSES):
        return variant
    return ",".join(sorted([p for p in variant.split(",") if p] + [f"{SUBSET_PART}{int(classes)}"]))


def _class_count(value: object) -> float:
    """A recorded class count: a whole number >= 2, else NaN (absent, or not a count)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.nan
    return float(value) if value >= 2 and float(value).is_integer() else math.nan


def _tencrop(run_dir: Path) -> dict:
    """The run's 10-crop result as TENCROP_COLUMNS (NaN without a readable tencrop.json)."""
    record = read_json(run_dir / TENCROP_FILE)[0] or {}
    try:
        values = [float(record[k]) for k in ("top1", "top5", "iteration")]
    except (KeyError, TypeError, ValueError):
        values = [math.nan] * 3
    return dict(zip(TENCROP_COLUMNS, values))


def _unreadable(path: Path, reason: str, unreadable: list[tuple[str, str]] | None) -> None:
    """Note an unreadable file of a run: in `unreadable` (its path and why), or, without that list, as an
    UnreadableFileWarning."""
    if unreadable is not None:
        unreadable.append((str(path), reason))
    else:
        warnings.warn(unreadable_note(path, reason), UnreadableFileWarning, stacklevel=4)


def load_run_table(runs_dir: str | os.PathLike = "runs", unreadable: list[tuple[str, str]] | None = None
                   ) -> pd.DataFrame:
    """One row per run directory under `runs_dir`: identity, budget (`iterations`, `batch_size`,
    `holdout`), `status`, `last_iteration`, `classes` (the training set's class count, as the run
    recorded it; NaN for runs written before it was recorded), and the 10-crop test where `study evaluate` made one
    (`tencrop_top1`, `tencrop_top5`, `tencrop_iteration`; NaN otherwise). Empty (with these
    columns) when there are none."""
    root = Path(runs_dir)
    # Hidden folders are no runs' (a publish's staging folder, say: `study publish`).
    rows = ([_run_row(d, unreadable) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
            if root.is_dir() else [])
    return pd.DataFrame([r for r in rows if r is not None], columns=RUN_COLUMNS + ["classes"] + TENCROP_COLUMNS)


def _no_runs(runs_dir: str | os.PathLike) -> NoRunsError:
    if (missing := missing_runs_dir(runs_dir)) is not None:  # a mistyped path is not "no runs"
        return NoRunsError(missing)
    # Run folders left out for a damaged config.json: that, not "train some first", is what to fix.
    damaged: list[tuple[str, str]] = []
    list_runs(runs_dir, damaged)
    if damaged:
        more = (f" (and {len(damaged) - 1} more run folder(s) like it: `study status --runs-dir {runs_dir}` names them)"
                if len(damaged) > 1 else "")
        return NoRunsError(f"no readable runs in {runs_dir}: {unreadable_note(*damaged[0])}{more}")
    return NoRunsError(
        f"no runs in {runs_dir}; train some first (e.g. `study run --grid quick`) "
        "or pass --runs-dir to the directory that holds them"
    )


class UnreadableFileWarning(UserWarning):
    """A run's Parquet file, or its config.json, could not be read (damaged from outside: files are replaced
    atomically); its rows (for a config.json, the run) are left out and the rest loads."""


def _per_run_files(runs_dir: str | os.PathLike, table: pd.DataFrame, filename: str, columns: list[str],
                   unreadable: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Concatenate `filename` of every run in `table`, with the run's identity, budget and status
    taken from the run table (the authority for them) rather than from the file. An unreadable file is
    left out: added to `unreadable` (its path and why), or, without that list, an UnreadableFileWarning."""
    frames = []
    for run_id in table["run_id"]:
        path = Path(runs_dir) / run_id / filename
        if not path.exists():
            continue
        try:
            frames.append(pd.read_parquet(path).assign(run_id=run_id))
        except (OSError, ValueError) as e:  # pyarrow's errors are ValueErrors
            # Files are replaced atomically, so this is damage from outside; the rest still loads.
            _unreadable(path, unreadable_reason(e), unreadable)
    frames = [f for f in frames if not f.empty]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    df = df.drop(columns=[c for c in RUN_COLUMNS if c in df.columns and c != "run_id"])
    df = df.merge(table[RUN_COLUMNS], on="run_id", how="inner", validate="many_to_one")
    extras = [c for c in df.columns if c not in columns and c not in RUN_COLUMNS]
    # reindex: a column that files of older runs lack (warmup_s) comes back as NaN
    return df.reindex(columns=[*dict.fromkeys([*columns, *IDENTITY, *extras, *RUN_COLUMNS])])


def load_runs(runs_dir: str | os.PathLike = "runs") -> pd.DataFrame:
    """Long-form metrics of every run under `runs_dir`: one row per run, epoch and split with the
    columns of `metrics.parquet` (`study.runstore.METRIC_COLUMNS`) plus the run's `status`, its
    budget `iterations` (the planned total, beside `iteration`, the row's own), `batch_size`,
    `holdout` and `last_iteration`.

    Raises NoRunsError (a ConfigError) when `runs_dir` holds no run at all.
    """
    table = load_run_table(runs_dir)
    if table.empty:
        raise _no_runs(runs_dir)
    return _per_run_files(runs_dir, table, "metrics.parquet", METRIC_COLUMNS)


def load_responses(runs_dir: str | os.PathLike = "runs") -> pd.DataFrame:
    """Every run's `responses.parquet` (Figure 7's layer-response stds, see `study.probes`), long
    form, with the run's identity and budget; empty when no run has been probed."""
    return _per_run_files(runs_dir, load_run_table(runs_dir), "responses.parquet", RESPONSE_COLUMNS)


def one_probe_setting(responses: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The responses measured with one setting of the probe's options (the one most runs used;
    on a tie, the one nearest the defaults), and a note naming the runs left out, if any: curves
    measured differently (per channel vs whole tensor, BN in train vs eval mode) do not compare.
    Figure 7 and the claims on responses (2 and 5) read the same runs' responses through it."""
    columns = [c for c in PROBE_DEFAULTS if c in responses]
    if not columns:
        return responses, []
    first = responses.drop_duplicates("run_id").set_index("run_id")[columns]  # one setting per run
    per_run = first.astype(object).where(first.notna(), None).astype(str).apply(tuple, axis=1)
    if per_run.nunique() <= 1:
        return responses, []
    counts = per_run.value_counts()
    default = tuple(str(PROBE_DEFAULTS[c]) for c in columns)
    nearest = {s: sum(a == b for a, b in zip(s, default) if b != "test") for s in counts.index}
    chosen = max(counts.index, key=lambda s: (counts[s], nearest[s]))
    left = sorted(per_run.index[per_run != chosen])
    note = (f"left out, measured with other `study probe` options than the rest: {', '.join(left)} "
            f"(probe them again with the options the others used)")
    return responses[responses["run_id"].isin(per_run.index[per_run == chosen])], [note]


#: BN's running statistics start at mean 0 and variance 1 and move 10% of the way to each batch's
#: per step (momentum 0.1): after fewer steps than this they still describe the start of training, so
#: responses measured with BN in eval mode (the probe's default) can be off by orders of magnitude.
UNSETTLED_BN_ITERATIONS = 100


def unsettled_bn(responses: pd.DataFrame) -> list[str]:
    """The runs in `responses` measured with BN in eval mode after fewer than
    `UNSETTLED_BN_ITERATIONS` iterations: the iteration the probe measured (`probed_iteration`),
    or for files written before that column the run's last iteration."""
    if responses.empty or "bn_mode" not in responses or "last_iteration" not in responses:
        return []
    probed = responses["last_iteration"]
    if "probed_iteration" in responses:
        probed = pd.to_numeric(responses["probed_iteration"], errors="coerce").fillna(probed)
    early = responses[(responses["bn_mode"] == "eval") & (probed < UNSETTLED_BN_ITERATIONS)]
    return sorted(early["run_id"].unique())


def unsettled_bn_note(run_ids: list[str]) -> str:
    return (f"measured with BN in eval mode after fewer than {UNSETTLED_BN_ITERATIONS} iterations, when BN's "
            f"running statistics have barely left their start (mean 0, variance 1), so these responses can be "
            f"far off: {', '.join(run_ids)} (probe them with `study probe --bn-mode train`, or train longer)")


def load_gradients(runs_dir: str | os.PathLike = "runs") -> pd.DataFrame:
    """Every run's `gradients.parquet` (per-layer gradient norms during training), long form, with
    the run's identity and budget; empty when no run recorded any."""
    return _per_run_files(runs_dir, load_run_table(runs_dir), "gradients.parquet", GRADIENT_COLUMNS)


@dataclass
class RunData:
    """All that the figures, tables and report read: the run table (with the 10-crop columns) and
    the three long-form tables."""

    runs_dir: Path
    runs: pd.DataFrame
    metrics: pd.DataFrame
    responses: pd.DataFrame
    gradients: pd.DataFrame
    #: The runs' files that could not be read, each with why: their rows are left out (a config.json's: its run)
    #: (`unreadable_note`).
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, runs_dir: str | os.PathLike = "runs") -> "RunData":
        """Read `runs_dir`; NoRunsError when it holds no run."""
        unreadable: list[tuple[str, str]] = []
        runs = load_run_table(runs_dir, unreadable)
        if runs.empty:
            raise _no_runs(runs_dir)
        return cls(
            Path(runs_dir),
            runs,
            _per_run_files(runs_dir, runs, "metrics.parquet", METRIC_COLUMNS, unreadable),
            _per_run_files(runs_dir, runs, "responses.parquet", RESPONSE_COLUMNS, unreadable),
            _per_run_files(runs_dir, runs, "gradients.parquet", GRADIENT_COLUMNS, unreadable),
            unreadable,
        )

    def notes(self) -> list[str]:
        """One line for each unreadable file (`unreadable_note`)."""
        return [unreadable_note(path, reason) for path, reason in self.unreadable]

    def unreadable_metrics(self) -> set[str]:
        """The runs whose metrics.parquet could not be read."""
        return {Path(path).parent.name for path, _ in self.unreadable if Path(path).name == "metrics.parquet"}


@dataclass(frozen=True)
class Study:
    """Runs that can share a figure: same data set, iteration budget, batch size and split."""

    dataset: str
    iterations: int
    batch_size: int
    holdout: bool
    variant: str = ""

    @property
    def paper_budget(self) -> tuple[int, int]:
        """The paper's iterations and batch size for this study's kind of data: CIFAR's 64k at 128, or
        ImageNet's 60e4 at 256."""
        if self.dataset == IMAGENET:
            return IMAGENET_ITERATIONS, IMAGENET_BATCH_SIZE
        return CIFAR_ITERATIONS, PAPER_BATCH_SIZE

    @property
    def subset(self) -> int | None:
        """The class count of an ImageNet subset (`classes100` in `variant`); None for the whole set."""
        for part in self.variant.split(","):
            if part.startswith(SUBSET_PART) and part[len(SUBSET_PART):].isdigit():
                return int(part[len(SUBSET_PART):])
        return None

    @property
    def protocol_variant(self) -> str:
        """`variant` without the subset part: the deviations of protocol alone (bf16, ...)."""
        return ",".join(p for p in self.variant.split(",") if p and not p.startswith(SUBSET_PART))

    @property
    def on_paper_schedule(self) -> bool:
        """The paper's data set (all of it: not an ImageNet subset), budget and batch size (a variant of the
        protocol, bf16 say, allowed): where the paper's final numbers can stand beside ours (a star at the
        end of a curve, a table's difference)."""
        return (self.dataset in ("cifar10", IMAGENET) and (self.iterations, self.batch_size) == self.paper_budget
                and self.subset is None)

    @property
    def is_paper(self) -> bool:
        """The paper's own setting: CIFAR-10 for 64k iterations at batch 128, or ImageNet for 60e4 at
        batch 256, no deviation of protocol (`variant`), and the whole training set (the paper's curves and
        tables are of nets trained on all of it; its 90/10 hold-out only chose the budget)."""
        return self.on_paper_schedule and not self.variant and not self.holdout

    def distance_from_paper(self) -> tuple[bool, float, float]:
        """How far the setting is from the paper's, for ranking studies (`pick_study`): whether the data set
        is another than the paper's (CIFAR-10 or ImageNet), and how many times the budget and the batch
        size differ from the paper's (log ratios, 0 for the paper's: 32k and 128k iterations are as far
        from 64k)."""
        budget, batch = self.paper_budget
        return (self.dataset not in ("cifar10", IMAGENET), abs(math.log(self.iterations / budget)),
                abs(math.log(self.batch_size / batch)))

    def deviations(self) -> list[str]:
        """How this study's setting differs from the paper's, in words (empty for the paper's own;
        only meaningful on CIFAR-10 and ImageNet)."""
        budget, batch = self.paper_budget
        out = []
        if self.iterations != budget:
            out.append(f"{'shortened' if self.iterations < budget else 'longer'} ({self.iterations:,} iterations, "
                       f"the paper's {budget:,})")
        if self.batch_size != batch:
            out.append(f"at batch {self.batch_size} (the paper's {batch})")
        if self.subset is not None:
            out.append(f"on {self.subset:,} of ImageNet's {IMAGENET_CLASSES:,} classes")
        if self.protocol_variant:
            out.append(f"a variant of the protocol ({self.protocol_variant})")
        if self.holdout:
            out.append("trained on 90% of the training set (a 10% hold-out)")
        return out

    @property
    def eval_name(self) -> str:
        """What the bold curves show: the test set, or the validation set (hold-out or ImageNet)."""
        return "validation" if self.holdout or self.dataset == IMAGENET else "test"

    def label(self) -> str:
        """E.g. `fashion-mnist-mini, 200 iterations`; a non-paper batch size or a hold-out is named."""
        parts = [self.dataset, f"{self.iterations:,} iterations"]
        if self.batch_size != self.paper_budget[1]:
            parts.append(f"batch {self.batch_size}")
        if self.holdout:
            parts.append("90/10 hold-out")
        if self.subset is not None:
            parts.append(f"{self.subset:,} classes")
        if self.protocol_variant:
            parts.append(f"variant {self.protocol_variant}")
        return ", ".join(parts)

    def select(self, df: pd.DataFrame) -> pd.DataFrame:
        """The rows of `df` (which carries the study columns) that belong to this study."""
        mask = (
            (df["dataset"] == self.dataset)
            & (df["iterations"] == self.iterations)
            & (df["batch_size"] == self.batch_size)
            & (df["holdout"] == self.holdout)
            & (df["variant"] == self.variant)
        )
        return df[mask]


def studies(runs: pd.DataFrame) -> list[Study]:
    """The distinct studies in a run table."""
    keys = runs[STUDY_KEY].drop_duplicates().itertuples(index=False)
    return [Study(str(d), int(i), int(b), bool(h), str(v)) for d, i, b, h, v in keys]


#: The options of `study plot`, `study table` and `study report` that choose a study.
CHOOSERS = "--dataset/--iterations/--batch-size/--[no-]holdout/--variant"


def chosen_text(select: dict) -> str:
    """The study choosers given (`pick_study`'s keywords), as the command line gives them:
    `--iterations 32000, --variant bf16`; "" for none."""
    return ", ".join(_filter_text(CHOOSER_FLAGS[k], v) for k, v in select.items() if v is not None and k in CHOOSER_FLAGS)


#: The study choosers (`pick_study`'s keywords, STUDY_KEY) as the analysis commands take them.
CHOOSER_FLAGS = {"dataset": "--dataset", "iterations": "--iterations", "batch_size": "--batch-size",
                 "holdout": "--holdout", "variant": "--variant"}


def _filter_text(flag: str, value: object) -> str:
    """A study filter as the command line gives it: `--iterations 300`, `--no-holdout`, `--variant paper`."""
    if flag == "--holdout":
        return "--holdout" if value else "--no-holdout"
    return f"{flag} {value if value != '' else 'paper'}"


def no_metrics_fix(data: RunData) -> str:
    """What to do where no run in `data` has metrics: `pick_study`'s fix, and the report's (`require_metrics`).
    Where metrics files are there but unreadable, the notes printed above the error say which and how to mend
    them; otherwise no run has finished an epoch yet."""
    unreadable = {Path(path).parent.name for path, _ in data.unreadable if Path(path).name == "metrics.parquet"}
    if unreadable and set(data.runs["run_id"]) - unreadable:  # others have logged nothing yet
        return ("the metrics files there are unreadable or not written yet: mend the unreadable ones as the notes "
                "say, or wait for the other runs' first epoch, or pass --runs-dir to the directory that holds the "
                "runs you meant")
    if unreadable:
        return ("no metrics file there can be read: mend the unreadable ones as the notes say, or pass --runs-dir "
                "to the directory that holds the runs you meant")
    return "no run has finished an epoch yet: wait for one, or pass --runs-dir to the directory that holds them"


def require_metrics(data: RunData, what: str) -> None:
    """NoRunsError, worded as `pick_study` words it for a figure or table, where no run in `data` has
    metrics (none has finished an epoch, or their files are unreadable: `data.notes()` says so)."""
    if data.metrics.empty:
        raise NoRunsError(f"{what} needs runs with metrics in {data.runs_dir}, found none (runs with metrics: none); "
                          f"{no_metrics_fix(data)}")


def pick_study(
    data: RunData,
    what: str,
    *,
    imagenet: bool,
    wanted: Iterable[Series] = (),
    dataset: str | None = None,
    iterations: int | None = None,
    batch_size: int | None = None,
    holdout: bool | None = None,
    variant: str | None = None,
    needs: str = "metrics",
) -> tuple[Study, list[str]]:
    """Choose the study that `what` (a figure or table name) is drawn from.

    Candidates are ImageNet runs or the others (`imagenet`), narrowed by `dataset`, `iterations`,
    `batch_size`, `holdout` and `variant` ("" for the paper's protocol) when given, and only runs with rows in
    `needs` (`metrics`, `responses` or `gradients`). Preferred: the study holding any of the
    paper's `wanted` series, then the paper's own setting, then the paper's protocol (no variant),
    then training on the whole training set (no hold-out: the paper's curves are test errors), then
    the one with most of `wanted`, then the paper's data set, then the budget and batch size closest to
    the paper's (`Study.distance_from_paper`), then the most runs. Returns the study and one note naming
    the studies left out. NoRunsError when no run qualifies.
    """
    runs = data.runs[data.runs["run_id"].isin(getattr(data, needs)["run_id"])]
    candidates = runs[(runs["dataset"] == IMAGENET) == imagenet]
    chosen = (("dataset", "--dataset", dataset), ("iterations", "--iterations", iterations),
              ("batch_size", "--batch-size", batch_size), ("holdout", "--holdout", holdout),
              ("variant", "--variant", variant))
    for column, _, value in chosen:
        if value is not None:
            candidates = candidates[candidates[column] == value]
    if candidates.empty:
        present = "; ".join(s.label() for s in studies(runs)) or "none"
        kind = "ImageNet runs (dataset imagenet)" if imagenet else "CIFAR-style runs"
        fixes = {
            "responses": "run `study probe` on finished runs first",
            "gradients": "runs record them every 100 iterations (gradients.parquet); train one for at least 100 iterations",
        }
        fix = fixes.get(needs, "pass --runs-dir to the directory that holds them")
        if needs == "metrics" and runs.empty:
            fix = no_metrics_fix(data)
        filters = ", ".join(_filter_text(flag, value) for _, flag, value in chosen if value is not None)
        if filters:
            fix = f"pick {CHOOSERS} among those, or leave them out"
        raise NoRunsError(
            f"{what} needs {kind} with {needs}{' matching ' + filters if filters else ''} in {data.runs_dir}, "
            f"found none (runs with {needs}: {present}); {fix}"
        )
    wanted = set(wanted)

    def score(study: Study) -> tuple:
        group = study.select(candidates)
        hits = len(set(zip(group["arch"], group["depth"], group["shortcut"])) & wanted)
        other_data, budget_gap, batch_gap = study.distance_from_paper()
        # Then, among studies with as many of the wanted nets, the one closest to the paper's data set, budget
        # and batch (a pilot's 32k before its 16k, whatever order their folders list in), then the most runs.
        return (hits > 0, study.is_paper, not study.variant, not study.holdout, hits, not other_data, -budget_gap,
                -batch_gap, len(group))

    ranked = sorted(studies(candidates), key=score, reverse=True)
    notes = []
    if len(ranked) > 1:
        others = "; ".join(s.label() for s in ranked[1:])
        notes.append(f"also present, not used here: {others} (`study plot`, `study table` and `study report` choose with {CHOOSERS})")
    return ranked[0], notes


def of_paper_depths(runs: pd.DataFrame) -> bool:
    """Whether the study is one of the paper's depths (all of its depths are the paper's, or two of
    them are): only then are the paper's nets that it lacks worth a note (a study of 8 and 20 layers
    does not miss plain-56; one of 8, 20 and 56 layers does miss ResNet-56)."""
    depths = set(runs["depth"].astype(int))
    paper = depths & set(CIFAR_DEPTHS + IMAGENET_DEPTHS)
    return bool(depths) and (paper == depths or len(paper) >= 2)


def coverage(runs: pd.DataFrame, drawn: Iterable[Series], wanted: Iterable[Series]) -> list[str]:
    """Notes on what a figure lacks: the paper's `wanted` series with no run, seeds of a `drawn`
    series that other series of the study have but it has not, and drawn runs not `done`."""
    present = set(zip(runs["arch"], runs["depth"], runs["shortcut"]))
    seeds = set(runs["seed"])
    missing = [series_label(*s) for s in wanted if s not in present]
    for s in drawn:
        have = set(runs.loc[(runs["arch"] == s[0]) & (runs["depth"] == s[1]) & (runs["shortcut"] == s[2]), "seed"])
        if have:
            missing += [f"{series_label(*s)} s{seed}" for seed in sorted(seeds - have)]
    notes = [f"missing runs: {', '.join(missing)}"] if missing else []
    drawn = set(drawn)
    unfinished = [
        f"{series_label(r.arch, r.depth, r.shortcut)} s{r.seed} ({r.status}, {r.last_iteration:,}/{r.iterations:,} it.)"
        for r in runs.itertuples()
        if (r.arch, r.depth, r.shortcut) in drawn and r.status != "done"
    ]
    if unfinished:
        notes.append(f"unfinished: {', '.join(unfinished)}")
    return notes
