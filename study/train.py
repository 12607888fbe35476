"""One run, top to bottom: build the net, train it with the paper's schedule, evaluate every epoch,
write the epoch's rows to `metrics.parquet`, checkpoint, and resume from that checkpoint if the run
was stopped.

What survives what:
- kill -9 at any moment: files are replaced atomically; the next start resumes from the last
  end-of-epoch checkpoint, which also holds every metrics row so far (rows written after it are
  redone, never duplicated). The result equals an uninterrupted run's, bit for bit on CPU.
- SIGTERM / SIGINT: the current step finishes, a mid-epoch checkpoint is written (with the epoch's
  data order, position and running sums), the run is marked `interrupted`; resuming continues
  exactly where it stopped.
- an unreadable checkpoint: reported in one line, the previous one is used (or a clean restart).
- NaN/inf loss: the run is marked `diverged` at the iteration it happened; a grid goes on.
- two processes on one runs dir: each run is trained by whoever holds its lock; the other skips it,
  then waits for it at the end of its own list.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import warmup
from .config import ConfigError, RunConfig
from .data import Data, DataError, augment, eval_batches, imagenet, load_data, normalize
from .fused import Fuser, Join, StepRequest, fusion_key, fusion_order
from .graphstep import GraphedStep
from .models import build_model
from .models.syncbn import convert_sync_batchnorm
from .probes import GRADIENT_EVERY, GradientNorms, append_gradients, record_responses, truncate_gradients
from .runstore import Run, check_writable
from .stopflag import StopFlag

EVAL_BATCH_SIZE = 1000
AUTO_GPU_CONCURRENCY = 4  # runs sharing one GPU when --concurrency is not given
LOCK_POLL_S = 0.5  # how often a process waiting for a run another process trains looks again
PROGRESS_EVERY = 20  # iterations between progress-bar refreshes (each costs one device sync)
# Without a progress bar (output not a terminal, --no-progress, runs trained together), a run logs
# its first epoch, its last, and in between an epoch at most this often, so that a log shows it is alive.
EPOCH_LINE_EVERY_S = 60.0
# `--compile` on CUDA: CUDA graphs (cudagraph trees) remove the launch overhead that dominates these
# thin nets. No "max-autotune": its Triton conv/GEMM search costs minutes of compilation, and these
# nets have one tiny GEMM and 16-64 channel convolutions, where cuDNN is the candidate that wins.
COMPILE_MODE_CUDA = "reduce-overhead"


def compile_model(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` as `--compile` trains it: torch.compile with CUDA graphs on CUDA, and static shapes
    (the epoch's last, partial batch gets its own graph instead of making every batch dynamic).
    The result shares its parameters with `module`."""
    return torch.compile(module, mode=COMPILE_MODE_CUDA if device.type == "cuda" else None, dynamic=False)


def tune_device(device: torch.device) -> None:
    """On CUDA let cuDNN time its algorithms for each new shape (the shapes of a run repeat every
    step). It changes which kernels run, not what they compute beyond float rounding."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class StopRequested(Exception):
    """Raised after a SIGTERM/SIGINT once the run's state is safely on disk."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    """While active, SIGTERM and SIGINT ask the loop to stop after the current step (a second
    signal of the same kind stops at once, the usual escape hatch)."""
    flag = StopFlag()

    def handler(signum: int, frame: object) -> None:
        if flag.signum is not None:
            raise KeyboardInterrupt
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is a one-line error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for but no CUDA GPU is visible; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use --device auto, cpu or cuda") from None


def lr_at(cfg: RunConfig, iteration: int, warming_up: bool) -> float:
    """The paper's step schedule counted in iterations: lr / 10 at each milestone (32k and 48k of
    64k). While a deep net warms up it uses `warmup_lr` (0.01); warm-up ends when the running
    training error drops below 80% or, at the latest, at the first milestone (the paper does not
    say what happens to a net that never gets there; this keeps the schedule from stalling)."""
    decays = sum(iteration >= m for m in cfg.milestone_iterations)
    lr = cfg.lr * 0.1**decays
    if warming_up and decays == 0:
        lr = min(lr, cfg.warmup_lr)
    return lr


class Schedule:
    """The run's learning rate. `step`: `lr_at`, a function of the iteration. `plateau` (ImageNet):
    lr / 10 whenever the evaluation error has not improved by `plateau_threshold` points for more
    than `plateau_patience` epochs, decided by torch's ReduceLROnPlateau at each epoch's end."""

    def __init__(self, cfg: RunConfig, opt: torch.optim.Optimizer) -> None:
        self.cfg = cfg
        self.opt = opt
        self.plateau = None
        if cfg.lr_schedule == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="min", factor=0.1, patience=cfg.plateau_patience,
                threshold=cfg.plateau_threshold, threshold_mode="abs",
            )
        self._plateau_lr = self._group_lr()

    def _group_lr(self) -> float:
        # The scheduler's rate, read once per epoch: under --cuda-graph it is a device tensor, and
        # reading it every step would wait for the device every step.
        return float(self.opt.param_groups[0]["lr"])

    def lr(self, iteration: int, warming_up: bool) -> float:
        if self.plateau is None:
            return lr_at(self.cfg, iteration, warming_up)
        return min(self._plateau_lr, self.cfg.warmup_lr) if warming_up else self._plateau_lr

    def end_epoch(self, eval_error: float) -> None:
        if self.plateau is not None:
            self.plateau.step(eval_error)
            self._plateau_lr = self._group_lr()

    def state_dict(self) -> dict | None:
        return None if self.plateau is None else self.plateau.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """After the optimizer's own state is loaded (the plateau's rate lives in it)."""
        if self.plateau is not None and state is not None:
            self.plateau.load_state_dict(state)
        self._plateau_lr = self._group_lr()


# --- one process's place in a DDP job ------------------------------------------------------------

@dataclass(frozen=True)
class Distributed:
    """This process's rank among `world` processes training one run together (torchrun), or the
    single process. Rank 0 alone writes the run's files."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sync_bn: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def chunks(self, cfg: RunConfig) -> int:
        """How many BN groups this process splits its share of a batch into (see RunConfig.batch_split)."""
        if not self.enabled:
            return cfg.batch_split
        if self.sync_bn:
            if cfg.batch_split != 1:
                raise ConfigError("--sync-bn computes BN over the whole batch; drop --batch-split or --sync-bn")
            return 1
        if cfg.batch_split % self.world:
            raise ConfigError(
                f"with per-device BN, {self.world} processes split each batch into at least {self.world} BN "
                f"groups; pass --batch-split {self.world} (or a multiple), or --sync-bn"
            )
        return cfg.batch_split // self.world


