"""`study publish`: finished runs' small files, copied out of a runs dir as evidence.

A published study (`results/<study>/` in this repository, or a folder a user shares) holds, for each
finished run, the files the analysis reads and nothing else: its config and provenance, metrics,
gradient norms, layer responses, status and 10-crop result where it has them (`SMALL_FILES`), never
its checkpoints or lock. Figures and the report are then drawn from the published copy by the usual
commands (`study plot all --runs-dir DIR`, `study report --runs-dir DIR`).

Only runs trained from a committed tree are published by default: a run whose config.json says its
git tree had uncommitted changes (or says nothing of it: trained outside a git checkout) cannot be
traced to a commit, so it is left out with a line saying why unless `allow_dirty`. (The tree is the
one the run's first session recorded.) Runs neither `done` nor `diverged`, and runs with no metrics,
are left out too. Every destination is checked before anything is copied; each run's folder is then
written whole or not at all: its files are copied into a hidden staging folder beside it, which is renamed
into place (over the old copy, where there was one), so a publish killed midway never leaves a run that
looks finished without its metrics. A published file the run no longer has (a stale tencrop.json, say)
goes with the old copy; other files a user put in the folder are kept. A killed publish's staging
folders are cleared by the next publish to the same folder (for any run), and two publishes to one folder
take turns.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .runstore import (
    FINAL_STATUSES,
    Run,
    RunStoreError,
    check_writable,
    dirty_tree,
    list_runs,
    missing_runs_dir,
    parquet_error,
    status_error,
    unreadable_fix,
    unreadable_note,
)

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


def _why_not(run: Run, allow_dirty: bool) -> str | None:
    """Why `run` is not published, or None."""
    from .launch import (
        run_status,  # `queued` for a run submitted to SLURM and not started since
    )

    status = run_status(run).get("status")
    if status == "unknown":
        why = status_error(run.dir) or "unknown"
        return f"its status.json is unreadable ({why}); {unreadable_fix('status.json', status, why)}"
    if status not in FINAL_STATUSES:
        return f"not finished ({status})"
    if not run.metrics_path.is_file():
        return "no metrics.parquet"
    for name in SMALL_FILES:  # a damaged file would be published as it is
        if name.endswith(".parquet") and (run.dir / name).is_file() and (why := parquet_error(run.dir / name)):
            return f"its {name} is unreadable ({why}); {unreadable_fix(name, status, why)}"
    if allow_dirty:
        return None
    try:
        dirty = dirty_tree(json.loads(run.config_path.read_text())["provenance"])  # in any session
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        dirty = None
    if dirty is not False:
        return ("trained from a tree with uncommitted changes" if dirty else "its config.json names no clean git tree "
                "(trained outside a git checkout?)") + "; train it from a clean checkout, or pass --allow-dirty"
    return None


def _check_destination(folder: Path) -> None:
    """RunStoreError if a run's files cannot go to `folder`: something other than a directory there
    (a file, a link) or in the way of one of its files."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise RunStoreError(f"{folder} is in the way of a run's published folder (not a directory); move it away, "
                            "or pass --out another directory")
    for name in SMALL_FILES:
        path = folder / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise RunStoreError(f"{path} is in the way of a published file (not a plain file); move it away, "
                                "or pass --out another directory")


#: The start of a run's staging folder's name (beside its published folder; hidden, so the analysis and
#: `list_runs` pass it over), and the end of the old copy's while it is swapped out. A staging folder is
#: `.publishing-<run id>.<8 random characters>`, its old copy the same with `.old`.
_STAGING, _OLD = ".publishing-", ".old"
_LEFTOVER = re.compile(re.escape(_STAGING) + r"(?P<run_id>.+)\.[a-z0-9]{8}(?P<old>" + re.escape(_OLD) + ")?")


