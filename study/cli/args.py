"""What every `study` command parses with: the parser class, the argument types (one family of integer
types, the SLURM values'), and the option groups shared by commands (which runs; the launcher).

A bad value ends in one line: argparse's error is raised as UsageError, and the user errors of the
library (USER_ERRORS) pass through; `study.cli.main` prints either as `study: error: ...`, exit code 2.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

from ..config import ALL_DATASETS, ARCHS, INITS, LR_SCHEDULES, ConfigError
from ..data import DataError
from ..launch import DEFAULT_GPUS, DEFAULT_MAX_TIMEOUTS, DEFAULT_TIME_MIN, LAUNCHERS, SLURM_FLAGS
from ..runstore import RunStoreError

USER_ERRORS = (ConfigError, DataError, RunStoreError)


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see `{self.prog} --help`")


# --- argument types ------------------------------------------------------------------------------
# Each takes the command line's text (or a value already parsed: launch re-checks Namespaces built by
# other callers) and raises argparse.ArgumentTypeError with the one-line reason.


def _integer(text: str | int) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str | int) -> int:
    """An integer >= 1."""
    value = _integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str | int) -> int:
    """An integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def count(minimum: int) -> Callable[[str | int], int]:
    """An integer >= `minimum`, the bound named in the error."""

    def parse(text: str | int) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


#: SLURM's time formats (sbatch --time): minutes, minutes:seconds, hours:minutes:seconds, days-hours,
#: days-hours:minutes and days-hours:minutes:seconds.
TIME_FORMATS = (r"(?P<m>\d+)", r"(?P<m>\d+):(?P<s>\d\d)", r"(?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d)",
                r"(?P<d>\d+)-(?P<h>\d+)", r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d\d)",
                r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d)")


