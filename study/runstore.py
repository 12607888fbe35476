"""A run directory: `config.json`, `metrics.parquet`, `checkpoint.pt`, `status.json`.

Every file is written to a temporary name in the same directory and renamed into place, so a kill at
any moment leaves either the old or the new version, never a truncated one.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

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
]
STATUSES = ("running", "done", "failed", "interrupted", "diverged")


class RunStoreError(RuntimeError):
    """A problem with the runs directory. str(e) is one line naming the problem and the fix."""


def atomic_write(path: Path, write: Any) -> None:
    """Call `write(tmp_path)` then rename the temporary file onto `path` (same directory, so the
    rename is atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def check_writable(runs_dir: Path) -> None:
    """Create `runs_dir` if needed and prove a file can be written there; RunStoreError naming the fix
    otherwise. (A real write, not os.access: root passes access checks on read-only mounts.)"""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=runs_dir):
            pass
    except OSError as e:
        raise RunStoreError(
            f"runs dir {runs_dir} is not writable ({e.strerror or e}); pass --runs-dir to a directory you can write"
        ) from None


def provenance(device: str) -> dict:
    """Where and with what a run was produced."""
    from . import __version__

    commit = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "package_version": __version__,
        "git_commit": commit,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
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
        """The run's status record; `{"status": "new"}` for a run never started."""
        try:
            return json.loads(self.status_path.read_text())
        except FileNotFoundError:
            return {"status": "new"}
        except (json.JSONDecodeError, OSError):
            return {"status": "unknown"}

    def set_status(self, status: str, **extra: Any) -> None:
        assert status in STATUSES, status
        record = {"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        atomic_write_text(self.status_path, json.dumps(record, indent=1) + "\n")

    # --- config -----------------------------------------------------------------------------
    def prepare(self, device: str) -> None:
        """Create the directory and write `config.json`, or check that an existing one matches."""
        if self.config_path.exists():
            try:
                existing = RunConfig.from_dict(json.loads(self.config_path.read_text())["config"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                existing = None
            if existing != self.cfg:
                raise RunStoreError(
                    f"{self.dir} holds a run with a different or unreadable config.json; "
                    "move that directory away or use another --runs-dir"
                )
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        record = {"run_id": self.cfg.run_id, "config": self.cfg.to_dict(), "provenance": provenance(device)}
        atomic_write_text(self.config_path, json.dumps(record, indent=1) + "\n")

    # --- metrics ----------------------------------------------------------------------------
    def read_metrics(self) -> pd.DataFrame:
        if not self.metrics_path.exists():
            return pd.DataFrame(columns=METRIC_COLUMNS)
        return pd.read_parquet(self.metrics_path)

    def write_metrics(self, df: pd.DataFrame) -> None:
        atomic_write(self.metrics_path, lambda p: df[METRIC_COLUMNS].to_parquet(p, index=False))

    def append_metrics(self, rows: list[dict]) -> None:
        """Add rows (Parquet has no append: rewrite atomically; a run has a few hundred rows)."""
        new = pd.DataFrame(rows, columns=METRIC_COLUMNS)
        old = self.read_metrics()
        self.write_metrics(new if old.empty else pd.concat([old, new], ignore_index=True))

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop rows after `last_epoch` (written before a kill, but past the last checkpoint)."""
        df = self.read_metrics()
        if not df.empty and (df["epoch"] > last_epoch).any():
            self.write_metrics(df[df["epoch"] <= last_epoch].reset_index(drop=True))

    # --- checkpoint -------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        atomic_write(self.checkpoint_path, lambda p: torch.save(state, p))

    def load_checkpoint(self) -> dict | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)


def list_runs(runs_dir: str | os.PathLike) -> list[Run]:
    """Every run directory (one with a readable config.json) under `runs_dir`, sorted by id."""
    runs = []
    root = Path(runs_dir)
    if not root.is_dir():
        return runs
    for path in sorted(root.glob("*/config.json")):
        try:
            cfg = RunConfig.from_dict(json.loads(path.read_text())["config"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError):
            continue
        if cfg.run_id == path.parent.name:
            runs.append(Run(root, cfg))
    return runs