SINGLE = Distributed()


def distributed_from_env(sync_bn: bool = False) -> Distributed:
    """Join the DDP job torchrun (or SLURM via submitit) describes in RANK / WORLD_SIZE /
    LOCAL_RANK / MASTER_ADDR / MASTER_PORT; the single process when WORLD_SIZE is unset or 1.
    NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(sync_bn=sync_bn)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Distributed(rank=rank, world=world, local_rank=local_rank, sync_bn=sync_bn)


def _all_reduce(values: torch.Tensor, ddp: Distributed, op: "dist.ReduceOp" = None) -> torch.Tensor:
    if ddp.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM if op is None else op)
    return values


def _broadcast(value: object, ddp: Distributed) -> object:
    """Rank 0's `value` on every process."""
    if not ddp.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _Follower:
    """A Run seen by a DDP rank other than 0: it reads the run's files but writes nothing."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self.cfg, self.dir = run.cfg, run.dir

    def load_checkpoint(self, log: object = None) -> dict | None:
        return self._run.load_checkpoint()

    def status(self) -> dict:
        return self._run.status()

    # What train_run writes through a Run: nothing, on this rank.
    def prepare(self, *args: object, **kwargs: object) -> None:
        pass

    clean_temporaries = write_metrics = save_checkpoint = set_status = prepare


# --- where batches come from -------------------------------------------------------------------

class _Chunked(nn.Module):
    """Forward a batch as `chunks` equal parts, so each BN normalises with its own part's
    statistics (as on that many devices), and return the concatenated outputs. The BN running
    averages are updated from the first part only, as under DDP, whose buffers are rank 0's: so a
    `--batch-split S` run is the same computation on one device as on S."""

    def __init__(self, model: nn.Module, chunks: int) -> None:
        super().__init__()
        self.model, self.chunks = model, chunks
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = x.chunk(self.chunks)
        outs = [self.model(first)]
        if rest:
            tracking = [bn.track_running_stats for bn in self.bns]
            for bn in self.bns:
                bn.track_running_stats = False  # batch statistics, running averages untouched
            try:
                outs += [self.model(part) for part in rest]
            finally:
                for bn, flag in zip(self.bns, tracking):
                    bn.track_running_stats = flag
        return torch.cat(outs)


class CifarFeed:
    """Batches of a device-resident data set (CIFAR, Fashion-MNIST): one random order per epoch
    and the paper's per-image augmentation, both drawn from the run's generator. Under DDP every
    process draws the same order and augmentation for the whole batch and keeps its own slice, so
    the global batch is exactly the single-process one."""

    def __init__(self, cfg: RunConfig, data: Data, device: torch.device, fmt: torch.memory_format,
                 ddp: Distributed) -> None:
        self.cfg, self.data, self.fmt, self.ddp, self.device = cfg, data, fmt, ddp, device
        self.num_classes, self.in_channels = data.info.num_classes, data.info.in_channels
        self.eval_split = data.eval_split
        self.n_train = len(data.train.labels)

    def start_epoch(self, epoch: int, gen: torch.Generator, partial: dict | None) -> None:
        if partial is None:
            self.order, self.pos = torch.randperm(self.n_train, generator=gen, device=self.device), 0
        else:
            self.order, self.pos = partial["order"].to(self.device), partial["pos"]

    def state(self) -> dict:
        return {"order": self.order, "pos": self.pos}

    def close(self) -> None:
        pass

    def next_batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(this process's augmented input, its labels, the global batch's size), or None at the
        epoch's end."""
        if self.pos >= self.n_train:
            return None
        idx = self.order[self.pos : self.pos + self.cfg.batch_size]
        self.pos += len(idx)
        x_u8, y = self.data.train.images.index_select(0, idx), self.data.train.labels.index_select(0, idx)
        x = augment(normalize(x_u8, self.data.mean), gen).contiguous(memory_format=self.fmt)
        if self.ddp.enabled:
            x, y = x.tensor_split(self.ddp.world)[self.ddp.rank], y.tensor_split(self.ddp.world)[self.ddp.rank]
        return x, y, len(idx)

    def evaluate(self, model: nn.Module, autocast: torch.autocast) -> dict:
        with autocast:
            loss, err = evaluate(model, self.data)
        return {"loss": loss, "error_pct": err}


class ImageNetFeed:
    """Batches from DataLoader workers that decode JPEGs (ImageNet): uint8 crops to the device,
    then mean subtraction and the optional PCA lighting there. Under DDP each process loads its
    own DistributedSampler shard of every global batch."""

    def __init__(self, cfg: RunConfig, data: imagenet.ImageNetData, device: torch.device,
                 fmt: torch.memory_format, ddp: Distributed, workers: int, mean: tuple | torch.Tensor) -> None:
        self.cfg, self.fmt, self.ddp, self.device = cfg, fmt, ddp, device
        self.mean = mean.to(device) if isinstance(mean, torch.Tensor) else mean
        self.num_classes, self.in_channels, self.eval_split = data.num_classes, 3, data.eval_split
        self.loaders = imagenet.loaders_for(data, cfg.batch_size, workers, ddp.enabled, seed=cfg.seed)
        self.lighting = imagenet.Lighting(cfg.lighting).to(device) if cfg.lighting else None

    def start_epoch(self, epoch: int, gen: torch.Generator, partial: dict | None) -> None:
        self.batches = 0 if partial is None else partial["batches"]
        imagenet.set_epoch(self.loaders.train, epoch, skip_batches=self.batches)
        # The lighting draws: per process and epoch, like the workers' crops (set_epoch).
        gen.manual_seed(((self.cfg.seed * 1_000_003 + self.ddp.rank) * 1_000_003 + epoch) % 2**63)
        self.it = iter(self.loaders.train)

    def state(self) -> dict:
        return {"batches": self.batches}

    def close(self) -> None:
        """Stop the epoch's DataLoader workers now, not whenever the iterator is collected: a worker
        ignores SIGTERM (`_ignore_stop_signals`), so one still alive when the process exits would
        hang multiprocessing's exit, which stops workers with SIGTERM and waits for them."""
        imagenet.shutdown_workers(getattr(self, "it", None))
        self.it = None

    def next_batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        try:
            images, labels = next(self.it)
        except StopIteration:
            return None
        except DataError as e:  # raised in a worker, it arrives with the worker's traceback
            self.close()  # now: the error's traceback keeps the iterator alive (`imagenet.batches`)
            raise imagenet.from_worker(e) from None
        self.batches += 1
        x = imagenet.normalize(images.to(self.device, non_blocking=True), mean=self.mean, lighting=self.lighting,
                               generator=gen)
        y = labels.to(self.device, non_blocking=True)
        # Shards are padded to equal length, so every process's batch has the same size.
        return x.contiguous(memory_format=self.fmt), y, len(y) * self.ddp.world

    def evaluate(self, model: nn.Module, autocast: torch.autocast) -> dict:
        result = imagenet.evaluate(model, self.loaders.val, self.device, mean=self.mean,
                                   autocast=self.cfg.precision == "bf16")
        return {"loss": result.loss, "error_pct": result.top1, "top5_error_pct": result.top5}


