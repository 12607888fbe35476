"""`study evaluate`: the paper's 10-crop test (Tables 2 and 3) of finished ImageNet runs.

Runs log the centre-crop validation error every epoch (Figure 4's curves); the paper's tables are
standard 10-crop testing. This module scores a run's checkpoint with `make_ten_crop_loader` +
`ten_crop_error` and writes the result beside the run as `tencrop.json`:

    {"loss", "top1", "top5", "images", "iteration", "date", "device", "torch_version", "data_dir"}

(`iteration` is the checkpoint's). `study table table2|table3` use these numbers where they exist.
A result counts as current while its iteration is not behind the run's status; an older one (the run
trained on after it was evaluated) is recomputed.

torch, torchvision and the models are imported inside the functions that need them.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError
from .runstore import Run, RunStoreError, atomic_write_text, check_writable, missing_runs_dir, no_checkpoint, readable_runs

TENCROP_FILE = "tencrop.json"
DEFAULT_DATA_DIR = "data/imagenet"
DEFAULT_BATCH_SIZE = 32  # images per batch (each brings 10 crops)


class NoImageNetRunsError(ConfigError):
    """Nothing to evaluate. str(e) is one line naming the fix."""


def tencrop_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / TENCROP_FILE


def read_tencrop(run_dir: str | Path) -> dict | None:
    """A run's `tencrop.json`, or None when it is missing or unreadable."""
    try:
        record = json.loads(tencrop_path(run_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not all(
        isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)
        for k in ("top1", "top5", "iteration")
    ):
        return None
    return record


def is_current(run: Run, record: dict | None) -> bool:
    """Whether `record` (a run's tencrop.json) scores the run as it now stands: it exists and its
    checkpoint iteration is not behind the iteration in the run's status."""
    if record is None:
        return False
    try:
        return int(record["iteration"]) >= int(run.status().get("iteration", 0))
    except (TypeError, ValueError):
        return False


@dataclass
class Outcome:
    """One run's 10-crop result and whether it was computed now or kept from before."""

    run_id: str
    record: dict
    computed: bool


def select_runs(runs_dir: str | Path, run_ids: list[str] | None) -> tuple[list[Run], list[str]]:
    """The ImageNet runs to consider: the named ones (any status), else every `done` one; and the notes of
    runs left out for a damaged config.json (`readable_runs`). ConfigError (one line, naming the fix) for no
    ImageNet runs, an unknown or non-ImageNet id; RunStoreError for a named run whose config.json is damaged."""
    listed, notes = readable_runs(runs_dir, run_ids or [])
    runs = {run.cfg.run_id: run for run in listed}
    imagenet = {rid: run for rid, run in runs.items() if run.cfg.imagenet}
    if run_ids:
        for rid in run_ids:
            if rid not in runs:
                raise ConfigError(
                    f"unknown run id {rid!r} in {runs_dir}; `study status --runs-dir {runs_dir}` lists the runs"
                )
            if rid not in imagenet:
                raise ConfigError(
                    f"run {rid} is a {runs[rid].cfg.dataset} run; 10-crop testing is for ImageNet runs only, drop it"
                )
        return [imagenet[rid] for rid in dict.fromkeys(run_ids)], notes
    if not imagenet and (missing := missing_runs_dir(runs_dir)) is not None:
        raise NoImageNetRunsError(missing)
    if not imagenet:
        raise NoImageNetRunsError(
            f"no ImageNet runs in {runs_dir}; train one first (e.g. `study run --arch resnet --depth 18 "
            "--dataset imagenet --data-dir data/imagenet`) or pass --runs-dir to the directory that holds them"
        )
    done = [run for run in imagenet.values() if run.status().get("status") == "done"]
    if not done:
        raise NoImageNetRunsError(
            f"no finished ImageNet run in {runs_dir} ({len(imagenet)} unfinished); "
            "wait for one to finish, or name runs with --run RUN_ID to test their last checkpoint"
        )
    return done, notes


class _Progress:
    """A loader seen through a tqdm bar (one tick per batch); `evaluate` also reads its sampler."""

    def __init__(self, loader, bar) -> None:
        self.loader, self.bar, self.sampler = loader, bar, loader.sampler

    def __iter__(self) -> Iterator:
        from .data.imagenet import batches

        for batch in batches(self.loader):
            yield batch
            self.bar.update(1)

    def __len__(self) -> int:
        return len(self.loader)


def evaluate_run(run: Run, loader, device, *, progress: bool = False, pixel_mean: Callable | None = None) -> dict:
    """10-crop test of `run`'s checkpoint over `loader` (from `make_ten_crop_loader`); the record
    for tencrop.json. `pixel_mean`: returns the data set's mean image (`data.imagenet.pixel_mean`),
    which a run with `mean == "pixel"` subtracts, as it trained; called once the checkpoint has
    loaded. ConfigError if the run has no readable checkpoint or its classes do not match the
    folder's."""
    import torch
    from tqdm import tqdm

    from .data.imagenet import IMAGENET_MEAN, ten_crop_error
    from .models import memory_format, model_for

    if run.cfg.mean == "pixel" and pixel_mean is None:
        raise ValueError(f"run {run.cfg.run_id} subtracts the per-pixel mean: pass pixel_mean")

    state = run.load_checkpoint(log=lambda message: print(message, file=sys.stderr))
    if state is None:
        raise ConfigError(
            f"run {run.cfg.run_id}: checkpoint.pt and checkpoint.prev.pt are both unreadable; "
            "retrain it, or leave it out by naming the other runs with --run"
        )
    cfg = run.cfg
    num_classes = len(loader.dataset.classes)
    model = model_for(cfg, num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        trained = state["model"].get("fc.weight")
        had = f"{trained.shape[0]} classes" if trained is not None else "another architecture"
        raise ConfigError(
            f"run {cfg.run_id} was trained with {had}, but the folder {loader.dataset.root} has {num_classes}; "
            "pass --data-dir pointing at the ImageNet copy the run trained on"
        ) from None
    mean = pixel_mean() if run.cfg.mean == "pixel" else IMAGENET_MEAN
    model = model.to(device).to(memory_format=memory_format(device))  # the layout it trained in
    bar = tqdm(total=len(loader), desc=cfg.run_id, unit="batch", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        result = ten_crop_error(model, _Progress(loader, bar), device, mean=mean, autocast=cfg.bf16)
    finally:
        bar.close()
    return {
        "loss": result.loss,
        "top1": result.top1,
        "top5": result.top5,
        "images": len(loader.dataset),
        "iteration": int(state["iteration"]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "torch_version": torch.__version__,
        "data_dir": str(Path(loader.dataset.root).parent.resolve()),
    }


def recorded_source(run: Run) -> dict | None:
    """What `run` recorded it read (`ImageNetData.source`, in its latest session), or None."""
    from .runstore import sessions

    try:
        source = sessions(json.loads(run.config_path.read_text())["provenance"])[-1].get("data")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return source if isinstance(source, dict) else None


def recorded_root(run: Run) -> str | None:
    """The ImageNet folder `run` recorded it read, or None."""
    source = recorded_source(run) or {}
    return source.get("dir") if isinstance(source.get("dir"), str) else None


def other_copy(run: Run, val) -> str | None:
    """Why `val` (the ImageFolder to test on) is not the validation set `run` trained beside, where the run
    recorded it (`ImageNetData.source`, in its latest session) and `val` has another number of images or
    classes: a 10-crop result on another set would stand in Tables 2 and 3 for this one. None otherwise
    (runs of a version that did not record it included)."""
    source = recorded_source(run) or {}
    images = source.get("images")
    count = images.get("val") if isinstance(images, dict) else None
    if not isinstance(count, int):
        return None
    classes = source.get("classes")
    if count == len(val) and classes in (None, len(val.classes)):
        return None
    recorded = f"{count:,} images" + (f" of {classes} classes" if isinstance(classes, int) else "")
    return (f"run {run.cfg.run_id} validated on {recorded} in {source.get('dir')}/val, but {val.root} has "
            f"{len(val):,} of {len(val.classes)}; pass --data-dir the ImageNet copy the run trained on")


def evaluate_runs(
    runs_dir: str | Path = "runs",
    *,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    run_ids: list[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    device: str = "auto",
    force: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> list[Outcome]:
    """10-crop test every finished ImageNet run under `runs_dir` (or the named `run_ids`) that has
    no current `tencrop.json` (every one with `force`), writing it atomically. Returns one Outcome
    per run considered, in id order.

    Every check that can fail on bad input (runs, checkpoints present, device, data folder,
    writable run dirs, batch size) happens before the first checkpoint is loaded; a run that fails
    later (an unreadable checkpoint, classes that do not match the folder's) stops the command with
    the runs before it already written.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"--batch-size must be a positive number of images; got {batch_size!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"--workers must be 0 or more; got {workers!r}")
    runs, notes = select_runs(runs_dir, run_ids)
    for note in notes:  # runs left out, with what to do, on stderr as `study plot` leaves them out
        print(note, file=sys.stderr)
    existing = {run.cfg.run_id: read_tencrop(run.dir) for run in runs}
    todo = [run for run in runs if force or not is_current(run, existing[run.cfg.run_id])]
    outcomes = {
        run.cfg.run_id: Outcome(run.cfg.run_id, existing[run.cfg.run_id], computed=False)
        for run in runs
        if run not in todo
    }
    for o in outcomes.values():  # kept from a test on another folder: say so, as it is not --data-dir's
        if isinstance(kept_on := o.record.get("data_dir"), str) and Path(kept_on) != Path(data_dir).resolve():
            print(f"note: {o.run_id}: its 10-crop result is kept from a test on {kept_on} ({o.record['images']:,} "
                  f"images), not on --data-dir {data_dir}; pass --force to test it on {data_dir}", file=sys.stderr)
    if todo:
        from .data.imagenet import make_ten_crop_loader
        from .train import default_workers, ieee_fp32, resolve_device

        dev = resolve_device(device)  # a ConfigError naming the fix for a device this machine lacks
        for run in todo:
            if not (run.checkpoint_path.exists() or run.previous_checkpoint_path.exists()):
                raise ConfigError(no_checkpoint(run, "evaluate it"))
        loader = make_ten_crop_loader(data_dir, batch_size, default_workers() if workers is None else workers)
        for run in todo:
            if (why := other_copy(run, loader.dataset)) is not None:
                raise ConfigError(why)
        for run in todo:
            try:
                check_writable(run.dir, None, "run folder")
            except RunStoreError as e:
                raise RunStoreError(f"cannot write {run.dir / TENCROP_FILE}: {e}") from None
        show = sys.stderr.isatty() if progress is None else progress
        from .data.imagenet import cached_pixel_mean
        from .data.imagenet import pixel_mean as compute_pixel_mean

        # As the runs trained: computed once (or read from the runs dir's cache), when first needed.
        pixel_mean = functools.cache(lambda: compute_pixel_mean(
            data_dir, runs_dir, workers=default_workers() if workers is None else workers, device=dev,
            progress=show, log=log))
        for run in todo:
            # An unreadable image is a one-line DataError (`imagenet.batches` unwraps the worker's).
            # The mean the run trained with: that of the folder it recorded it trained on, cached in the runs dir,
            # where it is there (a copy at another path, or a folder of val/ alone, then tests with it), else
            # --data-dir's own.
            own = recorded_root(run)
            trained_mean = None if own is None else cached_pixel_mean(own, runs_dir)
            with ieee_fp32():  # fp32 as the runs trained it: IEEE, not TF32
                record = evaluate_run(run, loader, dev, progress=show,
                                      pixel_mean=pixel_mean if trained_mean is None else (lambda m=trained_mean: m))
            atomic_write_text(tencrop_path(run.dir), json.dumps(record, indent=1) + "\n")
            outcomes[run.cfg.run_id] = Outcome(run.cfg.run_id, record, computed=True)
            log(f"{run.cfg.run_id}: 10-crop top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}% "
                f"at iteration {record['iteration']:,} ({record['images']:,} images) -> {tencrop_path(run.dir)}")
    return [outcomes[rid] for rid in sorted(outcomes)]


def format_outcomes(outcomes: list[Outcome]) -> str:
    """The small table `study evaluate` prints: run id, 10-crop top-1 and top-5 error %, and
    whether the result was computed now or kept."""
    width = max([len("run"), *(len(o.run_id) for o in outcomes)])
    lines = [f"{'run':<{width}}  {'top-1 %':>8}  {'top-5 %':>8}  {'iteration':>10}  result"]
    for o in outcomes:
        r = o.record
        lines.append(
            f"{o.run_id:<{width}}  {r['top1']:>8.2f}  {r['top5']:>8.2f}  {int(r['iteration']):>10,}  "
            f"{'computed' if o.computed else 'kept (--force recomputes)'}"
        )
    return "\n".join(lines)
