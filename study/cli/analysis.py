"""The analysis commands of `study`: plot, table, report, probe (study/analysis draws, tabulates and
judges; study/probes measures).

User errors (no runs, an unknown run id, an unwritable output) raise ConfigError, whose one line
`study.cli.main` prints as `study: error: ...` with exit code 2. Parsing needs no plotting library:
matplotlib and seaborn are imported when a figure is drawn.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..analysis.figures import FIGURE_NAMES
from ..analysis.load import NoRunsError, RunData
from ..analysis.report import REPORT_FORMATS
from ..analysis.tables import TABLE_NAMES
from ..config import ConfigError
from ..probes import BN_MODES, REDUCTIONS, SPLITS
from .args import path


#: What an --out's suffix says of the report's format, where --format does not say.
REPORT_SUFFIXES = {".md": "md", ".markdown": "md", ".html": "html", ".htm": "html"}
#: --format's other spellings, as other commands spell them (`study table --format markdown`).
FORMAT_ALIASES = {"markdown": "md", "htm": "html"}
#: `study table --format`'s other spelling, as `study report` spells it.
TABLE_FORMAT_ALIASES = {"md": "markdown"}


def _spelled(aliases: dict[str, str]) -> Callable[[str], str]:
    """An argparse `type` that reads a --format in any case and maps its other spellings to the choice."""

    def format_name(value: str) -> str:
        return aliases.get(value.lower(), value.lower())

    return format_name


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add `plot`, `table`, `report` and `probe` to the CLI's sub-parsers; return their handlers."""
    plot = sub.add_parser("plot", help="draw the paper's figures from your runs (PNG and PDF)")
    plot.add_argument("figure", choices=(*FIGURE_NAMES, "all"), help="which figure; `all` draws every one it can")
    _study_options(plot)
    plot.add_argument("--out", type=path, default="figures", help="output directory (default ./figures)")

    table = sub.add_parser("table", help="the paper's tables: your final errors beside the paper's")
    table.add_argument("table", choices=TABLE_NAMES, help="which of the paper's tables")
    _study_options(table)
    table.add_argument("--format", choices=("markdown", "csv"), default="markdown",
                       type=_spelled(TABLE_FORMAT_ALIASES),
                       help="markdown (or md) with its notes (default), or CSV with the notes on stderr")

    report = sub.add_parser("report", help="every figure and table, and a verdict on each claim of the paper")
    _study_options(report)
    report.add_argument("--format", choices=REPORT_FORMATS, type=_spelled(FORMAT_ALIASES),
                        help="md (or markdown): Markdown, its figures (PNG and PDF) beside it; html: one self-contained "
                        "file, figures embedded, with each run's provenance (default: html for an --out ending in "
                        ".html, md for one ending in .md or without --out; another --out needs --format)")
    report.add_argument("--out", type=path,
                        help="the report (default figures/report.md, or figures/report.html with --format html)")

    probe = sub.add_parser("probe", help="measure layer responses (Figure 7) of finished runs into responses.parquet")
    probe.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to probe (default: every finished run)")
    probe.add_argument("--runs-dir", type=path, default="runs", help="where the run directories are (default ./runs)")
    probe.add_argument("--split", choices=SPLITS, default=None,
                       help="images to use (default: each run's evaluation split, test, or val for a --holdout run, "
                            "as a run records them when it finishes)")
    probe.add_argument(
        "--bn-mode", choices=BN_MODES, default="eval", help="BN running stats (eval) or batch stats (train)"
    )
    probe.add_argument(
        "--reduction",
        choices=REDUCTIONS,
        default="tensor",
        help="std over the whole response tensor, or per channel then averaged",
    )
    probe.add_argument("--include-first", action="store_true", help="also measure the first conv layer")
    probe.add_argument("--max-images", type=int, help="use only the split's first N images")
    probe.add_argument("--data-dir", type=path, help="where the data set's files are (default ./data)")
    probe.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (one GPU of several; default auto)")
    probe.add_argument("--force", action="store_true",
                       help="measure runs again whose responses of their checkpoint, with these options, are recorded")
    return {"plot": cmd_plot, "table": cmd_table, "report": cmd_report, "probe": cmd_probe}


def _study_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", type=path, default="runs", help="where the run directories are (default ./runs)")
    parser.add_argument("--dataset", help="use the runs of this data set (default: the study closest to the paper)")
    parser.add_argument(
        "--iterations",
        type=int,
        help="use the runs of this iteration budget (default: the study closest to the paper)",
    )
    parser.add_argument("--batch-size", type=int, help="use the runs of this batch size")
    parser.add_argument(
        "--holdout",
        action=argparse.BooleanOptionalAction,
        help="use the runs trained with `study run --holdout` (90/10 split, validation curves); "
        "--no-holdout: those trained on the whole training set (default: the study closest to the paper)",
    )
    parser.add_argument(
        "--variant",
        help="use the runs with these non-paper settings, as the notes name them, e.g. bf16 or bn2,light0 "
        "(default: the paper's settings where present); `paper` for none",
    )


