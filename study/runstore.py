"""A run directory: `config.json`, `metrics.parquet`, `checkpoint.pt`, `status.json`.

Every file is written to a temporary name in the same directory and renamed into place, so a kill at
any moment leaves either the old or the new version, never a truncated one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch

from .config import RunConfig

METRIC_COLUMNS = [
    "run_id",
    "dataset",
    "arch",
    "depth",
    "shortcut",
    "seed",
    "epoch",
    "iteration",
    "split",
    "loss",
    "error_pct",
    "lr",
    "elapsed_s",
    "warmup_s",
]
#: Columns some runs add after METRIC_COLUMNS: ImageNet runs log top-5 error on their `val` rows.
OPTIONAL_METRIC_COLUMNS = ["top5_error_pct"]
STATUSES = ("running", "done", "failed", "interrupted", "diverged")
# A run in one of these states is not trained again: `diverged` is deterministic for its seed.
FINAL_STATUSES = ("done", "diverged")


class RunStoreError(RuntimeError):
    """A problem with the runs directory. str(e) is one line naming the problem and the fix."""


_UMASK = os.umask(0o022)  # read the process's umask (setting it is the only way) ...
os.umask(_UMASK)  # ... and put it back


def _temporary(directory: Path, prefix: str) -> str:
    """An empty temporary file in `directory`, with the permissions a plainly created file gets
    (mkstemp's are 0600, which would keep a shared runs dir's files from the rest of a group)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return tmp


