"""`study models`, `study grids`, `study status`: what there is to train, and how far it got.

Quick to start: nothing here imports torchvision (a test checks it); `models` imports study.models
when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

from ..config import ConfigError
from ..grids import GRIDS, grid_configs
from ..launch import list_runs_with_queued, run_status
from ..runstore import (FINAL_STATUSES, RECENT_EPOCHS, Machine, Run, RunStoreError, bf16_unit_names, cpu_flags, duration,
                        missing_runs_dir, parquet_error, recent_speed, status_error, this_cpu_label, trained_on,
                        unreadable_fix)
from .args import SELECTION, add_selection, path
from .run import add_training_options, processes_per_run, run_configs


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add `models`, `grids` and `status` to the CLI's sub-parsers; return their handlers."""
    models = sub.add_parser("models", help="table of every architecture: parameters and multiply-accumulates")
    models.add_argument("--format", choices=("table", "json"), default="table", help="a text table (default) or JSON")

    sub.add_parser("grids", help="list the named grids and their runs")

    status = sub.add_parser(
        "status", help="one line per run: id, status, iteration, last errors; with --grid or --arch (and the "
        "options of `study run`), the runs that command trains, those not started yet included",
        description="One line per run. With --grid or --arch, the runs that `study run` with the same options "
        "trains, those not started included. Every other option of `study run` is accepted and ignored, so a "
        "`study run` command line works with `run` replaced by `status`.",
    )
    status.add_argument("--runs-dir", type=path, default="runs", help="where the run directories are (default ./runs)")
    add_selection(status, required=False, arch_help="the runs of one network of this kind")
    add_training_options(status)
    return {"models": cmd_models, "grids": cmd_grids, "status": cmd_status}


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import architecture_table

    rows = architecture_table()
    if args.format == "json":
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<12} {'dataset':<8} {'depth':>5} {'shortcut':>8} {'params':>12} {'MACs/image':>14}")
    for r in rows:
        name = f"{r['arch']}-{r['depth']}"
        print(f"{name:<12} {r['dataset']:<8} {r['depth']:>5} {r['shortcut']:>8} {r['params']:>12,} {r['macs']:>14,}")
    return 0


def cmd_grids(args: argparse.Namespace) -> int:
    for grid in GRIDS.values():
        print(f"{grid.name}: {grid.description}")
        for cfg in grid_configs(grid.name):  # with the grid's own seeds
            print(f"  {cfg.run_id}")
    return 0


def _seconds_per_step(metrics) -> float | None:
    """A run's training seconds per iteration over its last epochs (`recent_speed`); None before its
    first epoch."""
    timed = recent_speed(metrics)
    return timed[0] / timed[1] if timed is not None else None


def _net_key(run: Run, *, any_kind: bool = False) -> str:
    """What makes two runs cost the same per step: all of the config but the seed and the budget.
    `any_kind`: nor the kind of net (arch, shortcut, init): nets of one depth and setting cost about
    the same, the estimate for a net none of whose runs has trained yet."""
    cfg = run.cfg.to_dict()
    ignored = {"seed", "iterations"} | ({"arch", "shortcut", "init"} if any_kind else set())
    return json.dumps({k: v for k, v in cfg.items() if k not in ignored}, sort_keys=True)


def _side_by_side(training: list[float], waiting: list[float]) -> float:
    """Seconds until the last run finishes when the runs training now (their seconds left) go on side by
    side and each waiting run, in order, starts in the place of the first to finish."""
    import heapq

    places = sorted(training)
    for seconds in waiting:
        heapq.heappush(places, heapq.heappop(places) + seconds)
    return max(places)


def _not_estimated(n: int) -> str:
    """The status line's words for the runs left out of the time left for want of a speed."""
    return f"{n} run{'s' if n > 1 else ''} not estimated (no run of the same depth and settings has trained yet)"


def _failed_not_counted(n: int) -> str:
    """The status line's words for the failed runs left out of the time left."""
    runs, them = ("runs", "them") if n > 1 else ("run", "it")
    return (f"{n} failed {runs} not counted: `study run` with the same options trains {them} again (a process "
            f"training now does only if it has not passed {them} in its list)")