def _selection(args: argparse.Namespace) -> dict:
    """The study-choosing options given on the command line, for `pick_study`."""
    variant = args.variant
    if variant is not None:
        variant = "" if variant == "paper" else ",".join(sorted(v.strip() for v in variant.split(",") if v.strip()))
    select = dict(dataset=args.dataset, iterations=args.iterations, batch_size=args.batch_size,
                  holdout=args.holdout, variant=variant)
    return {k: v for k, v in select.items() if v is not None}


def _print_notes(name: str, notes: list[str], file=None) -> None:
    for note in notes:
        print(f"{name}: {note}", file=file)


def _load(runs_dir: str) -> RunData:
    """The runs, with one line on stderr for each file of theirs that could not be read (left out)."""
    data = RunData.load(runs_dir)
    for note in data.notes():
        print(f"note: {note}", file=sys.stderr)
    return data


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw one figure, or every figure that has runs (`all`), into --out as PNG and PDF."""
    from ..analysis.figures import build, check_out, save

    names = FIGURE_NAMES if args.figure == "all" else (args.figure,)
    check_out(args.out, names)  # every figure's files, before any is drawn or written
    data = _load(args.runs_dir)
    drawn_any = False
    for name in names:
        select = _selection(args)
        if args.figure == "all" and name == "budget":  # it draws every budget: --iterations does not narrow it
            select.pop("iterations", None)
        try:
            drawn = build(name, data, **select)
        except NoRunsError as e:
            if args.figure != "all":
                raise
            print(f"{name}: skipped: {e}")
            continue
        paths = save(drawn, args.out)
        drawn_any = True
        print(f"{name}: {drawn.study.label()} -> {', '.join(map(str, paths))}")
        _print_notes(name, drawn.notes)
    if not drawn_any:
        raise NoRunsError(
            f"no figure could be drawn from {args.runs_dir} (see the lines above); "
            "train runs with metrics first or pass --runs-dir"
        )
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    """Print a table as markdown (with its notes) or CSV (notes on stderr)."""
    from ..analysis.tables import build

    table = build(args.table, _load(args.runs_dir), **_selection(args))
    if args.format == "csv":
        print(table.csv(), end="")
        _print_notes(args.table, table.notes, file=sys.stderr)
    else:
        print(table.markdown(), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report (Markdown with its figures beside it, or one HTML file) and print one line per claim."""
    from ..analysis.report import check_out, write_report

    suffix = Path(args.out).suffix.lower() if args.out else ""
    # (A folder given as --out is named as such by check_out, whatever its name ends in.)
    if args.out and args.format is None and suffix not in REPORT_SUFFIXES and not Path(args.out).is_dir():
        what = f"not {suffix}" if suffix else "and this name has no extension"
        raise ConfigError(f"--out {args.out}: a report is Markdown or HTML, {what}; name it .md or .html, "
                          "or give --format md|html")
    fmt = args.format or REPORT_SUFFIXES.get(suffix, "md")
    out = args.out or f"figures/report.{fmt}"
    check_out(out, fmt)  # before the runs are read: nothing printed, drawn or written for a bad --out
    path = write_report(_load(args.runs_dir), out, format=fmt, **_selection(args))
    print(f"report -> {path}")
    return 0


def _probe_data(cfg, split: str, data_dir: str | None, cache: dict):
    """The images to probe a run on, mean-subtracted with the mean of the run's own training split."""
    from ..data import load_data

    def load(holdout: bool):
        key = (cfg.dataset, holdout)
        if key not in cache:
            cache[key] = load_data(cfg.dataset, data_dir, holdout=holdout)
        return cache[key]

    if split == "val" and not cfg.holdout:
        raise ConfigError(
            f"run {cfg.run_id} trained on the whole training set, so it has no validation split; use --split test"
        )
    data = load(cfg.holdout)
    if split == "test" and cfg.holdout:
        # The test set with the 90% training split's mean, which is what this net was trained with.
        data = replace(load(False), mean=data.mean)
    return data