def _same(run: Run, folder: Path) -> bool:
    """Whether `folder` already holds exactly `run`'s small files, byte for byte (and no stale one)."""
    return folder.is_dir() and all(
        (run.dir / name).is_file() == (folder / name).is_file()
        and (not (run.dir / name).is_file() or (run.dir / name).read_bytes() == (folder / name).read_bytes())
        for name in SMALL_FILES)


def _clear_leftovers(out: Path) -> None:
    """Remove what a killed publish left in `out`, for any run: staging folders, and old copies swapped out
    (one goes back into place where its run's folder is missing: the kill came between the two renames).
    Called under `_publishing`'s lock, so no other publish is midway."""
    for path in sorted(out.iterdir(), key=lambda p: p.name):  # a staging folder sorts before its `.old`
        if (m := _LEFTOVER.fullmatch(path.name)) is None or path.is_symlink() or not path.is_dir():
            continue
        if m["old"] and not (out / m["run_id"]).exists():
            os.rename(path, out / m["run_id"])
        else:
            shutil.rmtree(path)


@contextmanager
def _publishing(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on the `out` folder itself while publishing into it: two publishes to one
    folder take turns (no file is added to a published study for it)."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _staging_folder(folder: Path) -> Path:
    """A new, empty staging folder for `folder`, made by a plain mkdir: the umask, a default ACL and the
    parent's setgid bit give it the permissions and group a folder made there gets (mkdtemp's are 0700)."""
    for _ in range(100):
        stage = folder.with_name(f"{_STAGING}{folder.name}.{secrets.token_hex(4)}")
        try:
            stage.mkdir()
            return stage
        except FileExistsError:
            continue
    raise FileExistsError(f"no free staging folder name beside {folder}")


def _publish_run(run: Run, folder: Path) -> bool:
    """Write `run`'s small files to `folder` whole or not at all; False (nothing written) if it already
    holds them. The files are copied into a staging folder beside it (with anything of the user's in the
    old copy, links copied as links), which is renamed into place; an old copy is first renamed aside,
    then removed."""
    if _same(run, folder):
        return False
    stage = _staging_folder(folder)
    old = stage.with_name(stage.name + _OLD)
    try:
        for name in SMALL_FILES:
            if (run.dir / name).is_file():
                shutil.copyfile(run.dir / name, stage / name)
        if folder.is_dir():
            for path in folder.iterdir():  # what the user added (a note, say) stays with the run
                if path.name not in SMALL_FILES:
                    if path.is_dir() and not path.is_symlink():
                        shutil.copytree(path, stage / path.name, symlinks=True)
                    else:
                        shutil.copy2(path, stage / path.name, follow_symlinks=False)
            os.rename(folder, old)
        os.rename(stage, folder)
    except BaseException:
        if old.exists() and not folder.exists():
            os.rename(old, folder)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old.exists():
        shutil.rmtree(old)  # an error here is the command's one line; the next publish clears what is left
    return True


#: How `_nothing_to_publish` counts each reason a run is left out (by its start), and the fix it adds.
_REASONS = (("not finished", "not finished", "publish once they finish"),
            ("not started", "not started", "check --runs-dir and the --grid or --arch options"),
            ("trained from a tree", "trained from an uncommitted tree", "pass --allow-dirty"),
            ("its config.json names no clean", "with no clean git tree recorded", "pass --allow-dirty"),
            ("its config.json is unreadable", "with an unreadable config.json", None),
            ("its folder has no config.json", "with no config.json", None),
            ("its status.json is unreadable", "with an unreadable status.json", None),
            ("no metrics.parquet", "with no metrics.parquet", None))


def _nothing_to_publish(root: Path, left_out: dict[str, str], unreadable: list[str]) -> str:
    """The one line for a publish that would copy nothing: why, counted by reason, and the fixes."""
    if not left_out:
        folders = (f" ({len(unreadable)} folder(s) with no readable config.json: `study status --runs-dir {root}` "
                   "says why)" if unreadable else "")
        return f"nothing to publish: no runs in {root}{folders}; pass --runs-dir to where your finished runs are"
    counts: dict[str, int] = {}
    fixes: list[str] = []
    for why in left_out.values():
        label, fix = next(((label, fix) for start, label, fix in _REASONS if why.startswith(start)), (why, None))
        counts[label] = counts.get(label, 0) + 1
        if fix and fix not in fixes:
            fixes.append(fix)
    counted = ", ".join(f"{n} {label}" for label, n in counts.items())
    return (f"nothing to publish from {root}: of {len(left_out)} run(s), {counted}; "
            + (", or ".join(fixes) if fixes else "`study status` shows where each run stands"))


def publish(runs_dir: str | os.PathLike, out: str | os.PathLike, *, run_ids: Iterable[str] | None = None,
            allow_dirty: bool = False, log: Callable[[str], None] = print) -> Published:
    """Copy the small files (`SMALL_FILES`) of every finished run under `runs_dir` (or of those
    `run_ids` name) to `out/<run id>/`; one line through `log` for each run left out and one for the
    whole. RunStoreError (before anything is written) if there is nothing to publish (no runs, or none of
    them finished and clean), if `runs_dir` does not exist, `out` is in it or
    cannot be written, or something is in the way of a run's published files."""
    root, out = Path(runs_dir), Path(out)
    if (missing := missing_runs_dir(root)) is not None:
        raise RunStoreError(missing)
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise RunStoreError(f"--out {out} is inside the runs dir {root}; pass --out a directory outside it")
    damaged: list[tuple[str, str]] = []  # (config.json, why) of the folders whose config.json cannot be read
    runs = {run.cfg.run_id: run for run in list_runs(root, damaged)}
    damaged_why = {Path(path).parent.name: why for path, why in damaged}
    wanted = list(runs) if run_ids is None else list(dict.fromkeys(run_ids))
    done = Published()
    chosen = []
    for run_id in wanted:
        run = runs.get(run_id)
        if run is None:
            why = (f"its config.json is unreadable ({damaged_why[run_id]}): "
                   f"{unreadable_fix('config.json', reason=damaged_why[run_id])}" if run_id in damaged_why
                   else "its folder has no config.json" if (root / run_id).is_dir() else "not started")
        else:
            why = _why_not(run, allow_dirty)
        if why is not None:
            done.left_out[run_id] = why
        else:
            chosen.append(run)
    # Folders of runs that cannot be read: a damaged config.json, or none beside a status.json (deleted?).
    unreadable = sorted(set(damaged_why) | {p.parent.name for p in root.glob("*/status.json") if p.parent.name not in runs})
    if not chosen:  # a wrong --runs-dir or --grid, runs still training, dirty runs: say so, and write nothing
        raise RunStoreError(_nothing_to_publish(root, done.left_out, unreadable if run_ids is None else []))
    for run in chosen:
        _check_destination(out / run.cfg.run_id)
    check_writable(out, "--out", "--out")
    for run_id, why in done.left_out.items():  # said once nothing can stop the copying for bad input
        log(f"{run_id}: left out: {why}")
    if run_ids is None:
        for path, why in damaged:  # as the other commands note them
            log(f"note: {unreadable_note(path, why)}")
        if missing := [name for name in unreadable if name not in damaged_why]:
            log(f"left out {len(missing)} folder(s) with a status.json but no config.json: {', '.join(missing)}; "
                "copy it again if the run trained elsewhere")
    try:
        with _publishing(out):
            _clear_leftovers(out)
            for run in chosen:
                (done.copied if _publish_run(run, out / run.cfg.run_id) else done.unchanged).append(run.cfg.run_id)
    except OSError as e:
        raise RunStoreError(f"could not publish to {out} ({e.strerror or e}); free space or fix its permissions, "
                            "and run the same command again") from None
    log(f"published {len(done.copied)} run(s) to {out}" + (f", {len(done.unchanged)} already there unchanged"
                                                           if done.unchanged else "")
        + (f"; {len(done.left_out)} left out" if done.left_out else ""))
    return done