def _measured_on(machines: set[Machine], bf16: bool) -> str | None:
    """The status line's words for where the speeds behind the time left were measured (as the runs'
    config.json names the machines), and, where they were all measured on CPUs and none on this one,
    what this CPU is: the time holds for those machines. `bf16`: some run left trains in bf16, which a
    CPU without bf16 units emulates, many times slower (`study run` measures by how much): said where this
    CPU has none and some of those machines had them (or did not record whether)."""
    if not machines:
        return None
    note = f"speeds measured on {', '.join(sorted(m.name for m in machines))}"
    if all(m.kind == "cpu" for m in machines) and (here := this_cpu_label()) not in {m.name for m in machines}:
        note += f"; this CPU is {here}, where they may train at another speed"
        if (bf16 and any(m.bf16 is not False for m in machines)
                and (flags := cpu_flags()) and not bf16_unit_names(f for f, on in flags.items() if on)):
            note += " (it has no bf16 units: bf16 is emulated here, many times slower than on a CPU with them)"
    return note


def _print_damaged(damaged: list[tuple[str, str]]) -> None:
    """One line for each run whose config.json cannot be read (not listed: nothing else says what it is)."""
    for path, why in damaged:
        folder = os.path.basename(os.path.dirname(path))
        print(f"{folder}: its config.json is unreadable ({why}), so it is not listed: {unreadable_fix('config.json', reason=why)}")


