"""`study publish`: finished runs' small files, copied out of a runs dir as evidence.

A published study (`results/<study>/` in this repository, or a folder a user shares) holds, for each
finished run, the files the analysis reads and nothing else: its config and provenance, metrics,
gradient norms, layer responses, status and 10-crop result where it has them (`SMALL_FILES`), never
its checkpoints or lock. Figures and the report are then drawn from the published copy by the usual
commands (`study plot all --runs-dir DIR`, `study report --runs-dir DIR`).

Only runs trained from a committed tree are published by default: a run whose config.json says its
git tree had uncommitted changes (or says nothing of it) cannot be traced to a commit, so it is left
out with a line saying why unless `allow_dirty`. Runs not finished (`done` or `diverged`) are left
out too. Each file is written whole or not at all (a temporary file, renamed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .runstore import FINAL_STATUSES, Run, RunStoreError, list_runs

#: What a finished run publishes: everything the analysis reads, nothing it does not (no checkpoints).
SMALL_FILES = ("config.json", "status.json", "metrics.parquet", "gradients.parquet", "responses.parquet",
               "tencrop.json")


@dataclass
class Published:
    """What `publish` did: runs copied (new or changed files), runs already there unchanged, and
    runs left out with the reason."""

    copied: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)


def check_out_dir(out: Path) -> None:
    """Create `out` if needed and prove a file can be written there; RunStoreError naming the fix."""
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise RunStoreError(f"--out {out}: {blocker} is a file, not a directory; pass --out a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise RunStoreError(f"--out {out} is not writable ({e.strerror or e}); pass --out a directory you can write") from None


def _why_not(run: Run, allow_dirty: bool) -> str | None:
    """Why `run` is not published, or None."""
    status = run.status().get("status")
    if status not in FINAL_STATUSES:
        return f"not finished ({status})"
    if allow_dirty:
        return None
    try:
        dirty = json.loads(run.config_path.read_text())["provenance"].get("git_dirty")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        dirty = None
    if dirty is not False:
        return ("trained from a tree with uncommitted changes" if dirty else "its config.json names no clean git tree"
                ) + "; train it from a clean checkout, or pass --allow-dirty"
    return None


def _copy(src: Path, dst: Path) -> bool:
    """Copy `src` to `dst` atomically; False (and nothing written) if `dst` already holds the same bytes."""
    if dst.exists() and dst.read_bytes() == src.read_bytes():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def publish(runs_dir: str | os.PathLike, out: str | os.PathLike, *, run_ids: Iterable[str] | None = None,
            allow_dirty: bool = False, log: Callable[[str], None] = print) -> Published:
    """Copy the small files (`SMALL_FILES`) of every finished run under `runs_dir` (or of those
    `run_ids` name) to `out/<run id>/`; one line through `log` for each run left out and one for the
    whole. RunStoreError if `runs_dir` does not exist or `out` cannot be written."""
    root, out = Path(runs_dir), Path(out)
    if not root.is_dir():
        raise RunStoreError(f"runs dir {root} does not exist; pass --runs-dir to where your runs are")
    if out.resolve() == root.resolve():
        raise RunStoreError(f"--out {out} is the runs dir itself; pass --out another directory")
    check_out_dir(out)
    runs = {run.cfg.run_id: run for run in list_runs(root)}
    wanted = list(runs) if run_ids is None else list(run_ids)
    done = Published()
    for run_id in wanted:
        run = runs.get(run_id)
        why = "not started" if run is None else _why_not(run, allow_dirty)
        if why is not None:
            done.left_out[run_id] = why
            log(f"{run_id}: left out: {why}")
            continue
        changed = [_copy(run.dir / name, out / run_id / name) for name in SMALL_FILES if (run.dir / name).is_file()]
        (done.copied if any(changed) else done.unchanged).append(run_id)
    log(f"published {len(done.copied)} run(s) to {out}" + (f", {len(done.unchanged)} already there unchanged"
                                                           if done.unchanged else "")
        + (f"; {len(done.left_out)} left out" if done.left_out else ""))
    return done