def cmd_probe(args: argparse.Namespace) -> int:
    """Measure the layer responses of the named (or every finished) run from its checkpoint."""
    from ..models import build_model
    from ..probes import record_responses, recorded_with
    from ..runstore import missing_runs_dir, no_checkpoint, readable_runs, unwritable
    from ..train import ieee_fp32, resolve_device

    if args.max_images is not None and args.max_images <= 0:
        raise ConfigError(f"--max-images must be a positive number of images; got {args.max_images}")
    listed, notes = readable_runs(args.runs_dir, args.run_ids)
    runs = {run.cfg.run_id: run for run in listed}
    for note in notes:  # runs left out, as `plot`, `table` and `report` leave them out
        print(note, file=sys.stderr)
    if not runs and (missing := missing_runs_dir(args.runs_dir)) is not None:
        raise NoRunsError(missing)
    if not runs:
        raise NoRunsError(
            f"no runs in {args.runs_dir} to probe; train some first (e.g. `study run --grid quick`) or pass --runs-dir"
        )
    unknown = [r for r in args.run_ids if r not in runs]
    if unknown:
        raise ConfigError(
            f"unknown run id {unknown[0]!r} in {args.runs_dir}; "
            f"`study status --runs-dir {args.runs_dir}` lists the runs"
        )
    if args.run_ids:
        chosen = [runs[r] for r in args.run_ids]
        imagenet = [r.cfg.run_id for r in chosen if r.cfg.imagenet]
        if imagenet:
            raise ConfigError(f"{imagenet[0]} is an ImageNet run; Figure 7's probe is for CIFAR-style runs, leave it out")
    else:
        # Figure 7 is a CIFAR figure: every finished run of a CIFAR-style data set.
        chosen = [run for run in runs.values() if run.status().get("status") == "done" and not run.cfg.imagenet]
        if not chosen:
            raise NoRunsError(f"no finished run in {args.runs_dir} to probe; wait for one to finish or name run ids")
    device = resolve_device(args.device)  # a ConfigError naming the fix for a device this machine lacks
    cache: dict = {}
    def options(run) -> dict:
        """How `run` is measured: the options asked for, its own evaluation split where none was."""
        return dict(split=args.split or ("val" if run.cfg.holdout else "test"), bn_mode=args.bn_mode,
                    reduction=args.reduction, include_first=args.include_first, max_images=args.max_images)

    told: set[str] = set()

    def checkpoint(run):
        # An unreadable checkpoint.pt, and the previous one used instead, said once on stderr: the responses are
        # then of older weights, as the line that records them says (its iteration).
        said: list[str] = []
        state = run.load_checkpoint(log=said.append)
        if state is not None and run.cfg.run_id not in told:  # (none readable: the error below says so)
            for line in said:
                print(line, file=sys.stderr)
        told.add(run.cfg.run_id)
        if state is None:
            raise ConfigError(no_checkpoint(run, "probe it"))
        return state

    def prepared(run, state=None):
        """The run's net with its checkpoint's weights, the checkpoint's iteration and the images to probe."""
        state = checkpoint(run) if state is None else state
        data = _probe_data(run.cfg, options(run)["split"], args.data_dir, cache)
        model = build_model(
            run.cfg.arch,
            run.cfg.depth,
            shortcut=run.cfg.shortcut,
            num_classes=data.info.num_classes,
            in_channels=data.info.in_channels,
        )
        model.load_state_dict(state["model"])
        return model, state["iteration"], data

    # Every run's checkpoint and data first: a run that cannot be probed stops the command before any
    # responses.parquet is written (the data stay cached; a net's weights are read again below, one at a time).
    # A run whose responses of its checkpoint, with these options, are recorded (as every run records them
    # when it finishes, on its evaluation split) is not measured again, unless --force.
    skipped = []
    for run in chosen:
        state = checkpoint(run)
        # (A finished run's responses of its last weights are kept even where only an older checkpoint is left.)
        status = run.status()
        final = status.get("iteration") if status.get("status") == "done" else None
        if not args.force and any(recorded_with(run, int(i), **options(run))
                                  for i in {state["iteration"], final} if isinstance(i, int)):
            skipped.append(run)
            continue
        prepared(run, state)
        if (why := unwritable(run.dir / "responses.parquet")) is not None:
            raise ConfigError(f"cannot write the responses of run {run.cfg.run_id}: {why}; probe runs whose folders "
                              "you can write")
    chosen = [run for run in chosen if run not in skipped]
    for run in chosen:
        model, iteration, data = prepared(run)
        with ieee_fp32():  # the responses in IEEE fp32, not TF32, as the runs trained
            path = record_responses(run, model.to(device), data.to(device), iteration=iteration, **options(run))
        print(f"{run.cfg.run_id}: layer responses at iteration {iteration} -> {path}")
    for run in skipped:
        print(f"{run.cfg.run_id}: layer responses of its checkpoint with these options already recorded, skipped "
              "(--force measures them again)")
    return 0
