"""`study evaluate`: the paper's 10-crop test of finished ImageNet runs (Tables 2 and 3), into each
run's tencrop.json. Parsing imports nothing heavy: `study.evaluate` (checkpoints, torchvision's
loaders) is imported when the command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .args import count, path


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add `evaluate` to the CLI's sub-parsers; return its handler."""
    evaluate = sub.add_parser(
        "evaluate", help="10-crop test of finished ImageNet runs (the paper's Tables 2 and 3) into tencrop.json"
    )
    evaluate.add_argument("--runs-dir", type=path, default="runs",
                          help="where the run directories are (default ./runs)")
    evaluate.add_argument(
        "--data-dir", type=path, default="data/imagenet",
        help="the ImageNet folder holding val/<class>/ (default ./data/imagenet); where it holds train/ too, "
        "val/'s class folders must be train/'s"
    )
    evaluate.add_argument(
        "--run", dest="run_ids", action="extend", nargs="+", metavar="RUN_ID",
        help="evaluate these runs (any status, from their last checkpoint) instead of every finished ImageNet run",
    )
    evaluate.add_argument("--batch-size", type=count(1), default=32, help="images per batch, 10 crops each (default 32)")
    evaluate.add_argument("--workers", type=count(0), help="DataLoader workers; 0 loads in this process (default: CPUs, at most 12)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (one GPU of several; default auto)")
    evaluate.add_argument("--force", action="store_true", help="recompute runs that already have a 10-crop result")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    return {"evaluate": cmd_evaluate}


def cmd_evaluate(args: argparse.Namespace) -> int:
    """10-crop test the finished (or named) ImageNet runs; print a table of the results."""
    from ..evaluate import evaluate_runs, format_outcomes

    outcomes = evaluate_runs(
        args.runs_dir,
        data_dir=args.data_dir,
        run_ids=args.run_ids,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        force=args.force,
        progress=False if args.no_progress else None,
    )
    print(format_outcomes(outcomes))
    return 0