def cmd_status(args: argparse.Namespace) -> int:
    damaged: list[tuple[str, str]] = []  # config.json files that cannot be read: their runs are not listed
    if args.grid is not None or args.arch is not None:
        # The runs `study run` with these options trains: those on disk, and the others as `new`.
        on_disk = ({r.cfg.run_id: r for r in list_runs_with_queued(args.runs_dir, damaged)}
                   if os.path.isdir(args.runs_dir) else {})
        unlisted = {os.path.basename(os.path.dirname(path)) for path, _ in damaged}  # said below the table
        runs = [on_disk.get(c.run_id) or Run(args.runs_dir, c) for c in run_configs(args, processes_per_run(args))
                if c.run_id not in unlisted]
        others = [r for r in on_disk.values() if r not in runs]  # their speeds estimate the runs not started
    else:
        given = [f"--{k.replace('_', '-')}" for k in SELECTION if getattr(args, k) is not None]
        if given:
            raise ConfigError(f"{' '.join(given)} selects runs of a --grid or an --arch; add one, or drop them")
        if (missing := missing_runs_dir(args.runs_dir)) is not None:
            raise RunStoreError(missing)
        runs = list_runs_with_queued(args.runs_dir, damaged)
        others = []
    if not runs:
        print(f"no runs in {args.runs_dir}" + (" that can be read" if damaged else ""))
        _print_damaged(damaged)
        return 0
    width = max(40, *(len(run.cfg.run_id) + 1 for run in runs))
    print(f"{'run':<{width}} {'status':<12} {'iteration':>15} {'train err %':>11} {'eval err %':>10} "
          f"{'trained':>8} {'left':>9}")
    stopped, failures = False, []
    rows = []
    for run in runs:
        st = run_status(run)
        if st["status"] == "failed" and st.get("error"):
            failures.append(f"{run.cfg.run_id}: failed at iteration {st.get('iteration', 0)}: {st['error']}")
        if st["status"] == "running" and not run.is_held():  # its process was killed, or its node failed
            st, stopped = {**st, "status": "stopped"}, True
        rows.append((run, st, run.read_metrics()))
    # Each net's (and each depth's) speed, for its runs not started yet: each run's speed over its last epochs,
    # pooled over the runs weighted by the iterations each trained in all, so that a long run's speed counts
    # for its length, not as much as a short run's trained beside more others.
    seen: dict[str, list[tuple[float, int]]] = {}
    machines: dict[str, set[Machine]] = {}  # where the runs behind each speed trained
    for run, metrics in [(run, metrics) for run, _, metrics in rows] + [(r, r.read_metrics()) for r in others]:
        if (timed := recent_speed(metrics)) is not None and timed[1] > 0:
            where = trained_on(run.dir)
            length = int(metrics["iteration"].max())
            for key in {_net_key(run), _net_key(run, any_kind=True)}:
                seen.setdefault(key, []).append((timed[0] / timed[1] * length, length))
                machines.setdefault(key, set()).update(where)
    rates = {key: sum(t for t, _ in times) / sum(n for _, n in times) for key, times in seen.items()}
    measured_on: set[Machine] = set()  # where the speeds behind the time left were measured
    bf16_left = False  # whether a run in that time trains in bf16
    total_left, guessed, unknown, failed = 0.0, False, 0, 0
    lefts: list[tuple[float, bool]] = []  # each unfinished run's seconds left, and whether it trains now
    for run, st, metrics in rows:
        last = metrics.groupby("split")["error_pct"].last() if not metrics.empty else {}
        train_err = f"{last['train']:.2f}" if "train" in last else "-"
        # The evaluated split: `val` with --holdout and on ImageNet (its validation set), else `test`.
        eval_split = next((s for s in ("val", "test") if s in last), None)
        eval_err = f"{last[eval_split]:.2f}" if eval_split else "-"
        # Where the run stands: its status's iteration; where that cannot be read, its metrics' last (the checkpoint's
        # or later), so a finished run with a damaged status.json is not counted as all left to train.
        at = int(st.get("iteration", metrics["iteration"].max() if not metrics.empty else 0) or 0)
        it = f"{at}/{run.cfg.iterations}"
        elapsed = float(metrics["elapsed_s"].max()) if not metrics.empty else float("nan")
        trained = duration(elapsed) if elapsed == elapsed else "-"
        left = "-"
        if st["status"] == "failed":
            failed += 1  # whether a process training now takes it up again depends on its place in their lists
        elif st["status"] not in FINAL_STATUSES and at < run.cfg.iterations:
            own = _seconds_per_step(metrics)
            key = _net_key(run) if _net_key(run) in rates else _net_key(run, any_kind=True)
            rate = own if own is not None else rates.get(key)
            if rate is not None:
                measured_on |= machines[key] if own is None else trained_on(run.dir)
                bf16_left |= run.cfg.precision == "bf16"
                seconds = rate * max(run.cfg.iterations - at, 0)
                total_left += seconds
                lefts.append((seconds, st["status"] == "running"))
                guessed |= own is None
                left = ("~" if own is None else "") + duration(seconds)
            else:
                unknown += 1
        print(f"{run.cfg.run_id:<{width}} {st['status']:<12} {it:>15} {train_err:>11} {eval_err:>10} "
              f"{trained:>8} {left:>9}")
    for line in failures:  # why each failed run stopped: one line each, as the run recorded it
        print(line)
    for run, st, metrics in rows:  # a metrics file damaged from outside: its errors and times are unknown here
        if metrics.empty and run.metrics_path.is_file() and (why := parquet_error(run.metrics_path)):
            print(f"{run.cfg.run_id}: its metrics.parquet is unreadable ({why}): "
                  f"{unreadable_fix('metrics.parquet', st['status'], why)}")
        elif not run.metrics_path.exists() and st["status"] in FINAL_STATUSES:  # deleted since it finished
            print(f"{run.cfg.run_id}: its metrics.parquet is missing: {unreadable_fix('metrics.parquet', st['status'])}")
        if st["status"] == "unknown" and (why := status_error(run.dir)):  # where the run stands cannot be read
            print(f"{run.cfg.run_id}: its status.json is unreadable ({why}): {unreadable_fix('status.json', reason=why)}")
    _print_damaged(damaged)
    if stopped:
        print("(stopped: marked running, but no process is training it (killed, or its node failed); "
              "`study run` with the same options resumes it from its last checkpoint)")
    if total_left:
        parts = [f"left: about {duration(total_left)} in all, each run's remaining iterations at its own speed "
                 f"over its last {RECENT_EPOCHS} epochs, or all where it has fewer (runs trained side by side overlap)"]
        now = sum(running for _, running in lefts)
        if now >= 2 and not unknown:
            waiting = [s for s, running in lefts if not running]
            wall = _side_by_side([s for s, running in lefts if running], waiting)
            parts.append(f"with {now} trained side by side as now, about {duration(wall)} of wall time"
                         + (" (each run not training now starting, in this order, when one finishes)" if waiting else ""))
        if guessed:
            parts.append("~: at the speed of other runs of the same net, or where none has trained yet, of the "
                         "same depth and settings")
        if unknown:
            parts.append(_not_estimated(unknown))
        if failed:
            parts.append(_failed_not_counted(failed))
        if note := _measured_on(measured_on, bf16_left):
            parts.append(note)
        print(f"({'; '.join(parts)})")
    elif failed or unknown:
        parts = ([_not_estimated(unknown)] if unknown else []) + ([_failed_not_counted(failed)] if failed else [])
        print(f"({'; '.join(parts)})")
    if args.grid is None and args.arch is None:
        print("(the runs on disk; with the --grid or --arch options you gave `study run`, also those not started)")
    return 0
