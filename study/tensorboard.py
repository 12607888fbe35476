"""TensorBoard event files for runs: written live by `study run --tensorboard DIR`, or afterwards from
finished runs' `metrics.parquet` by `study export tensorboard`. Both go through `write_rows` and
`write_hparams`, so they write the same points.

`DIR/<run id>/` holds one run's events, keyed by training iteration (the paper's x-axis):
`error/train`, `error/test` (or `error/val`: the run's eval split), `loss/train`, `loss/test`, `lr`,
and `error_top5/val` where logged (ImageNet); at the end of a `done` run, its hyper-parameters and
final errors (`final/error_train`, ...) for the HParams view.

Resume: the points after a run's checkpoint are redone, so a resumed session's writer opens with
`purge_step` = the checkpoint's iteration + 1 (TensorBoard then drops every earlier point whose step
is >= purge_step, i.e. those past the checkpoint). The live writer flushes after each epoch's points,
before that epoch's checkpoint is written, so the points up to a checkpoint are always on disk.

The `tensorboard` package is optional (`pip install 'resnet-degradation-study[tensorboard]'`); it is imported only here,
and only when asked for.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig

INSTALL = "pip install 'resnet-degradation-study[tensorboard]' (in a checkout: pip install -e '.[tensorboard]')"
EVENTS_GLOB = "events.out.tfevents.*"


def require(what: str = "--tensorboard") -> None:
    """ConfigError (one line, naming the install command) if the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs the tensorboard package: {INSTALL}") from None


def check_dir(path: str | os.PathLike, flag: str = "--tensorboard") -> None:
    """Create `path` and prove a file can be written there; ConfigError naming the flag otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path} is not a writable directory ({e.strerror or e}); "
                          "pass a directory you can write") from None


# --- what is written ---------------------------------------------------------------------------------


def scalars(rows: Iterable[dict]) -> list[tuple[str, float, int]]:
    """The (tag, value, step) points of metrics rows: the step is the row's iteration."""
    points = []
    for row in rows:
        split, step = row["split"], int(row["iteration"])
        points += [(f"error/{split}", float(row["error_pct"]), step), (f"loss/{split}", float(row["loss"]), step)]
        if split == "train":  # both rows of an epoch carry its lr
            points.append(("lr", float(row["lr"]), step))
        top5 = row.get("top5_error_pct")
        if top5 is not None and not math.isnan(float(top5)):
            points.append((f"error_top5/{split}", float(top5), step))
    return points


def write_rows(writer: Any, rows: Iterable[dict]) -> None:
    """Add the points of metrics rows (`scalars`) to a SummaryWriter."""
    for tag, value, step in scalars(rows):
        writer.add_scalar(tag, value, step)


def hparams_of(cfg: RunConfig) -> dict:
    """The run's hyper-parameters for the HParams view: its id and every config field (sequences
    joined with commas; unset ones left out)."""
    params: dict = {"run_id": cfg.run_id}
    for key, value in cfg.to_dict().items():
        if value is None:
            continue
        params[key] = value if isinstance(value, (bool, int, float, str)) else ",".join(map(str, value))
    return params


def final_errors(rows: list[dict]) -> dict[str, float]:
    """The last row's errors of each split: `final/error_train`, `final/error_test`, ... (tags
    that no other point uses, as the HParams view wants)."""
    finals: dict[str, float] = {}
    for row in rows:
        finals[f"final/error_{row['split']}"] = float(row["error_pct"])
        top5 = row.get("top5_error_pct")
        if top5 is not None and not math.isnan(float(top5)):
            finals[f"final/error_top5_{row['split']}"] = float(top5)
    return finals


def write_hparams(writer: Any, cfg: RunConfig, rows: list[dict]) -> None:
    """A finished run's hyper-parameters and final errors, in the writer's own directory (what
    `SummaryWriter.add_hparams(..., run_name=".")` writes, without the second event file it opens),
    at the run's last iteration."""
    from torch.utils.tensorboard.summary import hparams

    finals = final_errors(rows)
    step = max((int(row["iteration"]) for row in rows), default=0)
    for summary in hparams(hparams_of(cfg), finals):
        writer.file_writer.add_summary(summary, step)
    for tag, value in finals.items():
        writer.add_scalar(tag, value, step)