def fsync(path: str | os.PathLike) -> None:
    """Flush `path` (a file, or a folder: its entries, a rename's) to the disk, so that what was written
    survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def fsync_fd(fd: int) -> None:
    """`os.fsync(fd)`, where a file system that cannot sync (EINVAL, ENOTSUP) is no error: nothing more to do."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(tmp_path)` then rename the temporary file onto `path` (same directory, so the
    rename is atomic on POSIX); the file reaches the disk before the rename, and the rename after it,
    so a power loss leaves the old file or the new one, whole."""
    tmp = _temporary(path.parent, f".{path.name}.")
    try:
        write(Path(tmp))
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def missing_runs_dir(runs_dir: str | os.PathLike) -> str | None:
    """The one line saying why `runs_dir` cannot hold runs (not there, or not a folder), with the fix;
    None when it is a directory. (An empty folder is the caller's "no runs in" case.)"""
    path = Path(runs_dir)
    if path.is_dir():
        return None
    if path.exists():
        return f"--runs-dir {runs_dir} is not a directory; pass --runs-dir to the folder that holds your runs"
    return f"runs dir {runs_dir} does not exist; pass --runs-dir to where your runs are"


def no_checkpoint(run: "Run", then: str, runs_dir_option: str = "--runs-dir") -> str:
    """The one line saying why `run` has no checkpoint to read, and the fix; `then` is what to do with it
    once it has one (`probe it`); `runs_dir_option`, how the caller names the runs dir (`runs_dir=` in Python).
    A finished run without one is a published copy (`study publish` copies
    no weights, nor the lock a runs dir's run has) or a run whose checkpoint was deleted."""
    status = run.status().get("status")
    if status not in FINAL_STATUSES:
        return f"run {run.cfg.run_id} has no checkpoint yet (no epoch finished); {then} once it has trained an epoch"
    if run.checkpoint_path.exists():  # there, but it does not read (a finished run's weights are in it)
        return (f"run {run.cfg.run_id} is {status} but its checkpoint is unreadable (damaged: "
                f"{run.checkpoint_path.name}); move its folder out of the runs dir and run the same `study run` to "
                "train it again")
    if not (run.dir / "lock").exists() and not run.previous_checkpoint_path.exists():
        return (f"run {run.cfg.run_id} in {run.dir.parent} is a published copy, which carries no weights (`study "
                f"publish` copies none); point {runs_dir_option} at the runs dir that trained it")
    return (f"run {run.cfg.run_id} is {status} but its checkpoint is gone (deleted?); move its folder out of the runs "
            "dir and run the same `study run` to train it again")


def _reason(e: Exception) -> str:
    """An exception as a short reason for a one-line message: its type and the gist of its message."""
    return f"{type(e).__name__}: {unreadable_reason(e)}" if str(e).strip() else type(e).__name__


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file that keeps `folder` from being a directory (`folder` itself, or the nearest of its parents
    that exists, where that is not a directory); None if there is none."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return blocker if blocker is not None and not blocker.is_dir() else None


def check_not_in_a_run(runs_dir: str | os.PathLike) -> None:
    """RunStoreError if `runs_dir` is a run's own folder or lies inside one (a --runs-dir one level
    too deep): its runs would nest among that run's files, where no command looks for them."""
    folder = Path(runs_dir).resolve()  # `..` collapsed and links followed: the folder the runs would go to
    for place in (folder, *folder.parents):
        record, _ = read_config(place / "config.json") if (place / "config.json").is_file() else (None, None)
        try:
            run_id = RunConfig.from_dict(record["config"]).run_id if record is not None else None
        except (KeyError, TypeError, ValueError):  # another tool's config: not a run of ours
            continue
        if run_id == place.name:
            raise RunStoreError(f"runs dir {runs_dir} is {'' if place == folder else 'inside '}the folder of run "
                                f"{run_id}; pass --runs-dir {place.parent}, the folder that holds its runs")


def unwritable(path: str | os.PathLike) -> str | None:
    """Why a file could not be written at `path`, found without creating or changing anything: a folder
    (or something else that is no plain file) already there, a file where one of its folders would go, or
    a folder (the nearest that exists) or existing file that takes no writing; None where nothing is in the way."""
    path = Path(path)
    if path.exists() and not path.is_file():
        return f"{path} is {'a directory' if path.is_dir() else 'not a plain file'}"
    if (blocker := file_in_the_way(path.parent)) is not None:
        return f"{blocker} is a file, not a directory"
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
        if path.exists():
            open(path, "ab").close()  # opened to append, nothing written: its bytes and times stay as they are
    except OSError as e:
        reason = ("its file system accepts no new files" if e.errno == errno.ENOENT and folder.is_dir()
                  else e.strerror or e)
        return f"{path if path.exists() else folder} is not writable ({reason})"
    return None


def folders_made_by(folder: str | os.PathLike) -> list[Path]:
    """The folders that creating `folder` (as `check_writable` does) would make, deepest first: those to
    remove again where the command then fails, so that it leaves nothing behind."""
    folder = Path(folder)
    return [p for p in (folder, *folder.parents) if not p.exists()]


#: What `check_writable` writes to prove there is room: a run's first files (config.json, status.json, its
#: first metrics) take a few KiB.
SPACE_PROBE_BYTES = 64 * 1024


def check_writable(runs_dir: Path, flag: str | None = "--runs-dir", what: str = "runs dir") -> None:
    """Create `runs_dir` if needed and prove a file can be written there; RunStoreError naming the fix
    (the option `flag` that names another folder, None where there is none; the folder called `what`)
    otherwise. (A real write, not os.access: root passes access checks on read-only mounts.)"""
    if (blocker := file_in_the_way(runs_dir)) is not None:
        raise RunStoreError(f"{what} {runs_dir}: {blocker} is a file, not a directory; pass {flag} to a directory")
    made = folders_made_by(runs_dir)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=runs_dir) as probe:
            # Some bytes written through to the disk: a full disk (or quota) takes an empty file, not a run's files.
            probe.write(bytes(SPACE_PROBE_BYTES))
            probe.flush()
            fsync_fd(probe.fileno())
    except OSError as e:
        for folder in made:  # nothing left behind: the folders this call made go again
            with contextlib.suppress(OSError):
                folder.rmdir()
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunStoreError(f"{what} {runs_dir} has no space left ({e.strerror}); free some space there"
                                + (f" or pass {flag} to another disk" if flag else "")) from None
        # A folder that exists yet "has no such file" for a new one is a file system that makes none (/proc).
        reason = ("its file system accepts no new files" if e.errno == errno.ENOENT and runs_dir.is_dir()
                  else e.strerror or e)
        raise RunStoreError(f"{what} {runs_dir} is not writable ({reason}); "
                            + (f"pass {flag} to a directory you can write" if flag else "make it writable")) from None


def check_run_folders(runs: "Iterable[Run]") -> None:
    """RunStoreError (one line, naming the run and the fix) for the first run whose folder cannot be
    written (a read-only mount, a folder another user owns, a `lock` that is no file), found without
    writing anything: a run takes its lock and writes its status there before anything else."""
    for run in runs:
        for name in ("lock", "status.json"):
            if (why := unwritable(run.dir / name)) is not None:
                raise RunStoreError(f"run {run.cfg.run_id} cannot be written: {why}; make its folder writable, "
                                    "or move it out of the runs dir to start the run over")


