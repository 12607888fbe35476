"""`study` command line: parses, validates, calls. No training or plotting logic lives here.

Every user error ends in one line on stderr (`study: error: ...` naming the fix) and exit code 2.

One module per group of commands, each with `register(sub)` (its sub-parsers; returns its handlers):
run.py (`run`), listing.py (`models`, `grids`, `status`), analysis.py (`plot`, `table`, `report`,
`probe`), evaluate.py (`evaluate`), export.py (`export tensorboard`), publish.py (`publish`); args.py holds the argument types
and the option groups they share.
Torch-heavy imports happen inside the handlers, so that parsing and the listings start fast.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
from collections.abc import Callable

from . import analysis, evaluate, export, listing, publish, run
from ..config import reports_errors
from .args import USER_ERRORS, Parser, UsageError

#: {command: handler}, filled by `build_parser`; a handler returns the exit code.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="study", description="Plain vs residual nets: the degradation study of He et al. (2015).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in (run, listing, analysis, evaluate, export, publish):
        COMMANDS.update(group.register(sub))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    except BrokenPipeError:
        if not _stdout_gone():  # a pipe of the command's own (a worker's, say): a bug to report, not a reader
            raise
        code = READER_LEFT
    try:
        sys.stdout.flush()  # a reader that left (`study grids | head -1`) shows here, not at exit
    except BrokenPipeError:
        code = READER_LEFT if code == 0 else code
    if code == READER_LEFT or _stdout_gone():
        # Stop quietly, as other command-line tools do when `head` has read enough, and keep Python from
        # reporting the broken pipe again as it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


#: The exit code of a command whose reader left: 128 + SIGPIPE, as the shell reports a tool SIGPIPE stopped.
READER_LEFT = 141


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll says POLLERR); False where stdout is no
    file (a notebook's, a test's capture) or poll cannot tell."""
    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def _main(argv: list[str] | None) -> int:
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # argparse's own message would point at `study --help`, not the command's
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}; see `study {args.command} --help`")
        return COMMANDS[args.command](args)
    except (UsageError, *USER_ERRORS) as e:
        if reports_errors():  # under torchrun, one line from rank 0, not one per process
            print(f"study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("study: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