def open_writer(log_dir: str | os.PathLike, purge_step: int) -> Any:
    """A SummaryWriter on `log_dir`. If the directory already holds events, the new file starts
    with TensorBoard's purge marker at `purge_step`: every earlier point at step >= purge_step is
    dropped. TensorBoard reads a directory's event files in name order, and the name starts with
    the second it was opened in: when an existing file is from this very second (a resume or an
    export right after a run), wait for the next one, so that the new file sorts after it."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    existing = list(log_dir.glob(EVENTS_GLOB)) if log_dir.is_dir() else []
    stamps = [int(p.name.split(".")[3]) for p in existing if p.name.split(".")[3].isdigit()]
    if stamps and 0 <= max(stamps) - int(time.time()) <= 1:
        time.sleep(max(stamps) + 1 - time.time())
    return SummaryWriter(str(log_dir), purge_step=purge_step if existing else None)


# --- live: one run's session ----------------------------------------------------------------------


class LiveWriter:
    """One session of one run's TensorBoard events, for `train_steps`: `epoch(rows, final)` after each
    `metrics.parquet` write and before the epoch's checkpoint (adds the new rows' points, and with
    `final`, the run having ended without diverging, its hyper-parameters; then flushes), `close()`
    always. `root` None: does nothing (no --tensorboard, or a process that does not write the run's
    files). The writer opens at the first points, purging those past `iteration`, the checkpoint
    this session starts from."""

    def __init__(self, root: str | os.PathLike | None, cfg: RunConfig, iteration: int) -> None:
        self.dir = None if root is None else Path(root) / cfg.run_id
        self.cfg, self.written_to = cfg, iteration
        self.writer: Any = None

    def _writer(self) -> Any:
        if self.writer is None:
            self.writer = open_writer(self.dir, purge_step=self.written_to + 1)
        return self.writer

    def epoch(self, rows: list[dict], final: bool = False) -> None:
        new = [row for row in rows if row["iteration"] > self.written_to]
        if self.dir is None or not (new or final):
            return
        writer = self._writer()
        write_rows(writer, new)
        if final:
            write_hparams(writer, self.cfg, rows)
        writer.flush()
        self.written_to = max([self.written_to] + [row["iteration"] for row in new])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --- afterwards: `study export tensorboard` ----------------------------------------------------------


def export(runs_dir: str | os.PathLike, out: str | os.PathLike, log: Callable[[str], None] = print) -> int:
    """Write `out/<run id>/` for every finished (`done` or `diverged`) run under `runs_dir` from its
    `metrics.parquet`: the points the live writer writes, and for `done` runs the hyper-parameters.
    A run exported before (or written live) is replaced: the new file purges the old points.
    A finished run whose metrics.parquet is unreadable or missing is left out with a note on stderr (it would
    export no points, and purge those of an earlier export), as is a run whose config.json is damaged.
    Returns the number of runs exported; ConfigError if there is none to export."""
    import pandas as pd

    from .runstore import FINAL_STATUSES, missing_runs_dir, readable_runs, unreadable_fix, unreadable_note, unreadable_reason

    require("study export tensorboard")
    runs, notes = readable_runs(runs_dir)
    for note in notes:  # runs left out, with what to do, as `study plot` leaves them out
        print(note, file=sys.stderr)
    if not runs and (missing := missing_runs_dir(runs_dir)) is not None:
        raise ConfigError(missing)
    if not runs:
        raise ConfigError(f"no runs in {runs_dir}; pass --runs-dir to the directory `study run` wrote")
    finished = [run for run in runs if run.status().get("status") in FINAL_STATUSES]
    if not finished:
        raise ConfigError(f"none of the {len(runs)} runs in {runs_dir} is finished; `study status --runs-dir "
                          f"{runs_dir}` shows where they stand")
    metrics = {}  # every run's rows read before anything is written
    for run in finished:
        status = run.status().get("status")
        try:
            metrics[run.cfg.run_id] = pd.read_parquet(run.metrics_path).to_dict("records")
        except FileNotFoundError:
            print(f"note: {run.metrics_path} is missing, so the run is left out: "
                  f"{unreadable_fix('metrics.parquet', status)}", file=sys.stderr)
        except (OSError, ValueError) as e:  # pyarrow's errors are ValueErrors
            print(f"note: {unreadable_note(run.metrics_path, unreadable_reason(e), whole_run=True)}", file=sys.stderr)
    if not metrics:
        raise ConfigError(f"none of the {len(finished)} finished runs in {runs_dir} has metrics that can be read (see "
                          "the notes above); mend them as the notes say, or pass --runs-dir to the runs you meant")
    check_dir(out, "--out")
    exported = [run for run in finished if run.cfg.run_id in metrics]
    for run in exported:
        rows = metrics[run.cfg.run_id]
        writer = open_writer(Path(out) / run.cfg.run_id, purge_step=1)
        try:
            write_rows(writer, rows)
            if run.status().get("status") == "done":
                write_hparams(writer, run.cfg, rows)
        finally:
            writer.close()
    skipped = len(runs) - len(finished)
    left_out = len(finished) - len(exported)
    log(f"exported {len(exported)} run(s) to {out}" + (f" ({skipped} unfinished skipped)" if skipped else "")
        + (f" ({left_out} left out: see the notes above)" if left_out else "")
        + f"; view them with: tensorboard --logdir {out}")
    return len(exported)
