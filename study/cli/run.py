"""`study run`: train one network, a set of seeds, or a named grid, here or as a SLURM job array.

Its options are shared: `study status` takes them too (`add_training_options`, and the selection
options of args.py) and lists the runs `run_configs` says this command trains.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable

from ..config import CPU_PATH_CHOICES, MAX_SEED, ConfigError, RunConfig, parse_seeds, torchrun_place
from ..grids import grid_configs
from .args import add_launcher_arguments, add_selection, path, positive_int


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add `run` to the CLI's sub-parsers; return its handler."""
    run = sub.add_parser("run", help="train one network, a set of seeds, or a named grid")
    add_selection(run, required=True)
    run.add_argument("--runs-dir", type=path, default="runs", help="where run directories go (default ./runs)")
    add_training_options(run)
    return {"run": cmd_run}


def add_training_options(run: argparse.ArgumentParser) -> None:
    """How `study run` trains (not which runs): `study status` accepts and ignores them."""
    run.add_argument(
        "--sync-bn", action="store_true",
        help="under torchrun or --gpus-per-run > 1: BN statistics over the whole global batch",
    )
    run.add_argument(
        "--workers", type=positive_int, help="ImageNet DataLoader workers per process, at least 1 (default: CPUs, at most 12)"
    )
    run.add_argument(
        "--decode", choices=("cpu", "gpu"), default="cpu",
        help="where ImageNet's training JPEGs are decoded: cpu (DataLoader workers, default) or gpu (batched on the "
        "CUDA device, nvJPEG; docs/imagenet.md)",
    )
    run.add_argument("--data-dir", type=path,
                     help="where the data set's files are (default ./data; Fashion-MNIST also Debian's "
                     "/usr/share/datasets/fashion-mnist; ImageNet: ./data/imagenet)")
    run.add_argument("--download", action="store_true", help="download the data set if missing (needs internet)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (one GPU of several; default auto)")
    run.add_argument(
        "--concurrency", type=positive_int,
        help="runs trained at once by separate processes (default: 4 on a GPU, else 1; 1 with --streams or --fuse "
        "above 1 and under torchrun; by default never more than the runs)",
    )
    run.add_argument(
        "--compile", action="store_true", help="torch.compile the model (CUDA graphs on a GPU); same protocol"
    )
    run.add_argument(
        "--cpu-path", choices=CPU_PATH_CHOICES, default="auto",
        help="on a CPU: how a run's step runs, NCHW or channels-last tensors, eager or compiled (same protocol); "
        "auto (default) measures them on runs of 2,000 iterations or more, once per CPU and net, and takes the "
        "fastest (docs/cpu.md)",
    )
    run.add_argument(
        "--streams", type=positive_int, default=1,
        help="runs each process trains at once, interleaved step by step on their own CUDA streams (default 1)",
    )
    run.add_argument(
        "--fuse", type=positive_int, default=1,
        help="runs each process trains at once, those of one network shape fused into one grouped net "
        "(one kernel per layer for all; CIFAR nets; default 1)",
    )
    run.add_argument(
        "--cuda-graph", action="store_true",
        help="replay each whole training step as one CUDA graph (GPU only, CIFAR-style data); same protocol",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    run.add_argument(
        "--no-wait", action="store_true",
        help="once this process's runs are done, leave those another process holds to it and return (to chain "
        "grids back to back beside another runner); default: wait for them, and train any whose process died",
    )
    run.add_argument(
        "--tensorboard", type=path, metavar="DIR",
        help="also write each run's curves as TensorBoard events to DIR/<run id> "
        "(needs: pip install 'resnet-degradation-study[tensorboard]')",
    )
    add_launcher_arguments(run)


def processes_per_run(args: argparse.Namespace) -> int:
    """The processes that will train each run: torchrun's here, or --gpus-per-run on SLURM (it
    decides the run ids: per-device BN is recorded as a batch split)."""
    return (args.gpus_per_run or 1) if args.launcher == "slurm" else torchrun_place()[1]


def run_configs(args: argparse.Namespace, world: int = 1) -> list[RunConfig]:
    """The runs the selection options name, in the order `study run` trains them."""
    if args.seeds is not None:
        seeds = parse_seeds(args.seeds)
    elif args.seed is not None:
        if not 0 <= args.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be a whole number from 0 to {MAX_SEED:,}; got {args.seed}")
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
        for flag in ("depth", "shortcut", "init"):
            if getattr(args, flag, None) is not None:
                raise ConfigError(f"--{flag} does not apply to --grid; use --arch/--depth for a single run")
        return grid_configs(args.grid, seeds=seeds, **settings)
    if args.depth is None:
        raise ConfigError("--arch needs --depth (6n+2 for CIFAR, e.g. --depth 20; 18 or 34 for ImageNet)")
    settings = {k: v for k, v in dict(settings, shortcut=args.shortcut, init=getattr(args, "init", None)).items()
                if v is not None}
    return [RunConfig(arch=args.arch, depth=args.depth, seed=s, **settings) for s in (seeds or [0])]


def check_data_options(configs: list[RunConfig], data_dir: str | None, download: bool) -> None:
    """ConfigError where --data-dir or --download is given and every run trains on the embedded subset,
    which reads neither: the user most likely meant a data set on disk (`--dataset fashion-mnist`)."""
    embedded = RunConfig.__dataclass_fields__["dataset"].default
    given = [flag for flag, on in (("--data-dir", data_dir is not None), ("--download", download)) if on]
    if given and configs and all(cfg.dataset == embedded for cfg in configs):
        one = len(given) == 1
        raise ConfigError(f"{' and '.join(given)} read{'s' if one else ''} no data for {embedded}, which is embedded "
                          f"in the package; drop {'it' if one else 'them'}, or pick the data set on disk with "
                          "--dataset (e.g. --dataset fashion-mnist for all 60,000 images)")


def cmd_run(args: argparse.Namespace) -> int:
    from ..train import ExecutionPlan, StopRequested, distributed_from_env, graceful_stop, run_all  # torch-heavy

    tensorboard = getattr(args, "tensorboard", None)
    if tensorboard is not None:  # the optional package: before anything is listed or written
        from ..tensorboard import require

        require()
    world = processes_per_run(args)
    # The one plan of how these runs execute, checked here for the modes alone (before the runs are
    # listed), then with the runs; it alone carries the modes from here on.
    plan = ExecutionPlan.from_args(args, world)
    plan.check(None)
    configs = run_configs(args, world)
    plan.check(configs)
    check_data_options(configs, args.data_dir, args.download)
    if args.launcher != "local":
        from ..launch import submit

        return submit(configs, args.runs_dir, args, plan)
    ddp = distributed_from_env(plan.device)
    started = time.monotonic()
    try:
        with graceful_stop() as stop:
            results = run_all(configs, args.runs_dir, plan, data_dir=args.data_dir,
                              progress=False if args.no_progress else None, stop=stop, ddp=ddp,
                              tensorboard=tensorboard)
    except StopRequested as e:
        if ddp.writer:
            print(f"study: stopped by {e}; {e.outcome()}", file=sys.stderr)
        return 128 + e.signum
    finally:
        if ddp.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()
    if ddp.writer:
        results = with_ended_elsewhere(results, configs, args.runs_dir)
    unfinished = {k: v for k, v in results.items() if v != "done"}
    if unfinished and ddp.writer:
        print(f"study: not done: {', '.join(f'{k} ({v})' for k, v in unfinished.items())}", file=sys.stderr)
    if ddp.writer:
        print(end_summary(results, len(configs), args.runs_dir, time.monotonic() - started,
                          report_command(configs, args.runs_dir)))
    return 1 if unfinished else 0


#: How a run can end: `run_all`'s outcomes.
ENDED = ("done", "diverged", "failed")


def with_ended_elsewhere(results: dict[str, str], configs: list[RunConfig], runs_dir: str) -> dict[str, str]:
    """`results` (the runs this process claimed) with how each other run of `configs` ended where its
    status says it has: under --no-wait the runs this command's other processes (--concurrency) trained,
    which `run_all` returns without; those still held by another command are left out."""
    from ..runstore import Run

    ended = dict(results)
    for cfg in configs:
        if cfg.run_id not in ended and (status := Run(runs_dir, cfg).status().get("status")) in ENDED:
            ended[cfg.run_id] = status
    return ended


def report_command(configs: list[RunConfig], runs_dir: str) -> str:
    """The `study report` that judges these runs: with the choosers of their study where the runs dir holds
    other studies too (the report would judge the one closest to the paper)."""
    command = "study report" + ("" if runs_dir == "runs" else f" --runs-dir {shlex.quote(str(runs_dir))}")
    from ..analysis.load import CHOOSER_FLAGS, STUDY_KEY, _filter_text, load_run_table, studies

    try:
        table = load_run_table(runs_dir)
    except Exception:  # a runs dir the report would refuse: it says why
        return command
    present = studies(table)
    # As the analysis files them (an ImageNet subset's runs by the class count their data recorded).
    mine = set(table.loc[table["run_id"].isin({c.run_id for c in configs}), STUDY_KEY].itertuples(index=False))
    if len(mine) != 1 or len(present) < 2:
        return command
    return command + "".join(f" {_filter_text(CHOOSER_FLAGS[k], v)}" for k, v in zip(STUDY_KEY, next(iter(mine))))


def end_summary(results: dict[str, str], planned: int, runs_dir: str, seconds: float, report: str) -> str:
    """The last line of `study run`: how its runs ended (those left to another process under --no-wait
    counted), how long it took, and `report`, the command that judges them, where any has errors to judge."""
    counts = Counter(results.values())
    parts = [f"{counts[s]} {s}" for s in ENDED if counts[s]]
    parts += [f"{n} {s}" for s, n in counts.items() if s not in ENDED]
    if left := planned - len(results):
        parts.append(f"{left} left to another process")
    minutes, secs = divmod(round(seconds), 60)
    line = (f"study: {planned} run{'s' if planned != 1 else ''} in {shlex.quote(str(runs_dir))}: "
            f"{', '.join(parts) or 'none ended'}, after {minutes // 60}:{minutes % 60:02d}:{secs:02d}")
    if counts["done"] or counts["diverged"]:
        line += f"; judge {'them' if planned != 1 else 'it'}: {report}"
    return line
