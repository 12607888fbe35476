"""`study` command line: parses, validates, calls. No training or plotting logic lives here.

Every user error ends in one line on stderr (`study: error: ...` naming the fix) and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .analysis.commands import register as register_analysis
from .config import ALL_DATASETS, LR_SCHEDULES, ConfigError, RunConfig, parse_seeds
from .data import DataError
from .grids import GRIDS, grid_configs
from .launch import add_launcher_arguments, check_local_arguments, list_runs_with_queued, run_status
from .runstore import Run, RunStoreError

USER_ERRORS = (ConfigError, DataError, RunStoreError)


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see `{self.prog} --help`")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


#: The options of `_add_selection` besides --grid/--arch (argparse's names).
SELECTION = ("depth", "shortcut", "dataset", "seed", "seeds", "iterations", "batch_size", "lr_schedule",
             "batch_split", "lighting", "mean", "holdout", "precision")


def _add_selection(parser: argparse.ArgumentParser, *, required: bool, arch_help: str = "train one network of this kind"
                   ) -> None:
    """The options that say which runs (`study run` trains them, `study status` lists them)."""
    what = parser.add_mutually_exclusive_group(required=required)
    what.add_argument("--grid", help="a named grid (see `study grids`)")
    what.add_argument("--arch", choices=("plain", "resnet"), help=arch_help)
    parser.add_argument("--depth", type=int, help="CIFAR 6n+2: 20, 32, 44, 56, 110, 1202; ImageNet 18 or 34 (with --arch)")
    parser.add_argument("--shortcut", choices=("A", "B", "C"), help="residual shortcut option (default A)")
    parser.add_argument("--dataset", choices=ALL_DATASETS, help="data set (default: the grid's, else fashion-mnist-mini)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="one seed (default 0)")
    seeds.add_argument("--seeds", help="several seeds: 0,1,2 or 0-4")
    parser.add_argument(
        "--iterations", type=_positive_int, help="total iterations (paper: 64000 CIFAR, 600000 ImageNet); milestones scale"
    )
    parser.add_argument("--batch-size", type=_positive_int, help="global mini-batch size (paper: 128 CIFAR, 256 ImageNet)")
    parser.add_argument(
        "--lr-schedule", choices=LR_SCHEDULES,
        help="step: lr/10 at 50%% and 75%% of the iterations (paper CIFAR); plateau: lr/10 when the eval error "
        "stops improving (paper ImageNet). Default: the paper's for the data set",
    )
    parser.add_argument(
        "--batch-split", type=_positive_int,
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="study", description="Plain vs residual nets: the degradation study of He et al. (2015).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train one network, a set of seeds, or a named grid")
    _add_selection(run, required=True)
    run.add_argument("--runs-dir", default="runs", help="where run directories go (default ./runs)")
    _add_training_options(run)

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
    status.add_argument("--runs-dir", default="runs", help="where the run directories are (default ./runs)")
    _add_selection(status, required=False, arch_help="the runs of one network of this kind")
    _add_training_options(status)

    COMMANDS.update(register_analysis(sub))  # plot, table, report, probe (study/analysis/commands.py)
    return parser


def _add_training_options(run: argparse.ArgumentParser) -> None:
    """How `study run` trains (not which runs): `study status` accepts and ignores them."""
    run.add_argument(
        "--sync-bn", action="store_true",
        help="under torchrun or --gpus-per-run > 1: BN statistics over the whole global batch",
    )
    run.add_argument(
        "--workers", type=_positive_int, help="ImageNet DataLoader workers per process, at least 1 (default: CPUs, at most 12)"
    )
    run.add_argument("--data-dir", help="where the data set's files are (default ./data; ImageNet: ./data/imagenet)")
    run.add_argument("--download", action="store_true", help="download the data set if missing (needs internet)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    run.add_argument(
        "--concurrency", type=_positive_int,
        help="runs trained at once by separate processes (default: 4 on a GPU, else 1; 1 with --streams or --fuse "
        "above 1 and under torchrun; by default never more than the runs)",
    )
    run.add_argument(
        "--compile", action="store_true", help="torch.compile the model (CUDA graphs on a GPU); same protocol"
    )
    run.add_argument(
        "--streams", type=_positive_int, default=1,
        help="runs each process trains at once, interleaved step by step on their own CUDA streams (default 1)",
    )
    run.add_argument(
        "--fuse", type=_positive_int, default=1,
        help="runs each process trains at once, those of one network shape fused into one grouped net "
        "(one kernel per layer for all; CIFAR nets; default 1)",
    )
    run.add_argument(
        "--cuda-graph", action="store_true",
        help="replay each whole training step as one CUDA graph (GPU only, CIFAR-style data); same protocol",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    add_launcher_arguments(run)


def _world(args: argparse.Namespace) -> int:
    """The processes that will train each run: torchrun's here, or --gpus-per-run on SLURM (it
    decides the run ids: per-device BN is recorded as a batch split)."""
    return (args.gpus_per_run or 1) if args.launcher == "slurm" else int(os.environ.get("WORLD_SIZE", "1"))


def _run_configs(args: argparse.Namespace, world: int = 1) -> list[RunConfig]:
    if args.seeds is not None:
        seeds = parse_seeds(args.seeds)
    elif args.seed is not None:
        if args.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer; got {args.seed}")
        seeds = [args.seed]
    else:
        seeds = None
    batch_split = args.batch_split
    if world > 1 and batch_split is None and not getattr(args, "sync_bn", False):
        batch_split = world  # per-device BN, recorded in the config (and the run id) as a split
    settings = dict(
        dataset=args.dataset,
        iterations=args.iterations,
        batch_size=args.batch_size,
        holdout=args.holdout,
        precision=args.precision,
        lr_schedule=args.lr_schedule,
        batch_split=batch_split,
        lighting=args.lighting,
        mean=args.mean,
    )
    if args.grid is not None:
        for flag in ("depth", "shortcut"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag} does not apply to --grid; use --arch/--depth for a single run")
        return grid_configs(args.grid, seeds=seeds, **settings)
    if args.depth is None:
        raise ConfigError("--arch needs --depth (6n+2 for CIFAR, e.g. --depth 20; 18 or 34 for ImageNet)")
    settings = {k: v for k, v in dict(settings, shortcut=args.shortcut).items() if v is not None}
    return [RunConfig(arch=args.arch, depth=args.depth, seed=s, **settings) for s in (seeds or [0])]


def cmd_run(args: argparse.Namespace) -> int:
    from .train import StopRequested, distributed_from_env, graceful_stop, run_all  # torch-heavy

    world = _world(args)
    if args.sync_bn and world == 1:
        raise ConfigError("--sync-bn applies to runs launched by torchrun over several processes; drop it")
    configs = _run_configs(args, world)
    if not any(cfg.imagenet for cfg in configs):
        if args.workers is not None:
            raise ConfigError("--workers sets ImageNet's DataLoader workers; CIFAR-style data sit on the device, drop it")
    elif args.download:
        raise ConfigError("ImageNet cannot be downloaded; drop --download and pass --data-dir to your copy")
    if args.launcher != "local":
        from .launch import submit

        return submit(configs, args.runs_dir, args)
    check_local_arguments(args)
    ddp = distributed_from_env(sync_bn=args.sync_bn)
    try:
        with graceful_stop() as stop:
            results = run_all(
                configs,
                args.runs_dir,
                data_dir=args.data_dir,
                device=args.device,
                download=args.download,
                progress=False if args.no_progress else None,
                stop=stop,
                concurrency=args.concurrency,
                compile=args.compile,
                cuda_graph=args.cuda_graph,
                streams=args.streams,
                fuse=args.fuse,
                ddp=ddp,
                workers=args.workers,
            )
    except StopRequested as e:
        if ddp.writer:
            print(f"study: stopped by {e}; checkpoint written, run the same command again to resume", file=sys.stderr)
        return 128 + e.signum
    except ValueError as e:  # resolve_device
        if isinstance(e, USER_ERRORS):
            raise
        raise ConfigError(str(e)) from None
    finally:
        if ddp.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()
    unfinished = {k: v for k, v in results.items() if v != "done"}
    if unfinished and ddp.writer:
        print(f"study: not done: {', '.join(f'{k} ({v})' for k, v in unfinished.items())}", file=sys.stderr)
    return 1 if unfinished else 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import architecture_table

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
        for cfg in grid.configs:
            print(f"  {cfg.run_id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.grid is not None or args.arch is not None:
        # The runs `study run` with these options trains: those on disk, and the others as `new`.
        on_disk = {r.cfg.run_id: r for r in list_runs_with_queued(args.runs_dir)} if os.path.isdir(args.runs_dir) else {}
        runs = [on_disk.get(c.run_id) or Run(args.runs_dir, c) for c in _run_configs(args, _world(args))]
    else:
        given = [f"--{k.replace('_', '-')}" for k in SELECTION if getattr(args, k) is not None]
        if given:
            raise ConfigError(f"{' '.join(given)} selects runs of a --grid or an --arch; add one, or drop them")
        if not os.path.isdir(args.runs_dir):
            raise RunStoreError(f"runs dir {args.runs_dir} does not exist; pass --runs-dir to where your runs are")
        runs = list_runs_with_queued(args.runs_dir)
    if not runs:
        print(f"no runs in {args.runs_dir}")
        return 0
    width = max(40, *(len(run.cfg.run_id) + 1 for run in runs))
    print(f"{'run':<{width}} {'status':<12} {'iteration':>15} {'train err %':>11} {'eval err %':>10}")
    stopped = False
    for run in runs:
        st = run_status(run)
        if st["status"] == "running" and not run.is_held():  # its process was killed, or its node failed
            st, stopped = {**st, "status": "stopped"}, True
        metrics = run.read_metrics()
        last = metrics.groupby("split")["error_pct"].last() if not metrics.empty else {}
        train_err = f"{last['train']:.2f}" if "train" in last else "-"
        # The evaluated split: `val` with --holdout and on ImageNet (its validation set), else `test`.
        eval_split = next((s for s in ("val", "test") if s in last), None)
        eval_err = f"{last[eval_split]:.2f}" if eval_split else "-"
        it = f"{st.get('iteration', 0)}/{run.cfg.iterations}"
        print(f"{run.cfg.run_id:<{width}} {st['status']:<12} {it:>15} {train_err:>11} {eval_err:>10}")
    if stopped:
        print("(stopped: marked running, but no process is training it (killed, or its node failed); "
              "`study run` with the same options resumes it from its last checkpoint)")
    if args.grid is None and args.arch is None:
        print("(the runs on disk; with the --grid or --arch options you gave `study run`, also those not started)")
    return 0


COMMANDS = {"run": cmd_run, "models": cmd_models, "grids": cmd_grids, "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # argparse's own message would point at `study --help`, not the command's
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}; see `study {args.command} --help`")
        return COMMANDS[args.command](args)
    except (UsageError, *USER_ERRORS) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0, not one per process
            print(f"study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("study: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