def _git(*args: str) -> str | None:
    """`git ARGS` run in the package's directory: its output, or None (no git, not a checkout)."""
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def tree_is_dirty() -> bool | None:
    """Whether tracked files of the package's checkout differ from its commit (None: not a checkout)."""
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", str(Path(__file__).resolve().parents[1]))
    return None if changed is None else bool(changed.strip())


def publishing_from_a_dirty_tree(runs_dir: str | os.PathLike) -> str | None:
    """One line if `runs_dir` is under this checkout's `results/` (published evidence) and the tree
    has uncommitted changes to tracked files: the runs would not say exactly what trained them."""
    top = (_git("rev-parse", "--show-toplevel") or "").strip()
    if not top or not Path(runs_dir).resolve().is_relative_to(Path(top).resolve() / "results") or not tree_is_dirty():
        return None
    return (f"note: {runs_dir} is published evidence, but this checkout has uncommitted changes to tracked files: "
            "the runs' config.json will say git_dirty; commit them first (or train from a clean `git worktree`)")


#: The reason `unreadable_reason` and `read_config` give for a file this user may not read: the file is
#: whole, so the fix is its permissions, not a new copy (`unreadable_fix`).
PERMISSION_DENIED = "permission denied"


def unreadable_reason(error: Exception) -> str:
    """The gist of a Parquet reader's error, without the path it repeats ("Parquet magic bytes not found
    in footer"); PERMISSION_DENIED for a file this user may not read."""
    if isinstance(error, PermissionError):
        return PERMISSION_DENIED
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.rsplit("': ", 1)[-1].split(". ")[0].rstrip(".")


def unreadable_fix(name: str, status: str | None = None, reason: str | None = None) -> str:
    """What to do about a run's unreadable file `name` (a Parquet file, or its config.json), the run's
    status being `status` and why it is unreadable `reason` (`unreadable_reason`, `read_config`)."""
    if reason == PERMISSION_DENIED:  # the file may be whole: copying or training again would be the wrong fix
        return "let this user read it (see its owner and mode with `ls -l`), then run the command again"
    if name == "config.json":  # nothing else records the run's settings; `study run` refuses the folder as it is
        return ("copy it again if the run trained elsewhere, or move the run's folder out of the runs dir and train "
                "it again")
    if name == "metrics.parquet" and status == "diverged":  # its last rows were never checkpointed
        return ("a diverged run's last rows are in no checkpoint: copy the file again if the run trained elsewhere, "
                "or move the run away and train it again")
    if name == "metrics.parquet":
        return "run the run's `study run` command again, which rewrites its metrics from its checkpoint"
    if name == "responses.parquet":
        return "`study probe` the run again"
    if name == "status.json":  # its checkpoint says where the run stands
        return "run the run's `study run` command again, which rewrites it from its checkpoint"
    return ("a diagnostic (claim 2's gradient check): copy it again if the run trained elsewhere, or delete it and "
            "the run goes without it")


def unreadable_note(path: str | os.PathLike, reason: str, *, whole_run: bool = False) -> str:
    """One line for an unreadable file of a run: what it is, what is left out (the file's rows; for a
    config.json, or where the caller leaves the run out for it (`whole_run`), the run), and the fix
    (`unreadable_fix`)."""
    status = (read_json(Path(path).parent / "status.json")[0] or {}).get("status")
    name = Path(path).name
    left_out = ("the run is left out" if name == "config.json" or whole_run
                else "the run counts as unfinished (status unknown)" if name == "status.json" else "its rows are left out")
    return f"{path} is unreadable ({reason}), so {left_out}: {unreadable_fix(name, status, reason)}"


def read_json(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """A run's JSON file (config.json, status.json) at `path`: (its object, None), or (None, why it cannot be
    read: PERMISSION_DENIED, the OS's reason (missing, say), empty, not JSON, not UTF-8, not an object)."""
    try:
        text = Path(path).read_text()
        record = json.loads(text)
    except PermissionError:
        return None, PERMISSION_DENIED
    except OSError as e:
        return None, str(e.strerror or e)
    except json.JSONDecodeError as e:
        return None, "it is empty" if not text.strip() else f"not JSON: {e.msg} (line {e.lineno}, column {e.colno})"
    except ValueError:  # not UTF-8 text
        return None, "not UTF-8 text"
    if not isinstance(record, dict):
        kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(record), "a number")
        return None, f"it holds {kind}, not a JSON object"
    return record, None