@torch.no_grad()
def lay_out_like_params(opt: torch.optim.Optimizer) -> None:
    """Give every momentum buffer its parameter's memory layout. A loaded buffer keeps the layout
    it was saved with: a run checkpointed with contiguous weights (on the CPU) and resumed with
    channels-last ones (on a GPU) would otherwise fail in the fused SGD of `--cuda-graph`, which
    refuses mismatched strides, and take the slow path of the eager one."""
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None and buf.stride() != p.stride():
                opt.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Data) -> tuple[float, float]:
    """Mean loss and error % over the whole evaluation split, BN in eval mode, no augmentation."""
    model.eval()
    loss_sum = torch.zeros((), device=data.mean.device)
    wrong = torch.zeros((), device=data.mean.device, dtype=torch.long)
    for x, y in eval_batches(data.eval, EVAL_BATCH_SIZE):
        out = model(normalize(x, data.mean))
        loss_sum += F.cross_entropy(out, y, reduction="sum")
        wrong += (out.argmax(1) != y).sum()
    n = len(data.eval.labels)
    return loss_sum.item() / n, 100.0 * wrong.item() / n


def sgd_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    autocast: torch.autocast,
    *,
    loss_scale: float | None = None,
    before_update: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step at `lr` on an input batch: forward (under `autocast`), cross-entropy, backward,
    update. The loss is the batch mean, or with `loss_scale` the summed loss times it (DDP: a
    process's share of the global batch's mean, which DDP's gradient averaging completes).
    `before_update` runs between backward and the update (to read the gradients). Returns the
    detached mean loss and logits; nothing here waits for the device."""
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast:
        out = forward(x)
        if loss_scale is None:
            loss = F.cross_entropy(out, y)
            mean = loss
        else:
            total = F.cross_entropy(out, y, reduction="sum")
            loss, mean = total * loss_scale, total.detach() / len(y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if before_update is not None:
        before_update()
    opt.step()
    return mean.detach(), out.detach()


def _metric_row(cfg: RunConfig, **values: object) -> dict:
    return {
        "run_id": cfg.run_id,
        "dataset": cfg.dataset,
        "arch": cfg.arch,
        "depth": cfg.depth,
        "shortcut": cfg.shortcut,
        "seed": cfg.seed,
        **values,
    }


def train_run(*args: Any, **kwargs: Any) -> str:
    """Train (or resume) one run to completion: `train_steps` (same arguments) driven to its end.
    Returns the run's final status: `done` or `diverged`."""
    if kwargs.get("fuse"):
        raise ValueError("a fused run's steps are done by a Fuser: train it with run_all(fuse=K)")
    steps = train_steps(*args, **kwargs)
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value


def train_steps(
    cfg: RunConfig,
    run: Run,
    data: "Data | imagenet.ImageNetData",
    device: torch.device,
    *,
    progress: bool | None = None,
    stop: StopFlag | None = None,
    log: Callable[[str], None] = _stderr,
    compile: bool = False,
    cuda_graph: bool = False,
    gradient_every: int = GRADIENT_EVERY,
    ddp: Distributed = SINGLE,
    workers: int = 0,
    checkpoint_every: int | None = None,
    fuse: bool = False,
) -> Generator["None | Join | StepRequest", Any, str]:
    """Train (or resume) one run, yielding after every training step; its return value (that of
    the StopIteration) is the run's final status: `done` or `diverged`. `train_run` drives it to the
    end; `_interleave` interleaves several runs' steps.

    `data` is a device-resident `Data` (already on `device`) or, for ImageNet, the scanned folders
    (`imagenet.ImageNetData`, loaded by `workers` DataLoader workers). The caller should hold
    `run.lock()`. A SIGTERM/SIGINT recorded in `stop` ends the run after the current step with a
    checkpoint and raises StopRequested; any other exception marks the run `failed` and propagates.
    `checkpoint_every` N also writes a mid-epoch checkpoint every N iterations (long ImageNet
    epochs on preemptible clusters). `cuda_graph` replays each step as one CUDA graph
    (`study.graphstep`; one process, CIFAR-style data, no BN split, not with `compile`); on CPU the
    same step runs uncaptured. Under DDP (`ddp`) every process calls this with the same
    arguments; rank 0 alone writes.

    With `fuse` the step is done by whoever drives the generator (`_interleave` with a
    `study.fused.Fuser`, which trains several runs as one grouped net): it first yields a `Join`
    with the run's model and optimizer, then a `StepRequest` for each step, to which it expects
    the step's (loss, logits, gradient norms) to be sent.
    """
    if not ddp.writer:
        run = _Follower(run)  # type: ignore[assignment]
    chunks = ddp.chunks(cfg)
    if cuda_graph:
        check_cuda_graph([cfg], compile=compile, processes=ddp.world)
    if fuse:
        check_fuse([cfg], compile=compile, processes=ddp.world)
    step_kind = "cuda-graph" if cuda_graph else "compiled" if compile else "eager"
    step_kind = f"fused-{step_kind}" if fuse else step_kind
    classes = data.num_classes if isinstance(data, imagenet.ImageNetData) else data.info.num_classes
    run.prepare(str(device), processes=ddp.world, step=step_kind, classes=classes,
                **({"backend": dist.get_backend(), "sync_bn": ddp.sync_bn} if ddp.enabled else {}))
    run.clean_temporaries()
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    if isinstance(data, imagenet.ImageNetData):
        mean = data.mean_for(cfg.mean, run.dir.parent, **_pixel_mean_options(workers, device, ddp, progress, log))
        feed: CifarFeed | ImageNetFeed = ImageNetFeed(cfg, data, device, fmt, ddp, workers, mean)
    else:
        feed = CifarFeed(cfg, data, device, fmt, ddp)
    torch.manual_seed(cfg.seed)  # the model's initial weights depend on the seed alone
    model = build_model(
        cfg.arch,
        cfg.depth,
        shortcut=cfg.shortcut,
        num_classes=feed.num_classes,
        in_channels=feed.in_channels,
        dataset=cfg.dataset,
    ).to(device)
    # Channels-last lets cuDNN pick its fastest kernels on tensor cores; on CPU it buys nothing.
    model = model.to(memory_format=fmt)
    if ddp.sync_bn and ddp.enabled:
        model = convert_sync_batchnorm(model, device)  # same parameter and buffer names
    # `model` is what checkpoints hold and evaluation uses; `trained` adds the BN split and DDP.
    trained: nn.Module = model if chunks == 1 else _Chunked(model, chunks)
    if ddp.enabled:
        trained = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    # The compiled module shares its parameters with `model`; checkpoints keep using `model`, so
    # they load with or without --compile. Compilation happens on the first step at each batch
    # size; the metrics' warmup_s says how much of elapsed_s that was (`study.warmup`).
    tune_device(device)
    forward = compile_model(trained, device) if compile else trained
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = Schedule(cfg, opt)
    # One generator drives the data order and the augmentation, so both resume exactly.
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    iteration, epoch, elapsed_before, warming_up = 0, 0, 0.0, cfg.uses_warmup
    warmup_before = 0.0  # seconds of one-time warm-up work in elapsed_before (`study.warmup`)
    rows: list[dict] = []
    partial = None  # the state of an epoch interrupted by a signal
    # Mean loss over the whole batch: single process, one BN group (the original, fastest form);
    # otherwise each process's summed loss scaled to its share of the global mean.
    exact_mean = not ddp.enabled and chunks == 1

    ckpt = run.load_checkpoint(log=log)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        lay_out_like_params(opt)
        for group in opt.param_groups:  # a --cuda-graph checkpoint's fused SGD and tensor lr
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"])  # the plateau schedule's current rate: keep it
            group.update(fused=None, foreach=None)
        gen.set_state(ckpt["generator"])
        schedule.load_state_dict(ckpt.get("schedule"))
        iteration, epoch = ckpt["iteration"], ckpt["epoch"]
        elapsed_before, warming_up = ckpt["elapsed_s"], ckpt["warming_up"]
        warmup_before = ckpt.get("warmup_s", 0.0)  # absent from checkpoints of before it was kept
        rows, partial = list(ckpt["metrics"]), ckpt["partial_epoch"]
        if ddp.writer and iteration < cfg.iterations:
            log(f"{cfg.run_id}: resuming from its checkpoint at iteration {iteration:,} of {cfg.iterations:,}")
    # The checkpoint holds every row so far: rewriting the file from it drops rows written after
    # the checkpoint (a kill between the two writes) and repairs an unreadable file.
    run.write_metrics(rows)
    if ddp.writer:
        truncate_gradients(run, iteration)
    # Per-layer gradient norms every `gradient_every` iterations (kept on the device until the
    # epoch ends): evidence for the paper's claim that plain nets do not suffer vanishing gradients.
    grad_norms = GradientNorms(model, every=gradient_every)
    graphed = GraphedStep(model, opt, [w for _, w in grad_norms.params], bf16=cfg.precision == "bf16",
                          device=device, log=log) if cuda_graph and not fuse else None
    if iteration >= cfg.iterations:
        run.set_status("done", iteration=iteration, epoch=epoch)
        return "done"
    joined = None
    if fuse:
        joined = Join(model, opt, [name for name, _ in grad_norms.params], fusion_key(cfg, model),
                      bf16=cfg.precision == "bf16", name=cfg.run_id)
        yield joined

    def checkpoint(partial_epoch: dict | None) -> None:
        # A fused run's tensors are views of its group's: saved as they are, each would carry the
        # whole group's storage.
        owned = _owned if fuse else (lambda state: state)
        run.save_checkpoint(
            {
                "model": owned(model.state_dict()),
                "optimizer": owned(opt.state_dict()),
                "generator": gen.get_state(),
                "schedule": schedule.state_dict(),
                "iteration": iteration,
                "epoch": epoch,  # completed epochs
                "elapsed_s": elapsed_before + time.perf_counter() - start,
                "warmup_s": warmup_s(),
                "warming_up": warming_up,
                "metrics": rows,
                "partial_epoch": partial_epoch,
            }
        )

    def save_gradients() -> None:
        if ddp.writer:
            append_gradients(run, grad_norms.rows(cfg.run_id))

    show = ddp.writer and (sys.stderr.isatty() if progress is None else progress)
    bar = tqdm(
        total=cfg.iterations, initial=iteration, desc=cfg.run_id, disable=not show, dynamic_ncols=True, leave=False
    )
    start, warmup_start = time.perf_counter(), warmup.total()
    # Steps this session of the run has taken at each batch size. The first is warm-up
    # (compiling, cuDNN's autotuning); compiled on CUDA (reduce-overhead) so is the second, which
    # records the CUDA graph that later steps replay.
    stepped: Counter[int] = Counter()
    warmup_steps = 2 if compile and device.type == "cuda" else 1

    def warmup_s() -> float:
        return warmup_before + warmup.total() - warmup_start

    run.set_status("running", iteration=iteration, epoch=epoch)
    last_line = None  # when this session last logged an epoch line
    try:
        while iteration < cfg.iterations:
            trained.train()
            feed.start_epoch(epoch, gen, partial)
            if partial is None:
                seen = 0
                # Sums stay on the device: no host sync per step.
                loss_sum = torch.zeros((), device=device)
                wrong = torch.zeros((), device=device, dtype=torch.long)
                # -1 until a step's loss is not finite, then that step's iteration number.
                first_bad = torch.full((), -1, device=device, dtype=torch.long)
            else:
                seen = partial["seen"]
                loss_sum, wrong = partial["loss_sum"].to(device), partial["wrong"].to(device)
                first_bad = partial["first_bad"].to(device)
                if not ddp.writer:  # the checkpoint's sums are the whole job's; rank 0 carries them
                    seen, loss_sum, wrong = 0, torch.zeros_like(loss_sum), torch.zeros_like(wrong)
                partial = None

            def job_sums() -> torch.Tensor:
                """(loss sum, wrong, seen) of the epoch so far, summed over all processes."""
                seen_t = torch.tensor(float(seen), device=device, dtype=torch.float64)
                return _all_reduce(torch.stack([loss_sum.double(), wrong.double(), seen_t]), ddp)

            def epoch_state() -> dict:
                """The interrupted epoch's state; its running sums over all processes (every
                process calls this at the same step)."""
                if not ddp.enabled:
                    return {**feed.state(), "seen": seen, "loss_sum": loss_sum, "wrong": wrong, "first_bad": first_bad}
                total = job_sums()
                return {**feed.state(), "seen": int(total[2].item()), "loss_sum": total[0].to(loss_sum.dtype),
                        "wrong": total[1].round().to(wrong.dtype),
                        "first_bad": _all_reduce(first_bad.clone(), ddp, dist.ReduceOp.MAX)}

            while iteration < cfg.iterations:
                batch = feed.next_batch(gen)
                if batch is None:
                    break
                x, y, global_len = batch
                lr = schedule.lr(iteration, warming_up)
                if fuse:
                    for group in opt.param_groups:  # what the checkpoint records
                        group["lr"] = lr
                    loss, out, norms = yield StepRequest(x, y, lr, norms=grad_norms.due(iteration + 1))
                    if norms is not None:
                        grad_norms.record(iteration + 1, norms)
                elif graphed is not None:
                    loss, out, norms = graphed.step(x, y, lr, norms=grad_norms.due(iteration + 1))
                    if norms is not None:
                        grad_norms.record(iteration + 1, norms)
                else:
                    with warmup.timed(device, stepped[len(y)] < warmup_steps):
                        loss, out = sgd_step(
                            forward, opt, x, y, lr, autocast,
                            loss_scale=None if exact_mean else ddp.world / global_len,
                            before_update=lambda: grad_norms.maybe_record(iteration + 1),
                        )
                    stepped[len(y)] += 1
                iteration += 1
                loss_sum += loss * len(y)
                wrong += (out.argmax(1) != y).sum()
                seen += len(y)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), iteration, first_bad)
                if warming_up:
                    # The whole batch's running error, agreed by all processes.
                    if ddp.enabled:
                        _, wrong_all, seen_all = job_sums().tolist()
                        running_err = 100.0 * wrong_all / seen_all
                    else:
                        running_err = 100.0 * wrong.item() / seen  # one host sync per warm-up step
                    if running_err < cfg.warmup_until_error or (
                        iteration >= cfg.milestone_iterations[0] and cfg.lr_schedule == "step"
                    ):
                        warming_up = False
                if show and iteration % PROGRESS_EVERY == 0:
                    bar.update(iteration - bar.n)
                    bar.set_postfix(lr=f"{lr:g}", err=f"{100.0 * wrong.item() / seen:.1f}%")
                if _stop_requested(stop, ddp, iteration):
                    save_gradients()
                    checkpoint(epoch_state())
                    signum = stop.signum if stop is not None and stop.signum is not None else signal.SIGTERM
                    run.set_status("interrupted", iteration=iteration, epoch=epoch, signal=signal.Signals(signum).name)
                    raise StopRequested(signum)
                if checkpoint_every and iteration % checkpoint_every == 0:
                    save_gradients()
                    checkpoint(epoch_state())
                if not fuse:  # a fused run has yielded its step's request
                    yield
            # End of an epoch, or of a shortened run inside one (that partial epoch is logged too).
            epoch += 1
            sums = job_sums().tolist()
            first_bad = _all_reduce(first_bad, ddp, dist.ReduceOp.MAX if ddp.enabled else None)
            train_loss, train_err = sums[0] / sums[2], 100.0 * sums[1] / sums[2]
            if ddp.enabled:  # every process evaluates rank 0's BN statistics (the checkpoint's)
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=0)
            evaluated = feed.evaluate(model, autocast)
            schedule.end_epoch(evaluated["error_pct"])
            common = dict(epoch=epoch, iteration=iteration, lr=lr, elapsed_s=elapsed_before + time.perf_counter() - start,
                          warmup_s=warmup_s())
            rows += [
                _metric_row(cfg, split="train", loss=train_loss, error_pct=train_err, **common),
                _metric_row(cfg, split=feed.eval_split, **evaluated, **common),
            ]
            run.write_metrics(rows)
            save_gradients()
            bad_at = int(first_bad.item())
            if bad_at >= 0:
                # Keep the last good checkpoint; the rows show the epoch it happened in.
                run.set_status("diverged", iteration=bad_at, epoch=epoch)
                if ddp.writer:
                    log(f"{cfg.run_id}: loss is not finite at iteration {bad_at}; marked diverged")
                return "diverged"
            checkpoint(None)
            eval_err = evaluated["error_pct"]
            run.set_status("running", iteration=iteration, epoch=epoch, train_error=train_err, eval_error=eval_err)
            bar.update(iteration - bar.n)
            now = time.perf_counter()
            if not show and ddp.writer and (last_line is None or now - last_line >= EPOCH_LINE_EVERY_S
                                            or iteration >= cfg.iterations):
                last_line = now
                log(f"{cfg.run_id}: epoch {epoch}, iteration {iteration:,} of {cfg.iterations:,}: train error "
                    f"{train_err:.2f}%, {feed.eval_split} error {eval_err:.2f}%, lr {lr:g}, {common['elapsed_s']:.0f} s")
    except StopRequested:
        raise
    except KeyboardInterrupt:
        run.set_status("interrupted", iteration=iteration, epoch=epoch)
        raise
    except Exception as e:
        run.set_status("failed", iteration=iteration, epoch=epoch, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        bar.close()
        feed.close()
    # Figure 7's layer responses, measured once on the finished model (defaults: eval split, BN in
    # eval mode, std over the whole tensor, first conv excluded; `study probe` re-measures).
    # Figure 7 is a CIFAR figure; ImageNet runs skip it.
    if ddp.writer and isinstance(feed, CifarFeed):
        record_responses(run, model, data, iteration=iteration, split=data.eval_split)
    # A --cuda-graph run whose capture failed trained eagerly (same steps, slower): say so.
    fallback_reason = graphed.fallback if graphed is not None else joined.fallback if joined is not None else None
    fallback = {"cuda_graph_fallback": fallback_reason} if cuda_graph and fallback_reason else {}
    run.set_status("done", iteration=iteration, epoch=epoch, train_error=train_err, eval_error=eval_err, **fallback)
    return "done"


train_run.__signature__ = inspect.signature(train_steps).replace(return_annotation=str)  # type: ignore[attr-defined]


def _stop_requested(stop: StopFlag | None, ddp: Distributed, iteration: int) -> bool:
    """Whether to stop after this step. A single process checks its flag every step; DDP processes
    agree every PROGRESS_EVERY steps (one tiny all-reduce), so that they all stop at one step."""
    local = stop is not None and stop.signum is not None
    if not ddp.enabled:
        return local
    if iteration % PROGRESS_EVERY:
        return False
    flag = torch.tensor([1.0 if local else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


IMAGENET_CHECKPOINT_EVERY = 1000  # iterations between mid-epoch checkpoints of an ImageNet run


def default_workers() -> int:
    """DataLoader workers per process for ImageNet: the CPUs this process may use, at most 12."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(12, cpus))


def _owned(state: Any) -> Any:
    """`state` with each tensor that is a view into a larger storage replaced by its own copy."""
    if isinstance(state, torch.Tensor):
        return state.clone() if state.untyped_storage().nbytes() > state.numel() * state.element_size() else state
    if isinstance(state, dict):
        return {k: _owned(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_owned(v) for v in state)
    return state


def check_fuse(configs: list[RunConfig], *, compile: bool, processes: int) -> None:
    """`--fuse`'s requirements that do not depend on the device, before any run starts."""
    if compile:
        raise ConfigError("--fuse with --compile is not supported; use --fuse with --cuda-graph on a GPU")
    _check_one_process_cifar_step("--fuse", configs, processes)


def check_cuda_graph(configs: list[RunConfig], *, compile: bool, processes: int) -> None:
    """`--cuda-graph`'s requirements that do not depend on the device (also checked when a SLURM
    job array is submitted), before any run starts."""
    if compile:
        raise ConfigError("--cuda-graph and --compile are two ways to remove launch overhead; pick one")
    _check_one_process_cifar_step("--cuda-graph", configs, processes)


def _check_one_process_cifar_step(flag: str, configs: list[RunConfig], processes: int) -> None:
    """What `flag`'s step needs: one process, the CIFAR-style nets, whole batches in one BN group."""
    if processes > 1:
        raise ConfigError(f"{flag} trains a run in one process; drop it under torchrun or --gpus-per-run > 1")
    for cfg in configs:
        if cfg.imagenet:
            raise ConfigError(f"{flag} is for the CIFAR-style data sets; {cfg.run_id} is ImageNet, drop it")
        if cfg.batch_split > 1:
            raise ConfigError(f"{flag} does not split BN over parts of a batch ({cfg.run_id}); drop one of them")


def run_all(
    configs: Iterable[RunConfig],
    runs_dir: str | Path,
    *,
    data_dir: str | None = None,
    device: str = "auto",
    download: bool = False,
    progress: bool | None = None,
    stop: StopFlag | None = None,
    log: Callable[[str], None] = print,
    concurrency: int | None = 1,
    compile: bool = False,
    cuda_graph: bool = False,
    ddp: Distributed = SINGLE,
    workers: int | None = None,
    streams: int = 1,
    fuse: int = 1,
) -> dict[str, str]:
    """Run each config in turn: skip finished runs, resume unfinished ones, leave runs that another
    process holds to it (waiting for them at the end), and go on after a run diverges or fails.

    `concurrency` K > 1 starts K-1 worker processes that work through the same list beside this
    one, sharing the device: the per-run locks hand each run to exactly one process, and each run
    is still its own run (seed, data order, metrics, checkpoint, resume), computed by the same code
    as when it trains alone. Thin nets leave a GPU mostly idle between kernel launches; several
    processes fill those gaps.

    `streams` S > 1 makes each process train S runs at once, interleaved step by step, each on
    its own CUDA stream (one process launching for several runs; their kernels can overlap on
    the GPU); when one ends, the next takes its place. Each is still its own run, computed by the
    same code as alone.

    `fuse` K > 1 makes each process train K runs at once, fusing those of one network shape into
    one grouped network (`study.fused`): one kernel per layer for all of them. Each is still its
    own run; its arithmetic is the same as alone up to rounding.

    Under DDP (`ddp`, from `distributed_from_env`) every process of the job calls this with the
    same list; they train each run together, rank 0 holding its lock and writing its files.
    ImageNet runs read `data_dir` (default ./data/imagenet) with `workers` DataLoader workers per
    process.

    Every check that can fail on bad input (device, data, runs dir, conflicting run dirs) happens
    before the first run directory is created. Returns {run_id: final status}.
    """
    configs = list(configs)
    if ddp.enabled and concurrency not in (None, 1):
        raise ConfigError("--concurrency shares one device between runs; under torchrun each run uses all processes, drop it")
    if streams < 1:
        raise ConfigError(f"--streams must be at least 1; got {streams}")
    if ddp.enabled and streams > 1:
        raise ConfigError("--streams interleaves runs in one process; under torchrun each run uses all processes, drop it")
    if fuse < 1:
        raise ConfigError(f"--fuse must be at least 1; got {fuse}")
    if fuse > 1 and streams > 1:
        raise ConfigError("--fuse and --streams are two ways to train several runs in one process; pick one")
    if fuse > 1:
        check_fuse(configs, compile=compile, processes=ddp.world)
    if ddp.enabled and device in ("auto", "cuda"):  # one GPU per process: torchrun's LOCAL_RANK
        device = f"cuda:{ddp.local_rank}" if torch.cuda.is_available() or device == "cuda" else "cpu"
    dev = resolve_device(device)
    for cfg in configs:
        ddp.chunks(cfg)  # a batch split the process count cannot honour is an error before any run
    if cuda_graph:
        if dev.type != "cuda":
            raise ConfigError(f"--cuda-graph captures CUDA graphs and needs a GPU (the device is {dev}); drop it")
        check_cuda_graph(configs, compile=compile, processes=ddp.world)
    if streams > 1 and compile and dev.type == "cuda":
        # torch.compile's CUDA graphs share one memory pool that assumes replays in one order on
        # one stream; interleaving compiled runs on several streams is untested.
        raise ConfigError("--streams with --compile is not supported on a GPU; use --streams with --cuda-graph")
    datasets: dict[tuple[str, bool], Data | imagenet.ImageNetData] = {}
    for cfg in configs:
        key = (cfg.dataset, cfg.holdout)
        if key in datasets:
            continue
        if cfg.imagenet:
            datasets[key] = imagenet.open_imagenet(data_dir or os.path.join("data", "imagenet"))
        else:
            datasets[key] = load_data(cfg.dataset, data_dir, holdout=cfg.holdout, download=download).to(dev)
    runs = [Run(runs_dir, cfg) for cfg in configs]
    for run in runs:
        run.check_no_conflict()
    if ddp.writer:
        check_writable(Path(runs_dir))  # last check: it creates the runs dir
    if concurrency is None:  # auto: share a GPU between a few runs (processes, unless --streams), one at a time on a CPU
        auto = dev.type == "cuda" and not ddp.enabled and streams == 1 and fuse == 1
        concurrency = min(AUTO_GPU_CONCURRENCY, len(runs)) if auto else 1
    workers = default_workers() if workers is None else workers
    if any(cfg.imagenet and cfg.mean == "pixel" for cfg in configs):
        # ImageNet's per-pixel mean: one pass over train/ (or the runs dir's cache), here, before
        # any worker process starts, so that they read it rather than each making its own pass.
        for data in datasets.values():
            if isinstance(data, imagenet.ImageNetData):
                data.mean_for("pixel", runs_dir, **_pixel_mean_options(workers, dev, ddp, progress, log))
    _warn_of_long_cpu_runs(runs, dev, log if ddp.writer else _quiet)

    pool = []
    if concurrency > 1:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        kwargs = dict(data_dir=data_dir, device=str(dev), download=False, progress=False, compile=compile,
                      cuda_graph=cuda_graph, workers=workers, streams=streams, fuse=fuse)
        pool = [
            ctx.Process(target=_worker, args=(configs, str(runs_dir), kwargs, f"worker {k}"), daemon=False)
            for k in range(1, concurrency)
        ]
        for w in pool:
            w.start()
    try:
        results = _run_list(runs, datasets, dev, progress=progress, stop=stop, log=log if ddp.writer else _quiet,
                            compile=compile, cuda_graph=cuda_graph, ddp=ddp, workers=workers, streams=streams, fuse=fuse)
    finally:
        for w in pool:
            if w.is_alive() and sys.exc_info()[0] is not None:
                w.terminate()  # SIGTERM: each worker checkpoints its run and exits
            w.join()
    return results


def _quiet(message: str) -> None:
    pass


#: Runs at least this long are hours of work per net on a CPU: `run_all` says so before starting.
CPU_LONG_ITERATIONS = 10_000


def _warn_of_long_cpu_runs(runs: list[Run], dev: torch.device, log: Callable[[str], None]) -> None:
    """One line before long runs start on a CPU (the paper's 64k iterations, say): such a schedule
    is for a GPU, and a new user may not expect it to take hours. Counts the runs with at least
    `CPU_LONG_ITERATIONS` still to train; said once, by the process the user started (not by
    `--concurrency`'s workers)."""
    if dev.type != "cpu" or multiprocessing.parent_process() is not None:
        return
    left = [r.cfg.iterations - int(r.status().get("iteration", 0) or 0) for r in runs if not r.is_finished()]
    long = [n for n in left if n >= CPU_LONG_ITERATIONS]
    if long:
        log(f"note: {len(long)} run(s) with up to {max(long):,} iterations to train on the CPU: hours per run "
            "there; shorten them with --iterations N for a demo (`study run --grid quick`), or train on a GPU")


def _pixel_mean_options(workers: int, device: torch.device, ddp: Distributed, progress: bool | None,
                        log: Callable[[str], None]) -> dict:
    """`imagenet.pixel_mean`'s options for this process: its workers and device, its share under
    DDP, and rank 0 alone showing a bar and logging."""
    return dict(workers=workers, device=device, distributed=ddp.enabled, log=log if ddp.writer else _quiet,
                progress=ddp.writer and (sys.stderr.isatty() if progress is None else progress))


def _worker(configs: list[RunConfig], runs_dir: str, kwargs: dict, name: str) -> None:
    """A concurrent runner (see `run_all`); its own SIGTERM/SIGINT handling checkpoints its run."""
    def log(message: str) -> None:
        print(f"({name}) {message}", flush=True)

    with graceful_stop() as stop:
        try:
            run_all(configs, runs_dir, stop=stop, log=log, **kwargs)
        except (StopRequested, KeyboardInterrupt):
            sys.exit(1)


class _Slot:
    """One run that `_interleave` drives: its key, its steps, its stream, and what to send it next
    (a fused step's result, or the exception its step raised)."""

    __slots__ = ("key", "steps", "stream", "reply")

    def __init__(self, key: Any, steps: Generator, stream: "torch.cuda.Stream | None") -> None:
        self.key, self.steps, self.stream, self.reply = key, steps, stream, None

    def advance(self, fuser: Fuser | None) -> "StepRequest | None":
        """Run the run up to its next yield: after its next step, or (fused) to its next request."""
        reply, self.reply = self.reply, None
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            message = self.steps.throw(reply) if isinstance(reply, BaseException) else self.steps.send(reply)
            while isinstance(message, Join):
                if fuser is None:
                    raise RuntimeError("a fused run needs a Fuser to drive it")
                fuser.join(self, message)
                message = self.steps.send(None)
        return message


def _interleave(
    source: Iterator[tuple[Any, Generator]],
    slots: int,
    dev: torch.device,
    finished: Callable[[Any, "str | Exception"], None],
    fuser: Fuser | None = None,
) -> None:
    """Drive the `train_steps` generators that `source` gives, `slots` at a time, one step each in
    turn; on CUDA with several slots each has its own stream, so that one run's kernels can run
    while the host launches the next run's. With `fuser` (runs made with `fuse=True`) each round
    gathers every run's step request and the fuser does them, group by group, on one stream.
    When one ends, `finished(key, outcome)` gets its final
    status or the exception that ended it (StopRequested included: the stop flag is shared, so
    every run stops after its next step, each with its own checkpoint), and the next from `source`
    takes its slot. KeyboardInterrupt and DataError stop them all: they are thrown into the others
    (which mark themselves interrupted) and raised."""
    several_streams = dev.type == "cuda" and slots > 1 and fuser is None
    free = [torch.cuda.Stream(dev) if several_streams else None for _ in range(slots)]
    active: list[_Slot] = []

    def fill() -> None:
        while len(active) < slots:
            item = next(source, None)
            if item is None:
                return
            stream = free.pop()
            if stream is not None:  # the data set was put on the device on the current stream
                stream.wait_stream(torch.cuda.current_stream(dev))
            active.append(_Slot(*item, stream))

    try:
        fill()
        while active:
            requests: dict[_Slot, StepRequest] = {}
            if fuser is not None:
                fuser.begin_round()
            queue = list(active)
            while queue:
                slot = queue.pop(0)
                outcome: str | Exception
                try:
                    request = slot.advance(fuser)
                    if fuser is not None:
                        requests[slot] = request
                    continue
                except StopIteration as done:
                    outcome = done.value
                except DataError:
                    raise  # bad data would fail every run
                except Exception as e:  # one broken run must not take the others down
                    outcome = e
                    if slots > 1:  # free the failed run's model and graphs now
                        traceback.clear_frames(e.__traceback__)
                active.remove(slot)
                if fuser is not None:
                    fuser.leave(slot)
                if slot.stream is not None:
                    torch.cuda.current_stream(dev).wait_stream(slot.stream)
                free.append(slot.stream)
                finished(slot.key, outcome)
                filled = len(active)
                fill()
                if fuser is not None:  # a run taking the slot joins this round: one re-forming, not two
                    queue.extend(active[filled:])
            if requests:
                for slot, result in fuser.step(requests).items():
                    slot.reply = result
    except BaseException:
        for slot in active:
            try:
                slot.steps.throw(KeyboardInterrupt)
            except BaseException:  # noqa: BLE001 - each marks itself interrupted and re-raises
                pass
        raise
    finally:
        if fuser is not None:
            fuser.close()
        for stream in [*free, *(slot.stream for slot in active)]:
            if stream is not None:
                torch.cuda.current_stream(dev).wait_stream(stream)


def _run_list(
    runs: list[Run],
    datasets: dict[tuple[str, bool], "Data | imagenet.ImageNetData"],
    dev: torch.device,
    *,
    progress: bool | None,
    stop: StopFlag | None,
    log: Callable[[str], None],
    compile: bool,
    cuda_graph: bool = False,
    ddp: Distributed = SINGLE,
    workers: int = 0,
    streams: int = 1,
    fuse: int = 1,
) -> dict[str, str]:
    """Train the runs this process gets the locks of, `streams` at a time (interleaved step by
    step, `_interleave`; a run that ends makes room for the next) or `fuse` at a time (fused into
    grouped nets where their shapes agree), then wait for those held elsewhere and train them."""
    results: dict[str, str] = {}
    total = len(runs)
    locks: dict[str, ExitStack] = {}  # the runs being trained here
    stopped: list[StopRequested] = []

    def claim(i: int, run: Run, wait: bool) -> ExitStack | bool | None:
        """Lock `run` to train it here: the ExitStack holding its lock; True if it is finished
        (recorded as such), False if another process holds it, None if a signal came while
        waiting for it. Under DDP rank 0 takes the lock (waiting for it) and tells the others
        what it found."""
        tag = f"[{i}/{total}] {run.cfg.run_id}"
        lock = ExitStack()
        if wait and not ddp.enabled and stop is not None:
            # Wait for the other process by polling, so that a Ctrl-C or SIGTERM meanwhile stops
            # this one at once (a blocking flock would sit through it, then train a step).
            while not lock.enter_context(run.lock(wait=False)):
                lock.close()
                if stop.signum is not None:
                    return None
                time.sleep(LOCK_POLL_S)
            held = True
        else:
            held = lock.enter_context(run.lock(wait=wait or ddp.enabled) if ddp.writer else nullcontext(True))
        status = run.status()["status"] if held else None
        # A run that failed in another process is left failed (not trained twice); one whose
        # process died resumes here.
        finished = held and (run.is_finished() or (wait and status == "failed"))
        held, status, finished = _broadcast((held, status, finished), ddp)
        if not held or finished:
            lock.close()
            if not held:
                log(f"{tag}: held by another process; will wait for it at the end")
                return False
            results[run.cfg.run_id] = status
            log(f"{tag}: {status}, skipped")
            return True
        return lock

    def claimed(pending: list[tuple[int, Run]], wait: bool, held_elsewhere: list[tuple[int, Run]]
                ) -> Iterator[tuple[tuple[int, Run], Generator[None, None, str]]]:
        """The runs of `pending` this process locks, each with its training steps; no new ones
        once a run has stopped on a signal (under DDP all processes agree on that; a single
        process also stops at its own flag)."""
        for i, run in pending:
            if stopped:
                return
            if not ddp.enabled and stop is not None and stop.signum is not None:
                stopped.append(StopRequested(stop.signum))  # a signal between runs stops the list too
                return
            lock = claim(i, run, wait)
            if lock is None:
                stopped.append(StopRequested(stop.signum))
                return
            if lock is False:
                held_elsewhere.append((i, run))
                continue
            if lock is True:
                continue
            locks[run.cfg.run_id] = lock
            where = f"{dev}" + (f" x {ddp.world} processes (DDP)" if ddp.enabled else "")
            where += f", interleaved with up to {streams - 1} other run(s)" if streams > 1 else ""
            where += f", to be fused with runs of its shape (up to {fuse} at once)" if fuse > 1 else ""
            log(f"[{i}/{total}] {run.cfg.run_id}: training on {where}")
            yield (i, run), train_steps(
                run.cfg, run, datasets[(run.cfg.dataset, run.cfg.holdout)], dev,
                progress=progress if streams == fuse == 1 else False, stop=fuser.stop_latch if fuser else stop,
                compile=compile, cuda_graph=cuda_graph, fuse=fuse > 1,
                ddp=ddp, workers=workers, checkpoint_every=IMAGENET_CHECKPOINT_EVERY if run.cfg.imagenet else None,
            )

    def finished(key: tuple[int, Run], outcome: str | Exception) -> None:
        i, run = key
        locks.pop(run.cfg.run_id).close()
        tag = f"[{i}/{total}] {run.cfg.run_id}"
        if isinstance(outcome, StopRequested):
            stopped.append(outcome)
        elif isinstance(outcome, Exception):
            if ddp.enabled:
                raise outcome  # the other processes cannot carry on alone
            results[run.cfg.run_id] = "failed"
            log(f"{tag}: failed ({type(outcome).__name__}: {outcome})")
        else:
            results[run.cfg.run_id] = outcome
            if ddp.writer:
                last = run.read_metrics().groupby("split", sort=False)["error_pct"].last()
                errors = ", ".join(f"{split} {error:.2f}%" for split, error in last.items())
                log(f"{tag}: {outcome}" + (f" (final error: {errors})" if errors else ""))

    held_elsewhere: list[tuple[int, Run]] = []
    try:
        pending = list(enumerate(runs, 1))
        if fuse > 1:  # runs that can be fused next to each other (seeds of one net, twins), else in order
            pending.sort(key=lambda item: fusion_order(item[1].cfg))
        fuser = Fuser(dev, capture=cuda_graph, log=log, stop=stop) if fuse > 1 else None
        _interleave(claimed(pending, False, held_elsewhere), max(streams, fuse), dev, finished, fuser)
        if not stopped:  # this process's own runs are done: wait for the others', in order, one
            # at a time (a run mid-training must not sit idle while the next claim waits for a lock)
            fuser = Fuser(dev, capture=cuda_graph, log=log, stop=stop) if fuse > 1 else None
            _interleave(claimed(held_elsewhere, True, []), 1, dev, finished, fuser)
    finally:
        for lock in locks.values():
            lock.close()
    if stopped:
        raise stopped[0]
    return results
