"""`study export tensorboard`: finished runs' curves as TensorBoard event files, from their
`metrics.parquet` (runs trained on a cluster, or before `study run --tensorboard`): the same points
the live writer writes (`study.tensorboard`). The tensorboard package is imported only when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .args import path


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add `export` (with its formats as sub-commands) to the CLI's sub-parsers; return its handler."""
    export = sub.add_parser("export", help="write finished runs' curves in another tool's format (tensorboard)")
    formats = export.add_subparsers(dest="format", required=True, parser_class=type(export))
    tb = formats.add_parser(
        "tensorboard", help="TensorBoard event files, one directory per finished run: OUT/<run id>",
        description="Write OUT/<run id>/ for every finished run under --runs-dir, from its metrics.parquet: the "
        "points `study run --tensorboard` writes live (errors, losses, lr by iteration; hyper-parameters of done "
        "runs). A run exported before is replaced.",
    )
    tb.add_argument("--runs-dir", type=path, default="runs", help="where the run directories are (default ./runs)")
    tb.add_argument("--out", type=path, required=True, metavar="DIR",
                    help="where the event files go (tensorboard --logdir DIR)")
    return {"export": cmd_export}


def cmd_export(args: argparse.Namespace) -> int:
    from ..tensorboard import export  # torch and tensorboard: only when it runs

    export(args.runs_dir, args.out)
    return 0