def read_config(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """A run's config.json at `path`: (its record, None), or (None, why it is damaged): not readable, not
    JSON (`read_json`), or no JSON object with a `config` object in it (every config.json `Run.prepare` writes
    has one). Its values are not checked: a run written by another tool may hold settings `RunConfig` does
    not know."""
    record, why = read_json(path)
    if record is not None and not isinstance(record.get("config"), dict):
        return None, "it holds no run config (no `config` object)"
    return record, why


def status_error(run_dir: str | os.PathLike) -> str | None:
    """Why the run's status.json in `run_dir` cannot be read (`read_json`), or None where it reads or is not
    there (a run never started)."""
    path = Path(run_dir) / "status.json"
    return read_json(path)[1] if path.exists() else None


def refuse_damaged(unreadable: list[tuple[str, str]], run_ids: Iterable[str]) -> None:
    """RunStoreError (one line, with the fix) for the first of `run_ids` (runs asked for by name) whose
    config.json `list_runs` put in `unreadable`: that run cannot be read, which "unknown run id" would not say."""
    damaged = {Path(path).parent.name: (path, why) for path, why in unreadable if Path(path).name == "config.json"}
    for run_id in run_ids:
        if run_id in damaged:
            raise RunStoreError(damaged_config(*damaged[run_id]))


def damaged_config(path: str | os.PathLike, why: str) -> str:
    """The one line for a run asked for by name whose config.json at `path` is damaged (`read_config`'s `why`)."""
    return f"{path} is unreadable ({why}), so run {Path(path).parent.name} cannot be read: {unreadable_fix('config.json', reason=why)}"


def readable_runs(runs_dir: str | os.PathLike, named: Iterable[str] = ()) -> tuple[list["Run"], list[str]]:
    """`list_runs`, and a `note:` line for each run left out for a damaged config.json (`unreadable_note`),
    for the caller to print as the analysis commands print theirs; RunStoreError (`refuse_damaged`) where
    one of the runs asked for by name (`named`) is such a run."""
    damaged: list[tuple[str, str]] = []
    runs = list_runs(runs_dir, damaged)
    refuse_damaged(damaged, named)
    return runs, [f"note: {unreadable_note(path, why)}" for path, why in damaged]


def parquet_error(path: str | os.PathLike) -> str | None:
    """Why the Parquet file at `path` cannot be read (`unreadable_reason`), or None where it reads."""
    try:
        pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's errors are ValueErrors
        return unreadable_reason(e)
    return None


#: `study status` and a run's epoch lines time its steps over its last this-many logged epochs (all of them
#: where it has fewer): the speed it trains at now, not an average dragged by an earlier session on busier cores.
RECENT_EPOCHS = 5


def recent_speed(metrics: pd.DataFrame) -> tuple[float, int] | None:
    """A run's training seconds over its last RECENT_EPOCHS logged epochs, or since its start where it has
    no more (its one-time costs, compiling, left out), and the iterations they trained, from its metrics;
    None before its first epoch (or where no time was recorded)."""
    if metrics.empty or "elapsed_s" not in metrics or not (metrics["iteration"] > 0).any():
        return None
    logged = metrics[metrics["iteration"] > 0].assign(
        onetime=metrics["warmup_s"].fillna(0.0) if "warmup_s" in metrics else 0.0)
    clock = logged.groupby("iteration")[["elapsed_s", "onetime"]].max().sort_index()  # an epoch's rows: its end
    if clock["elapsed_s"].iloc[-1] != clock["elapsed_s"].iloc[-1]:  # NaN: written by a tool that keeps no clock
        return None
    clock = clock.dropna(subset=["elapsed_s"])  # the window counts epochs whose clock was kept
    end, trained = clock.iloc[-1], int(clock.index[-1])
    if len(clock) <= RECENT_EPOCHS:
        return max(float(end["elapsed_s"] - end["onetime"]), 0.0), trained
    start = clock.iloc[-1 - RECENT_EPOCHS]
    seconds = float((end["elapsed_s"] - start["elapsed_s"]) - (end["onetime"] - start["onetime"]))
    return max(seconds, 0.0), trained - int(clock.index[-1 - RECENT_EPOCHS])


def duration(seconds: float) -> str:
    """A run's length as `study status` and `study run` write it: 12s, 42m, 3h05m."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes}m" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The CPU flags that decide which fast paths a CPU has (Linux's names in /proc/cpuinfo).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
#: Those of them that are bf16 matrix units (oneDNN runs bf16 autocast on them), by the names notes give them.
BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX-512 BF16"}


def bf16_unit_names(flags: Iterable[str]) -> list[str]:
    """The bf16 matrix units among CPU `flags` (Linux's names), by the names notes give them."""
    present = set(flags)
    return [name for flag, name in BF16_FLAGS.items() if flag in present]


def cpu_flags() -> dict[str, bool]:
    """Which of CPU_FLAGS the CPU reports (Linux's /proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return {}
    words = set(line.split(":", 1)[-1].split())
    return {flag: flag in words for flag in CPU_FLAGS} if words else {}


def cpu_label(prov: dict) -> str | None:
    """A run's CPU as a page names it: the model, and the kernels torch ran on it where recorded
    ("AMD EPYC (AVX2)"); runs written before cpu_capability was recorded give the model alone."""
    cpu = prov.get("cpu")
    capability = prov.get("cpu_capability")
    if not cpu:
        return None
    units = bf16_unit_names(prov.get("cpu_flags") or [])
    # torch's "DEFAULT" (no vector extension it dispatches to, as on an ARM CPU) says nothing worth a label.
    detail = ", ".join([capability] * (capability not in (None, "DEFAULT")) + units)
    return f"{cpu} ({detail})" if detail else cpu


def this_cpu_label() -> str | None:
    """This machine's CPU as `cpu_label` names a run's."""
    flags = cpu_flags()
    return cpu_label({"cpu": cpu_model(), "cpu_flags": [f for f, on in flags.items() if on] if flags else None,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()})


def sessions(prov: dict) -> list[dict]:
    """A run's sessions, from its config.json's provenance: the first session's record, then the record
    of each session that resumed it (`resumed`: each with `from_iteration`, the checkpoint it resumed
    from). A run resumed on another machine, with another torch or from another commit says so there."""
    later = prov.get("resumed")
    return [prov, *(s for s in later if isinstance(s, dict))] if isinstance(later, list) else [prov]


#: What a run's numbers depend on besides its config and seed, as its sessions record them: a resume
#: that changes one of them goes on, but is no longer bit-identical to an uninterrupted run.
EXACT_WITHIN = (("device", "device"), ("device_name", "device"), ("cpu", "CPU"), ("cpu_capability", "CPU kernels"),
                ("threads", "threads"), ("processes", "processes"), ("step", "training step"),
                ("fp32_math", "fp32 convolutions"),
                ("torch_version", "torch"))


def resumed_elsewhere(last: dict, now: dict) -> str | None:
    """What in session record `now` differs from `last` in `EXACT_WITHIN` ("threads 1 -> 2, torch
    2.14.1 -> 2.11.0"), or None; a value the last record lacks (a run begun before it was recorded) is
    not a difference, nor, on a GPU, the host's CPU and thread count."""
    on_gpu = not str(now.get("device", "cpu")).startswith("cpu")  # the host's CPU and threads do not count there
    changed = [f"{label} {last[key]} -> {now.get(key)}" for key, label in EXACT_WITHIN
               if last.get(key) is not None and now.get(key) != last[key]
               and not (on_gpu and key in ("cpu", "cpu_capability", "threads"))]
    return ", ".join(dict.fromkeys(changed)) or None


class Machine(NamedTuple):
    """Where a session trained: `kind` "cpu" (`name` its `cpu_label`; `bf16` whether it has bf16 units,
    None where its flags were not recorded) or a device type ("cuda": `name` the device's name)."""

    kind: str
    name: str
    bf16: bool | None = None


def machine(prov: dict) -> Machine | None:
    """Where one session trained, from its provenance record; None where it recorded no machine."""
    device = str(prov.get("device") or "")
    if device.startswith("cpu"):
        flags = prov.get("cpu_flags")
        units = bool(bf16_unit_names(flags)) if isinstance(flags, list) else None
        return Machine("cpu", label, units) if (label := cpu_label(prov)) else None
    return Machine(device.split(":")[0], str(prov["device_name"])) if device and prov.get("device_name") else None


def dirty_tree(prov: dict) -> bool | None:
    """Whether a run trained, in any session, from a tree with uncommitted changes to tracked files: True
    if some session did, False if every session recorded a clean tree, else None (unknown)."""
    flags = [s.get("git_dirty") for s in sessions(prov)]
    return True if True in flags else False if all(f is False for f in flags) else None


def trained_on(run_dir: str | os.PathLike) -> set[Machine]:
    """Where a run trained, every session (`machine`), from its config.json; empty where it recorded
    no machine (or there is no config.json)."""
    try:
        prov = json.loads((Path(run_dir) / "config.json").read_text())["provenance"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {m for s in sessions(prov) if (m := machine(s)) is not None}


def provenance(device: str) -> dict:
    """Where and with what a run was produced."""
    from . import __version__

    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    # Tracked files that differ from that commit: the commit alone does not say what ran.
    dirty = tree_is_dirty()
    return {
        "package_version": __version__,
        "git_commit": commit,
        "git_dirty": None if commit is None else dirty,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
        # CPU results are exact for a given CPU model, torch and thread count (not across CPUs). The
        # model name alone may not tell two CPUs apart ("AMD EPYC" with AVX2 only, or with AVX-512 and
        # bf16 units): the fast-path flags it reports, and the kernels torch chose for it, say which.
        "cpu": cpu_model(),
        # None where the flags cannot be read (no /proc/cpuinfo), [] on a CPU with none of them.
        "cpu_flags": [flag for flag, on in flags.items() if on] if (flags := cpu_flags()) else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the instruction set its kernels dispatch to
        "threads": torch.get_num_threads(),
        "hostname": platform.node(),
    }


class Run:
    """Files of one run under `runs_dir / cfg.run_id`."""

    def __init__(self, runs_dir: str | os.PathLike, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.dir = Path(runs_dir) / cfg.run_id
        self.config_path = self.dir / "config.json"
        self.metrics_path = self.dir / "metrics.parquet"
        self.checkpoint_path = self.dir / "checkpoint.pt"
        self.status_path = self.dir / "status.json"

    # --- status -----------------------------------------------------------------------------
    def status(self) -> dict:
        """The run's status record; `{"status": "new"}` for a run never started, `{"status": "unknown"}` for
        one whose status.json cannot be read as a record (damaged: not UTF-8, not JSON, not an object)."""
        if not self.status_path.exists() and not self.status_path.is_symlink():
            return {"status": "new"}
        record, _ = read_json(self.status_path)
        return record if record is not None else {"status": "unknown"}

    def set_status(self, status: str, **extra: Any) -> None:
        """Replace `status.json` atomically. Where that cannot be done for want of space (a full
        disk: the temporary file gets no block), the record is written over the old one in place,
        into the block it already has: a status is a few hundred bytes, so a run that fails on a
        full disk still says so."""
        assert status in STATUSES, status
        record = {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        text = json.dumps(record, indent=1) + "\n"
        try:
            atomic_write_text(self.status_path, text)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not self.status_path.exists():
                raise
            with open(self.status_path, "r+", encoding="utf-8") as f:
                f.write(text)
                f.truncate()

    # --- config -----------------------------------------------------------------------------
    def prepare(self, device: str, *, anew: bool = False, **provenance_extra: Any) -> None:
        """Create the directory and write `config.json`, or check that an existing one matches.
        `provenance_extra` (e.g. the DDP process count) joins the provenance record. A run that
        kept no checkpoint starts over, so its record is written anew for this session; `anew`: so
        is that of a run whose checkpoints are all unreadable."""
        self.check_no_conflict()
        if self.config_path.exists() and self.has_checkpoint() and not anew:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        record = {"run_id": self.cfg.run_id, "config": self.cfg.to_dict(), "provenance": {**provenance(device), **provenance_extra}}
        atomic_write_text(self.config_path, json.dumps(record, indent=1) + "\n")

    def record_resume(self, device: str, iteration: int, **provenance_extra: Any) -> str | None:
        """Add this session, resuming the run from its checkpoint at `iteration`, to config.json's
        provenance (`resumed`, see `sessions`): where, with what and from which commit it trains now.
        Returns what in it differs from the last session's record in what the numbers depend on
        (`resumed_elsewhere`), or None."""
        record = json.loads(self.config_path.read_text())
        session = {"from_iteration": iteration, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   **provenance(device), **provenance_extra}
        if not isinstance(record.get("provenance"), dict):  # a config.json written by another tool
            record["provenance"] = {}
        last = sessions(record["provenance"])[-1]
        if not isinstance(record["provenance"].get("resumed"), list):
            record["provenance"]["resumed"] = []
        record["provenance"]["resumed"].append(session)
        atomic_write_text(self.config_path, json.dumps(record, indent=1) + "\n")
        return resumed_elsewhere(last, session)

    def recorded_cpu_path(self) -> str | None:
        """The CPU path (`study.train.cpupath`) the run recorded, if any (its first session's, or that of
        the first session on a CPU, which each later one kept); a CPU run begun before paths were recorded
        trained eager NCHW (compiled if its step says so)."""
        try:
            prov = json.loads(self.config_path.read_text())["provenance"]
            # The latest session that chose one: a run begun on a GPU chose its path when first resumed on a CPU.
            if chosen := [s["cpu_path"] for s in sessions(prov) if isinstance(s.get("cpu_path"), dict)]:
                return str(chosen[-1]["name"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if str(prov.get("device", "")).startswith("cpu"):
            return "compiled" if prov.get("step") == "compiled" else "eager"
        return None

    # --- metrics ----------------------------------------------------------------------------
    def read_metrics(self) -> pd.DataFrame:
        """The run's metrics; an empty frame if there are none (or the file is unreadable)."""
        try:
            return pd.read_parquet(self.metrics_path)
        except (FileNotFoundError, OSError, ValueError):
            return pd.DataFrame(columns=METRIC_COLUMNS)

    def repair_metrics(self) -> str | None:
        """Rebuild a finished run's metrics.parquet from its final checkpoint (which holds every row) where
        the file is missing or unreadable; one line saying what was done (or, for a diverged run, whose last
        rows no checkpoint holds, what to do), or None where the file reads. Call while holding the run's lock."""
        if self.metrics_path.exists() and (why := parquet_error(self.metrics_path)) is None:
            return None
        problem = f"is unreadable ({why})" if self.metrics_path.exists() else "is missing"
        if (status := self.status().get("status")) != "done":
            return (f"{self.cfg.run_id}: its metrics.parquet {problem}: "
                    f"{unreadable_fix('metrics.parquet', status, why if self.metrics_path.exists() else None)}")
        state = self.load_checkpoint()
        if state is None or state.get("iteration") != self.status().get("iteration") or not state.get("metrics"):
            return (f"{self.cfg.run_id}: its metrics.parquet {problem}, and no checkpoint of its last iteration holds "
                    f"its rows: move {self.dir} away and train it again")
        self.write_metrics(list(state["metrics"]))
        return f"{self.cfg.run_id}: its metrics.parquet {problem}: rewritten from its checkpoint"

    def write_metrics(self, rows: list[dict]) -> None:
        """Write all of the run's rows (Parquet has no append; a run has a few hundred rows, and
        the checkpoint holds the same rows, so this file can always be rebuilt from it)."""
        extra = [c for c in OPTIONAL_METRIC_COLUMNS if any(c in r for r in rows)]
        df = pd.DataFrame(rows, columns=METRIC_COLUMNS + extra)
        atomic_write(self.metrics_path, lambda p: df.to_parquet(p, index=False))

    # --- checkpoint -------------------------------------------------------------------------
    @property
    def previous_checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.prev.pt"

    def has_checkpoint(self) -> bool:
        """Whether the run kept a checkpoint to resume from (readable or not)."""
        return self.checkpoint_path.exists() or self.previous_checkpoint_path.exists()

    def save_checkpoint(self, state: dict) -> None:
        """Write the new checkpoint beside the old one, keep the old one as `checkpoint.prev.pt`
        (the fallback if the new one is ever unreadable), then move the new one into place. It is
        serialized in memory (for a moment, host memory for the weights and momenta once more: about 0.15 GB
        for ResNet-1202) and written by Python, so a full disk is the OSError that names it (No space left
        on device), not torch's writer's RuntimeError ("unexpected pos"); it reaches the disk (fsync)
        before it replaces the old one."""
        tmp = _temporary(self.dir, ".checkpoint.")
        try:
            serialized = io.BytesIO()
            torch.save(state, serialized)
            with open(tmp, "wb") as f:
                f.write(serialized.getbuffer())
            fsync(tmp)
            if self.checkpoint_path.exists():
                os.replace(self.checkpoint_path, self.previous_checkpoint_path)
            os.replace(tmp, self.checkpoint_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync(self.dir)

    def load_checkpoint(self, log: Any = None) -> dict | None:
        """The newest readable checkpoint, or None. An unreadable one (truncated, corrupt) is
        reported through `log` in one line, saying what comes next: the previous one, or (none being
        readable) training from the start."""
        paths = [p for p in (self.checkpoint_path, self.previous_checkpoint_path) if p.exists()]
        for k, path in enumerate(paths):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or "model" not in state:
                    raise ValueError("not a study checkpoint")
                return state
            except Exception as e:  # any unreadable file: torch raises several types
                if log is not None:
                    then = (f"using the previous good state, {paths[k + 1].name}" if k + 1 < len(paths) else
                            "no readable checkpoint is left: the run starts over from iteration 0")
                    log(f"{self.cfg.run_id}: {path.name} is unreadable ({_reason(e)}); {then}")
        return None

    def clean_temporaries(self) -> None:
        """Remove temporary files a killed writer left behind (call while holding the lock)."""
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    # --- lock ---------------------------------------------------------------------------------
    @contextmanager
    def lock(self, *, wait: bool = False) -> Iterator[bool]:
        """Hold the run's lock (an flock on `<run dir>/lock`, released by the OS if the holder
        dies). Yields False at once if another process holds it and `wait` is False."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the flock

    def is_held(self) -> bool:
        """Whether a process holds the run's lock now (is training it). Takes the lock for an
        instant if it is free; creates nothing where there is no lock file (no process holds it)."""
        if not (self.dir / "lock").exists():
            return False
        try:
            with self.lock() as free:
                return not free
        except OSError:  # a folder this user may not write (a read-only mount, a colleague's): a shared flock
            try:
                fd = os.open(self.dir / "lock", os.O_RDONLY)
            except OSError:
                return False  # cannot even be read: no way to tell, so not held as far as this process knows
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return False
            except BlockingIOError:
                return True
            finally:
                os.close(fd)

    def is_finished(self) -> bool:
        return self.status().get("status") in FINAL_STATUSES

    def check_no_conflict(self) -> None:
        """RunStoreError (one line, naming the fix) if `conflicts()`, or if something other than a
        folder has the run's name."""
        if self.dir.exists() and not self.dir.is_dir():
            raise RunStoreError(f"{self.dir} is a file, where run {self.cfg.run_id} keeps its folder; "
                                "move it away or use another --runs-dir")
        if not self.conflicts():
            return
        record, why = read_config(self.config_path)
        if record is None:  # damaged: the same line as wherever else a run asked for by name has one
            raise RunStoreError(damaged_config(self.config_path, why))
        try:
            there = RunConfig.from_dict(record["config"]).to_dict()
        except (KeyError, TypeError, ValueError) as e:  # settings this version does not know (another tool's run)
            raise RunStoreError(f"{self.config_path} holds settings this version cannot read ({e}); move that directory "
                                "away or use another --runs-dir") from None
        asked = self.cfg.to_dict()
        differ = "; ".join(f"{k} {there.get(k)!r} there, {asked.get(k)!r} asked for"
                           for k in sorted(set(there) | set(asked)) if there.get(k) != asked.get(k))
        raise RunStoreError(f"{self.dir} holds a run with other settings ({differ}); move that directory away or use "
                            "another --runs-dir")

    def conflicts(self) -> bool:
        """True if the directory holds a config.json that is not this run's config."""
        if not self.config_path.exists():
            return False
        try:
            return RunConfig.from_dict(json.loads(self.config_path.read_text())["config"]) != self.cfg
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError):
            return True


def list_runs(runs_dir: str | os.PathLike, unreadable: list[tuple[str, str]] | None = None) -> list[Run]:
    """Every run directory (one with a readable config.json, not hidden) under `runs_dir`, sorted by id. A damaged
    config.json (`read_config`) is added to `unreadable` (its path and why: `unreadable_note` words it),
    where that list is given; one whose settings `RunConfig` refuses (another tool's run) is passed over."""
    runs = []
    root = Path(runs_dir)
    if not root.is_dir():
        return runs
    for path in sorted(root.glob("*/config.json")):
        if path.parent.name.startswith("."):  # hidden: no run's (a publish's staging folder, say)
            continue
        record, why = read_config(path)
        if record is None:
            if unreadable is not None:
                unreadable.append((str(path), str(why)))
            continue
        try:
            cfg = RunConfig.from_dict(record["config"])
        except (KeyError, TypeError, ValueError):
            continue
        if cfg.run_id == path.parent.name:
            runs.append(Run(root, cfg))
    return runs