def parse_time(text: str | int) -> int:
    """SLURM time limit -> whole minutes, in any of sbatch's formats (`TIME_FORMATS`): `90`, `90:00`,
    `1:30:00`, `2-0`, `2-00:00`, `2-00:00:00`; seconds round up to a whole minute."""
    text = str(text).strip()
    m = next((m for f in TIME_FORMATS if (m := re.fullmatch(f, text))), None)
    parts = {k: int(v) for k, v in m.groupdict().items() if v is not None} if m else {}
    # A field after the first is at most 59 (sbatch's own minutes-only or minutes:seconds may be larger).
    bounded = [k for k in ("m", "s") if k in parts and (k == "s" or "h" in parts)]
    if m is None or any(parts[k] >= 60 for k in bounded):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time limit; write minutes (90), MM:SS, [D-]HH:MM:SS (01:30:00, 2-00:00:00), D-HH or D-HH:MM"
        )
    minutes = math.ceil(((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) + parts.get("s", 0) / 60)
    if minutes <= 0:
        raise argparse.ArgumentTypeError(f"the time limit must be at least 1 minute, got {text!r}")
    return minutes


def parse_mem(text: str) -> str:
    """Memory per run as sbatch takes it: `16G`, `500M`, `16GB`, or a number of megabytes."""
    m = re.fullmatch(r"([1-9]\d*)\s*([KMGT]?)B?", str(text).strip(), flags=re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size; write e.g. 16G or 500M")
    return m[1] + m[2].upper()


def path(text: str) -> str:
    """A folder or file option's value (--runs-dir, --out, --data-dir): any path but the empty one, which
    would quietly mean the current directory (or the default)."""
    if str(text) == "":
        raise argparse.ArgumentTypeError("an empty path names nothing; give a path (`.` for the current directory)")
    return str(text)


def slurm_name(text: str) -> str:
    """A partition, account or QOS name."""
    if not re.fullmatch(r"[A-Za-z0-9_.,:+@-]+", str(text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a SLURM name (letters, digits, _ . , : + @ -)")
    return str(text)


# --- which runs: `study run` trains them, `study status` lists them ------------------------------

#: The options of `add_selection` besides --grid/--arch (argparse's names).
SELECTION = ("depth", "shortcut", "dataset", "seed", "seeds", "iterations", "batch_size", "lr_schedule",
             "batch_split", "lighting", "mean", "holdout", "precision", "init")


def add_selection(parser: argparse.ArgumentParser, *, required: bool, arch_help: str = "train one network of this kind"
                  ) -> None:
    """The options that say which runs (`study run` trains them, `study status` lists them)."""
    what = parser.add_mutually_exclusive_group(required=required)
    what.add_argument("--grid", help="a named grid (see `study grids`)")
    what.add_argument("--arch", choices=ARCHS, help=arch_help + " (plain, resnet: the paper's; preact: the "
                      "pre-activation ResNet of its sequel, docs/followups.md)")
    parser.add_argument("--depth", type=int, help="CIFAR 6n+2: 8, 14, 20, 32, 44, 56, 110, 1202, ...; ImageNet 18 or 34 (with --arch)")
    parser.add_argument("--shortcut", choices=("A", "B", "C"), help="residual shortcut option (default A)")
    parser.add_argument("--init", choices=INITS, help="he (the paper's, default); beyond the paper: zero-residual (every "
                        "residual block starts as the identity) or delta-orthogonal (docs/followups.md)")
    parser.add_argument("--dataset", choices=ALL_DATASETS, help="data set (default: the grid's, else fashion-mnist-mini)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="one seed (default 0)")
    seeds.add_argument("--seeds", help="several seeds: 0,1,2 or 0-4")
    parser.add_argument(
        "--iterations", type=positive_int, help="total iterations (paper: 64000 CIFAR, 600000 ImageNet); milestones scale"
    )
    parser.add_argument("--batch-size", type=positive_int, help="global mini-batch size (paper: 128 CIFAR, 256 ImageNet)")
    parser.add_argument(
        "--lr-schedule", choices=LR_SCHEDULES,
        help="step: lr/10 at 50%% and 75%% of the iterations (paper CIFAR); plateau: lr/10 when the eval error "
        "stops improving (paper ImageNet). Default: the paper's for the data set",
    )
    parser.add_argument(
        "--batch-split", type=positive_int,
        help="BN groups per batch, as on that many devices (default 1; under torchrun or --gpus-per-run: the "
        "process count)",
    )
    parser.add_argument(
        "--lighting", type=float, help="ImageNet PCA colour augmentation strength (paper: 0.1; 0 turns it off)"
    )
    parser.add_argument(
        "--mean", choices=("pixel", "channel"),
        help="ImageNet mean subtraction: pixel (paper, default: a 224x224 mean image of the training set, "
        "computed once and cached in the runs dir) or channel (per-channel mean, a deviation)",
    )
    parser.add_argument(
        "--holdout", action="store_true", default=None, help="train on 90%% of the training set, log `val` on the rest"
    )
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), help="fp32 (paper, default) or bf16 autocast (a deviation)"
    )


# --- where `study run` trains: here, or as a SLURM job array (study/launch.py) --------------------

#: The SLURM flags (argparse's names) and their types, as `add_launcher_arguments` gives them;
#: `launch.submit` checks a Namespace's values with them again, whoever built it.
SLURM_TYPES: dict[str, Callable] = {
    "partition": slurm_name,
    "account": slurm_name,
    "qos": slurm_name,
    "time": parse_time,
    "gpus_per_run": positive_int,
    "cpus_per_run": positive_int,
    "mem": parse_mem,
    "slurm_array_parallelism": positive_int,
    "slurm_max_timeouts": non_negative_int,
}
assert tuple(SLURM_TYPES) == SLURM_FLAGS  # the launcher's list of its flags (the plan reads it without study.cli)


def add_launcher_arguments(run_parser: argparse.ArgumentParser) -> None:
    """Add `--launcher {local,slurm}` (default local) and the SLURM flags to `study run`'s parser."""
    run_parser.add_argument(
        "--launcher", choices=LAUNCHERS, default="local",
        help="local: train here (default); slurm: submit the unfinished runs as one SLURM job array",
    )
    g = run_parser.add_argument_group("SLURM (with --launcher slurm)")
    g.add_argument("--partition", type=slurm_name, metavar="P", help="partition to submit to (default: the cluster's)")
    g.add_argument("--account", type=slurm_name, metavar="A", help="account to charge (default: yours)")
    g.add_argument("--qos", type=slurm_name, metavar="Q", help="quality of service (default: the cluster's)")
    g.add_argument(
        "--time", type=parse_time, metavar="T",
        help=f"time limit per job: minutes, MM:SS, [D-]HH:MM:SS, D-HH or D-HH:MM (default {DEFAULT_TIME_MIN // 60}:00:00); "
        "a run that needs longer is requeued from its checkpoint",
    )
    g.add_argument(
        "--gpus-per-run", type=positive_int, metavar="G",
        help=f"GPUs per run (default {DEFAULT_GPUS}); G > 1 trains one run with G DDP processes",
    )
    g.add_argument("--cpus-per-run", type=positive_int, metavar="C", help="CPU cores per run (default: the cluster's)")
    g.add_argument("--mem", type=parse_mem, metavar="M", help="memory per run, e.g. 16G (default: the cluster's)")
    g.add_argument(
        "--slurm-array-parallelism", type=positive_int, metavar="N", help="at most N runs of the array at once (default 256)"
    )
    g.add_argument(
        "--slurm-max-timeouts", type=non_negative_int, metavar="N",
        help=f"requeue a job after a time-limit stop at most N times (default {DEFAULT_MAX_TIMEOUTS}); "
        "preemptions are always requeued",
    )
