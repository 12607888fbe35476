"""`study publish`: copy finished runs' small files (config, metrics, gradients, responses, status)
out of a runs dir into a folder to commit or share (`study.publish`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..config import ConfigError
from .args import SELECTION, add_selection, path
from .run import add_training_options, processes_per_run, run_configs


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add `publish` to the CLI's sub-parsers; return its handler."""
    publish = sub.add_parser(
        "publish", help="copy finished runs' small files (config, metrics, gradients, responses, status) to a folder "
        "to commit or share; never checkpoints",
        description="Copy each finished run's small files (config.json, status.json, metrics, gradients and "
        "responses Parquet, tencrop.json) from --runs-dir to --out/<run id>/, for the runs a --grid or --arch "
        "selects (the options of `study run`; others are accepted and ignored) or every run. Runs not finished, "
        "or trained from a git tree with uncommitted changes (unless --allow-dirty), are left out with a line "
        "saying why. Then draw the figures and report from the copy: study report --runs-dir OUT.",
    )
    publish.add_argument("--runs-dir", type=path, default="runs", help="where the run directories are (default ./runs)")
    publish.add_argument("--out", type=path, required=True, metavar="DIR",
                         help="where the copies go, one folder per run")
    publish.add_argument("--allow-dirty", action="store_true",
                         help="also publish runs trained from a git tree with uncommitted changes, or outside a git "
                         "checkout")
    add_selection(publish, required=False, arch_help="the runs of one network of this kind")
    add_training_options(publish)
    return {"publish": cmd_publish}


def cmd_publish(args: argparse.Namespace) -> int:
    from ..publish import publish

    selected = args.grid is not None or args.arch is not None
    given = [f"--{k.replace('_', '-')}" for k in SELECTION if getattr(args, k) is not None]
    if given and not selected:
        raise ConfigError(f"{' '.join(given)} selects runs of a --grid or an --arch; add one, or drop them")
    run_ids = [cfg.run_id for cfg in run_configs(args, processes_per_run(args))] if selected else None
    publish(args.runs_dir, args.out, run_ids=run_ids, allow_dirty=args.allow_dirty)
    return 0
