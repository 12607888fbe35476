"""Training throughput of the degradation grid: a common-reproduction pipeline against our fast path.

In one process and one run, on synthetic uint8 data of CIFAR-10's shape (50,000 training images),
measures training images/s of every net of the grid (plain and residual at each depth) for

- (a) reference: what the common reproductions do. A torchvision-style CIFAR Dataset that makes a
  PIL image per sample, `RandomCrop(32, padding=4)`, `RandomHorizontalFlip`, `ToTensor`,
  `Normalize`, a `DataLoader` (shuffle, 4 workers, pinned memory on CUDA), eager fp32 in the default
  memory format, cuDNN autotuning on, one net at a time, a plain SGD step and the usual per-step
  logging of loss and top-1 (`.item()`, one host sync per step);
- (b) fast, one run: the per-step work of `study.train.train_steps`: the whole uint8 set on the device,
  `study.train.feeds.CifarFeed`'s batches, and `study.train.sgd_step` (the loop's own step), the paper's schedule
  (`lr_at`), channels-last and bf16 autocast on CUDA (`--precision`), running sums kept on the device;
- (c) fast, concurrent grid: K processes (`--concurrency`, as `study run --concurrency K`), each
  training a different net of the grid with (b) at the same time;
- (d), CUDA only (`--no-graph` skips it): (b) as `study run --cuda-graph` trains, each whole step
  replayed as one CUDA graph (`study.fast.graphstep.GraphedStep`), one net at a time;
- (e), CUDA only, if (d) worked for every net: (d) in K processes at once, as (c);
- (f), likewise: K nets at a time trained by this one process, interleaved step by step, each on
  its own CUDA stream, with (d)'s step (`study run --streams K --cuda-graph`);
- (g) for each width W of `--fuse` (CUDA 2,10; CPU 2): each depth's nets fused W at a time into one
  grouped network (`study.fast.fused`, as `study run --fuse W` trains them; on CUDA with
  `--cuda-graph`'s capture): W = 2 is a plain net and its residual twin, W = 10 five seeds of each
  (the five-seed study). Its projected minutes are per seed's grid;
- (h), with W = 2: those pairs in K processes at once, as (c) (`study run --fuse 2 --concurrency K`).

The grid figure of (a) and (b) is the whole grid trained one net after another with equal
iterations per net: total images / total time. For (c) the grid is cut, in the grid's own order
(plain20, resnet20, plain32, ...), into rounds of K nets that start together; a round's wall time is
its slowest net's, so this is slightly pessimistic (`run_all`'s workers take the next run as soon as
they are free). From the grid figures it projects minutes for the paper's schedule (64k iterations of
128 images per net) and model FLOP utilisation, 6 x MACs x images/s over a bf16 (CUDA) or fp32 (CPU)
matrix-multiply peak measured here.

Timing: after warm-up steps, `--repeats` windows of `--steps` steps, CUDA events (after a sync) on
CUDA and perf_counter on CPU; figures are medians over the windows. (c) is timed by wall clock
between barriers that every process reaches only after synchronising its device.

    python benchmarks/grid_throughput.py                     # CPU: small defaults, about a minute
    python benchmarks/grid_throughput.py --out benchmarks/results/grid_throughput_h100.json
    python benchmarks/grid_throughput.py --compile           # (b), (c) as `study run --compile` trains
    python benchmarks/grid_throughput.py --no-graph          # without (d), (e) and (f)
    python benchmarks/grid_throughput.py --fuse 0            # without (g)

Defaults depend on the device. CUDA: depths 20,32,44,56,110, batch 128, 20 warm-up and 3 x 100
timed steps, 4 loader workers, concurrency 4, bf16. CPU: depths 20,56, batch 32, 1 warm-up and 2 x 2
timed steps, 2 loader workers, concurrency 2, fp32: a smoke test that anyone can run, whose figures say
little. On CPU every process of the benchmark computes with cores / K threads, (a) and (b) included: two
threads on a busy 2-core machine (or beside the loader's workers) can be ten times slower than one, and
equal threads keep (a), (b) and each of (c)'s processes comparable; (c) then uses K times the cores,
and its model FLOP utilisation is against K times the measured peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import queue
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from study.config import PAPER_BATCH_SIZE, PAPER_ITERATIONS, PRECISIONS, RunConfig
from study.data import Data, Split, dataset_info
from study.data.sources import pixel_mean
from study.models import build_model, count_macs, count_params, memory_format
from study.fast.fused import FusedNets, Join, fusion_key
from study.fast.graphstep import EAGER_STEPS_BEFORE_CAPTURE, GraphedStep
from study.probes import GradientNorms
from study.train import AUTO_GPU_CONCURRENCY, compile_model, lr_at, resolve_device, sgd_step, tune_device
from study.train.distributed import SINGLE
from study.train.feeds import CifarFeed

TRAIN_SIZE = 50_000  # CIFAR-10's training set
# The per-channel statistics every torchvision CIFAR recipe normalises with.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
BARRIER_TIMEOUT_S = 900  # a worker that has not reached a barrier by then has hung or died

# Per-device defaults: on CPU the benchmark must finish in about a minute on 2 cores.
DEFAULTS = {
    "cuda": {"depths": "20,32,44,56,110", "batch_size": 128, "warmup": 20, "steps": 100, "repeats": 3,
             "workers": 4, "concurrency": AUTO_GPU_CONCURRENCY, "precision": "bf16", "fuse": "2,10"},
    "cpu": {"depths": "20,56", "batch_size": 32, "warmup": 1, "steps": 2, "repeats": 2,
            "workers": 2, "concurrency": 2, "precision": "fp32", "fuse": "2"},
}


# --- data --------------------------------------------------------------------------------------

def synthetic_cifar(n: int = TRAIN_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images (n, 32, 32, 3), stored like torchvision's CIFAR10.data, and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.int64)


def device_data(images_hwc: np.ndarray, labels: np.ndarray, device: torch.device) -> Data:
    """The same images as our training loop holds them: uint8 (N, C, H, W) on the device."""
    images = torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous()
    train = Split(images, torch.from_numpy(labels))
    # The step never evaluates; a small eval split keeps the Data well formed.
    return Data(dataset_info("cifar10"), train, Split(images[:1000], train.labels[:1000]), "test",
                pixel_mean(images)).to(device)


class PILCifar(Dataset):
    """What torchvision.datasets.CIFAR10 does per sample: an HWC uint8 array row becomes a PIL image,
    then the transform runs on it."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def reference_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, workers: int,
                     cuda: bool) -> DataLoader:
    """The common recipe's training loader. Workers persist across epochs and nets, so their start
    (paid once per run in a real reproduction) is not timed."""
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])
    return DataLoader(PILCifar(images, labels, transform), batch_size=batch_size, shuffle=True,
                      num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0)


def forever(epochs: Callable[[], Iterable]) -> Iterator:
    """Batches epoch after epoch; ``epochs()`` starts a fresh epoch."""
    while True:
        yield from epochs()


def feed_batches(cfg: RunConfig, data: Data, device: torch.device, gen: torch.Generator) -> Iterator:
    """The loop's own batches (`CifarFeed`: the epoch's order and the augmentation drawn from
    ``gen``, normalised, in the device's memory format), epoch after epoch."""
    feed, epoch = CifarFeed(cfg, data, device, SINGLE), 0
    while True:
        feed.start_epoch(epoch, gen, None)
        while (batch := feed.next_batch(gen)) is not None:
            yield batch[0], batch[1]
        epoch += 1


# --- the two training steps ----------------------------------------------------------------------

def make_reference_step(arch: str, depth: int, batches: Iterator, device: torch.device) -> Callable[[], int]:
    """One step of the common recipe; returns the batch's image count."""
    torch.manual_seed(0)
    model = build_model(arch, depth).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step() -> int:
        images, target = next(batches)
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = model(images)
        loss = F.cross_entropy(output, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        # The recipes' AverageMeter logging: a host sync per step.
        loss.item()
        (output.argmax(1) == target).float().mean().item()
        return len(target)

    return step


def make_fast_step(cfg: RunConfig, data: Data, device: torch.device, compile: bool = False,
                   cuda_graph: bool = False) -> Callable[[], int]:
    """One iteration of `study.train.train_steps`' loop for ``cfg`` (same model set-up, data order,
    augmentation, schedule, autocast, memory format and on-device running sums), without its
    per-epoch evaluation, checkpoint and logging; returns the batch's image count. ``compile`` and
    ``cuda_graph`` are the plan's (`study run --compile`, `--cuda-graph`): compilation and
    CUDA-graph capture happen in the first steps, which the caller leaves out of its timing.

    It mirrors that loop: when the loop changes, change this with it. Warm-up's per-step error
    check (nets of 110 layers and more, until the training error is below 80%, usually within the
    first epoch) is left out: it is not the steady state.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, cfg.depth, shortcut=cfg.shortcut, num_classes=data.info.num_classes,
                        in_channels=data.info.in_channels).to(device)
    model = model.to(memory_format=memory_format(device))
    model.train()
    tune_device(device)
    forward = compile_model(model, device) if compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    grad_norms = GradientNorms(model)
    graphed = GraphedStep(model, opt, [w for _, w in grad_norms.params], bf16=cfg.bf16,
                          device=device) if cuda_graph else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    batches = feed_batches(cfg, data, device, gen)
    loss_sum = torch.zeros((), device=device)
    wrong = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    iteration = 0

    def step() -> int:
        nonlocal iteration, first_bad
        x, y = next(batches)
        lr = lr_at(cfg, iteration, False)
        if graphed is not None:
            loss, out, norms = graphed.step(x, y, lr, norms=grad_norms.due(iteration + 1))
            if norms is not None:
                grad_norms.record(iteration + 1, norms)
        else:
            loss, out = sgd_step(forward, opt, x, y, lr, autocast,
                                 before_update=lambda: grad_norms.maybe_record(iteration + 1))
        iteration += 1
        loss_sum.add_(loss * len(y))
        wrong.add_((out.argmax(1) != y).sum())
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), iteration, first_bad)
        if iteration % 1000 == 0:
            grad_norms.rows("")  # the loop converts them at each epoch's end
        return len(y)

    step.graphed = graphed  # type: ignore[attr-defined]
    return step


def make_fused_step(cfgs: list[RunConfig], data: Data, device: torch.device) -> Callable[[], int]:
    """One iteration of `study run --fuse K` for the K runs ``cfgs`` (one network shape): each run's
    batch and augmentation as `make_fast_step` makes them, then one `FusedNets` step for all, on
    CUDA captured as with ``--cuda-graph``; returns the images of all K batches. It mirrors the
    fused path of `study.train.train_steps`: when that changes, change this with it."""
    members, feeds = [], []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch, cfg.depth, shortcut=cfg.shortcut, num_classes=data.info.num_classes,
                            in_channels=data.info.in_channels).to(device).to(memory_format=memory_format(device))
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        grad_norms = GradientNorms(model)
        members.append(Join(model, opt, [n for n, _ in grad_norms.params], fusion_key(cfg, model),
                            bf16=cfg.bf16, name=cfg.run_id))
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        sums = (torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))
        batches = feed_batches(cfg, data, device, gen)
        feeds.append((gen, batches, grad_norms, sums))
    tune_device(device)
    fused = FusedNets(members, device, capture=device.type == "cuda")
    iteration = 0

    def step() -> int:
        nonlocal iteration
        xs, ys = [], []
        for gen, batches, _, _ in feeds:
            x, y = next(batches)
            xs.append(x)
            ys.append(y)
        results = fused.step(xs, ys, lr_at(cfgs[0], iteration, False), norms=feeds[0][2].due(iteration + 1))
        iteration += 1
        for (loss, out, norms), y, (_, _, grad_norms, (loss_sum, wrong)) in zip(results, ys, feeds):
            if norms is not None:
                grad_norms.record(iteration, norms)
            loss_sum.add_(loss * len(y))
            wrong.add_((out.argmax(1) != y).sum())
            if iteration % 1000 == 0:
                grad_norms.rows("")
        return sum(len(y) for y in ys)

    step.graphed = fused.graphed  # type: ignore[attr-defined]
    return step


def fused_grid(nets: list[tuple[str, int]], width: int, images: np.ndarray, labels: np.ndarray,
               settings: dict, device: torch.device) -> list[dict]:
    """(g): each depth's plain and residual nets, width / 2 seeds of each, fused into one grouped
    net (`make_fused_step`): one round per depth, in (c)'s format."""
    if width % 2:
        raise ValueError(f"--fuse widths are even (a plain net and its twin per seed); got {width}")
    data = device_data(images, labels, device)
    warmup = max(settings["warmup"], EAGER_STEPS_BEFORE_CAPTURE + 2)
    rounds = []
    for depth in dict.fromkeys(d for _, d in nets):
        cfgs = [RunConfig(arch=arch, depth=depth, dataset="cifar10", seed=seed, batch_size=settings["batch_size"],
                          precision=settings["precision"])
                for seed in range(width // 2) for arch in ("plain", "resnet")]
        step = make_fused_step(cfgs, data, device)
        rates, _ = images_per_s(step, device, warmup, settings["steps"], settings["repeats"])
        if device.type == "cuda":
            check_captured(step, settings["batch_size"])
        per_net = settings["steps"] * settings["batch_size"]
        images_w = [per_net * width] * len(rates)
        rounds.append({"nets": [(c.arch, c.depth) for c in cfgs], "images_per_net": [per_net] * width,
                       "wall_s": [n / r for n, r in zip(images_w, rates)], "images": images_w})
        del step
        free_memory(device)
    return rounds


def check_captured(step: Callable[[], int], batch_size: int) -> None:
    """Raise unless ``step`` (a `make_fast_step` with ``cuda_graph``) replays a captured graph for
    ``batch_size``: a failed capture falls back to eager steps, which must not be timed as graphs."""
    graphed = step.graphed  # type: ignore[attr-defined]
    if batch_size not in graphed.captured:
        raise RuntimeError(f"no CUDA graph for batch {batch_size}: {graphed.fallback or 'not captured'}")


# --- timing --------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(step: Callable[[], int], device: torch.device, warmup: int, steps: int,
                 repeats: int) -> tuple[list[float], float]:
    """Images/s of each of ``repeats`` windows of ``steps`` steps, after ``warmup`` untimed steps,
    and the seconds those warm-up steps took (compilation, autotuning, a loader's start).

    On CUDA the window is timed by events recorded on an idle stream, so it spans the host's
    waiting and launching as well as the kernels: it is the wall time of the window."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            images = sum(step() for _ in range(steps))
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            images = sum(step() for _ in range(steps))
            seconds = time.perf_counter() - t0
        rates.append(images / seconds)
    return rates, warmup_s


def matmul_peak(device: torch.device, repeats: int = 5) -> dict:
    """The best of ``repeats`` timed windows of square matrix multiplies: bf16 8192^2 on CUDA
    (tensor cores), fp32 1024^2 on CPU (with this process's threads). The denominator of model FLOP
    utilisation."""
    cuda = device.type == "cuda"
    n, dtype, count = (8192, torch.bfloat16, 50) if cuda else (1024, torch.float32, 4)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty_like(a)
    for _ in range(count):  # also lets a GPU reach its steady clock
        torch.mm(a, b, out=c)
    sync(device)
    windows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(count):
            torch.mm(a, b, out=c)
        sync(device)
        windows.append(2 * n**3 * count / (time.perf_counter() - t0))
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": max(windows),
            "median_flops_per_s": statistics.median(windows)}


# --- (c): several runs at once ------------------------------------------------------------------

def _grid_worker(rank: int, rounds: list[list[tuple[str, int]]], settings: dict,
                 barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:
    """One of K processes: in each round, train net ``rank`` of the round (if it has one) with the
    fast step, meeting the others at a barrier before and after every timed window."""
    try:
        device = torch.device(settings["device"])
        if device.type == "cpu":
            torch.set_num_threads(settings["threads"])  # K processes share the cores
        data = device_data(*synthetic_cifar(), device)
        counts: list[list[int]] = []
        for nets in rounds:
            step = None
            if rank < len(nets):
                if settings.get("fused"):  # a unit of nets (arch, depth, seed) trained as one grouped net
                    step = make_fused_step([RunConfig(arch=a, depth=d, seed=s, dataset="cifar10",
                                                      batch_size=settings["batch_size"], precision=settings["precision"])
                                            for a, d, s in nets[rank]], data, device)
                else:
                    arch, depth = nets[rank]
                    cfg = RunConfig(arch=arch, depth=depth, dataset="cifar10", batch_size=settings["batch_size"],
                                    precision=settings["precision"])
                    step = make_fast_step(cfg, data, device, settings["compile"], settings.get("cuda_graph", False))
                for _ in range(settings["warmup"]):
                    step()
                sync(device)
                if (settings.get("cuda_graph") or settings.get("fused")) and device.type == "cuda":
                    check_captured(step, settings["batch_size"])
            barrier.wait(BARRIER_TIMEOUT_S)  # everyone warmed up
            per_window = []
            for _ in range(settings["repeats"]):
                barrier.wait(BARRIER_TIMEOUT_S)  # start
                images = sum(step() for _ in range(settings["steps"])) if step else 0
                sync(device)
                barrier.wait(BARRIER_TIMEOUT_S)  # every process's work is done
                per_window.append(images)
            counts.append(per_window)
            del step
        results.put((rank, counts, None))
    except BaseException as e:  # noqa: BLE001 - report anything, then let the main process fail
        results.put((rank, None, f"{type(e).__name__}: {e}"))
        barrier.abort()


def concurrent_grid(nets: list, k: int, settings: dict) -> list[dict]:
    """Train the grid in rounds of ``k`` nets, one process each; per round: its nets, and the wall
    time and total images of each timed window. With ``settings["fused"]`` each entry of ``nets``
    is a unit, a list of (arch, depth, seed) trained as one grouped net by one process."""
    rounds = [nets[i:i + k] for i in range(0, len(nets), k)]
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    barrier = ctx.Barrier(k + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_grid_worker, args=(r, rounds, settings, barrier, results), daemon=True)
             for r in range(k)]
    for p in procs:
        p.start()
    # A worker that dies without reaching its except clause (killed, out of memory) would leave the
    # others waiting at a barrier until it times out; this watch breaks the barrier at once instead.
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(0.5):
            if any(p.exitcode not in (None, 0) for p in procs):
                barrier.abort()
                return

    threading.Thread(target=watch, daemon=True).start()
    walls: list[list[float]] = []
    try:
        for _ in rounds:
            barrier.wait(BARRIER_TIMEOUT_S)
            per_window = []
            for _ in range(settings["repeats"]):
                barrier.wait(BARRIER_TIMEOUT_S)
                t0 = time.perf_counter()
                barrier.wait(BARRIER_TIMEOUT_S)
                per_window.append(time.perf_counter() - t0)
            walls.append(per_window)
        reports = [results.get(timeout=BARRIER_TIMEOUT_S) for _ in procs]
    except threading.BrokenBarrierError:
        errors = []
        try:
            while True:
                rank, _, error = results.get(timeout=10)
                if error:
                    errors.append(f"worker {rank}: {error}")
        except queue.Empty:
            pass
        raise RuntimeError("concurrent grid failed: " + ("; ".join(errors) or "a worker died")) from None
    finally:
        finished.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    errors = [f"worker {rank}: {error}" for rank, _, error in reports if error]
    if errors:
        raise RuntimeError("concurrent grid failed: " + "; ".join(errors))
    counts = {rank: c for rank, c, _ in reports}
    units = (lambda nets_r: [[(a, d) for a, d, _ in unit] for unit in nets_r]) if settings.get("fused") else (
        lambda nets_r: [[net] for net in nets_r])
    return [
        {"nets": [net for unit in units(nets_r) for net in unit],
         "images_per_net": [statistics.median(counts[r][i]) / len(unit)
                            for r, unit in enumerate(units(nets_r)) for _ in unit],
         "wall_s": walls[i],
         "images": [sum(counts[r][i][w] for r in range(k)) for w in range(settings["repeats"])]}
        for i, nets_r in enumerate(rounds)
    ]


# --- the three measurements ----------------------------------------------------------------------

def measure_reference(nets: list[tuple[str, int]], images: np.ndarray, labels: np.ndarray, settings: dict,
                      device: torch.device, log: Callable[[str], None]) -> dict[tuple[str, int], tuple]:
    """(a): (images/s per window, warm-up seconds) of each net, one after another, fed by one
    DataLoader (whose workers stop when this returns). cuDNN autotuning is on, as the recipes set
    it, and TF32 convolutions, PyTorch's default that they keep (`study` turns it off: the paper's fp32
    is IEEE); both restored afterwards."""
    flag, tf32 = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.benchmark = torch.backends.cudnn.allow_tf32 = True
    try:
        loader = reference_loader(images, labels, settings["batch_size"], settings["workers"], device.type == "cuda")
        batches = forever(lambda: loader)
        rates = {}
        for net in nets:
            step = make_reference_step(*net, batches, device)
            rates[net] = images_per_s(step, device, settings["warmup"], settings["steps"], settings["repeats"])
            log(f"(a) reference {net[0]}{net[1]}: {statistics.median(rates[net][0]):,.0f} images/s")
        return rates
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = flag, tf32


def measure_fast(nets: list[tuple[str, int]], images: np.ndarray, labels: np.ndarray, settings: dict,
                 device: torch.device, log: Callable[[str], None]) -> dict[tuple[str, int], tuple]:
    """(b): (images/s per window, warm-up seconds) of each net, one after another, through
    `make_fast_step`."""
    data = device_data(images, labels, device)
    rates = {}
    for arch, depth in nets:
        cfg = RunConfig(arch=arch, depth=depth, dataset="cifar10", batch_size=settings["batch_size"],
                        precision=settings["precision"])
        step = make_fast_step(cfg, data, device, settings["compile"])
        rates[(arch, depth)] = images_per_s(step, device, settings["warmup"], settings["steps"], settings["repeats"])
        log(f"(b) fast {arch}{depth}: {statistics.median(rates[(arch, depth)][0]):,.0f} images/s")
    return rates


def interleaved_grid(nets: list[tuple[str, int]], k: int, images: np.ndarray, labels: np.ndarray,
                     settings: dict, device: torch.device) -> list[dict]:
    """(f): the grid in rounds of ``k`` nets trained by this one process, interleaved step by step,
    each on its own CUDA stream (`study run --streams K --cuda-graph`); rounds in (c)'s format. A
    timed step is one step of every net of the round; the window ends when every stream is done."""
    data = device_data(images, labels, device)
    warmup = max(settings["warmup"], EAGER_STEPS_BEFORE_CAPTURE + 2)
    rounds = []
    for i in range(0, len(nets), k):
        nets_r = nets[i:i + k]
        streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for _ in nets_r]
        for stream in streams:  # the data set was put on the device on the current stream
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(device))
        steps = []
        for (arch, depth), stream in zip(nets_r, streams):
            cfg = RunConfig(arch=arch, depth=depth, dataset="cifar10", batch_size=settings["batch_size"],
                            precision=settings["precision"])
            with on(stream):
                steps.append(make_fast_step(cfg, data, device, cuda_graph=True))

        def together(steps: list = steps, streams: list = streams) -> int:
            done = 0
            for step, stream in zip(steps, streams):
                with on(stream):
                    done += step()
            for stream in streams:  # the timing event, on the current stream, waits for all
                if stream is not None:
                    torch.cuda.current_stream(device).wait_stream(stream)
            return done

        rates, _ = images_per_s(together, device, warmup, settings["steps"], settings["repeats"])
        if device.type == "cuda":
            for step in steps:
                check_captured(step, settings["batch_size"])
        per_net = settings["steps"] * settings["batch_size"]
        images_w = [per_net * len(nets_r)] * len(rates)
        rounds.append({"nets": nets_r, "images_per_net": [per_net] * len(nets_r),
                       "wall_s": [n / r for n, r in zip(images_w, rates)], "images": images_w})
        del steps, together
        free_memory(device)
    return rounds


def free_memory(device: torch.device) -> None:
    """Give the finished nets' device memory back. A `FusedNets` that is never released (as here)
    and its `GraphedStep` refer to each other, so their CUDA graphs' private memory pools go only
    when the garbage collector breaks that cycle: collect first, then empty the cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def on(stream: "torch.cuda.Stream | None"):
    """``stream`` as the current CUDA stream; nothing on CPU."""
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def measure_graphed(nets: list[tuple[str, int]], images: np.ndarray, labels: np.ndarray, settings: dict,
                    device: torch.device, log: Callable[[str], None]) -> dict[tuple[str, int], dict]:
    """(d): images/s of each net, one after another, through `make_fast_step` with `cuda_graph`
    (`study run --cuda-graph`); a net that fails records the error instead, and the benchmark goes
    on."""
    data = device_data(images, labels, device)
    results = {}
    for arch, depth in nets:
        cfg = RunConfig(arch=arch, depth=depth, dataset="cifar10", batch_size=settings["batch_size"],
                        precision=settings["precision"])
        step = None
        try:
            step = make_fast_step(cfg, data, device, cuda_graph=True)
            # The graph is captured after GraphedStep's eager warm-up steps.
            warmup = max(settings["warmup"], EAGER_STEPS_BEFORE_CAPTURE + 2)
            rates, warmup_s = images_per_s(step, device, warmup, settings["steps"], settings["repeats"])
            if device.type == "cuda":
                check_captured(step, settings["batch_size"])
            results[(arch, depth)] = {"rates": rates, "images_per_s": statistics.median(rates), "warmup_s": warmup_s}
            log(f"(d) --cuda-graph {arch}{depth}: {statistics.median(rates):,.0f} images/s")
        except Exception as e:  # noqa: BLE001 - one failing net must not cost the benchmark
            results[(arch, depth)] = {"error": f"{type(e).__name__}: {e}"}
            log(f"(d) {arch}{depth} failed: {type(e).__name__}: {e}")
        finally:
            del step
            free_memory(device)
    return results


# --- reporting -----------------------------------------------------------------------------------

def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sms": props.multi_processor_count,
            "gpu_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "conv_tf32": torch.backends.cudnn.allow_tf32,  # PyTorch's default at start (True: "fp32" convs in TF32)
        }
    return info


def log_rounds(label: str, rounds: list[dict], log: Callable[[str], None]) -> None:
    for r in rounds:
        together = statistics.median(r["images"]) / statistics.median(r["wall_s"])
        log(f"{label} {' + '.join(f'{a}{d}' for a, d in r['nets'])}: {together:,.0f} images/s together")


def round_figures(rounds: list[dict], macs: dict, peak_flops: float,
                  scale: Callable[[dict], float] | None = None) -> dict:
    """Grid figures of rounds of K nets, each round as long as its slowest net. `scale(round)`:
    how many times the peak's compute the round had (CPU: its processes' threads over the peak's)."""
    wall = sum(statistics.median(r["wall_s"]) for r in rounds)
    flops = sum(6 * macs[(arch, depth)][0] * n
                for r in rounds for (arch, depth), n in zip(r["nets"], r["images_per_net"]))
    compute = sum(statistics.median(r["wall_s"]) * peak_flops * (scale(r) if scale else 1) for r in rounds)
    return {"images_per_s": sum(statistics.median(r["images"]) for r in rounds) / wall,
            "mfu": flops / compute}


def figures(nets: list[tuple[str, int]], macs: dict, reference: dict, fast: dict, rounds: list[dict],
            peak_flops: float, graphed: dict | None = None,
            graphed_rounds: list[dict] | None = None,
            interleaved_rounds: list[dict] | None = None,
            fused_rounds: dict[int, list[dict]] | None = None,
            fused_concurrent_rounds: list[dict] | None = None,
            peak_scale: dict[str, Callable[[dict], float]] | None = None) -> tuple[list[dict], dict]:
    """Per-net rows and whole-grid figures: medians, ratios, model FLOP utilisation (6 x MACs per
    image: forward, and a backward of twice its cost) and minutes projected for the paper's grid.
    `peak_scale`: for grid figures of several processes, how many times the peak's compute a round
    had (`round_figures`)."""
    rows = []
    for net in nets:
        row = {"arch": net[0], "depth": net[1], "macs": macs[net][0], "params": macs[net][1],
               "reference": reference[net][0], "reference_warmup_s": reference[net][1],
               "fast": fast[net][0], "fast_warmup_s": fast[net][1]}
        for key in ("reference", "fast"):
            row[f"{key}_images_per_s"] = statistics.median(row[key])
            row[f"{key}_mfu"] = 6 * row["macs"] * row[f"{key}_images_per_s"] / peak_flops
        row["fast_over_reference"] = row["fast_images_per_s"] / row["reference_images_per_s"]
        if graphed is not None:
            g = graphed[net]
            row["graphed"] = g
            if "images_per_s" in g:
                row["graphed_images_per_s"] = g["images_per_s"]
                row["graphed_over_reference"] = g["images_per_s"] / row["reference_images_per_s"]
                row["graphed_mfu"] = 6 * row["macs"] * g["images_per_s"] / peak_flops
        rows.append(row)
    # One net after another, equal images each: the grid takes sum(images / rate).
    mean_macs = statistics.mean(row["macs"] for row in rows)
    grid = {}
    for key in ("reference", "fast"):
        rate = len(rows) / sum(1 / row[f"{key}_images_per_s"] for row in rows)
        grid[key] = {"images_per_s": rate, "mfu": 6 * mean_macs * rate / peak_flops}
    scale = peak_scale or {}
    grid["concurrent"] = round_figures(rounds, macs, peak_flops, scale.get("concurrent"))
    if rows and all("graphed_images_per_s" in row for row in rows):
        rate = len(rows) / sum(1 / row["graphed_images_per_s"] for row in rows)
        grid["graphed"] = {"images_per_s": rate, "mfu": 6 * mean_macs * rate / peak_flops}
    if graphed_rounds:
        grid["graphed_concurrent"] = round_figures(graphed_rounds, macs, peak_flops)
    if interleaved_rounds:
        grid["graphed_interleaved"] = round_figures(interleaved_rounds, macs, peak_flops)
    for width, fused in (fused_rounds or {}).items():
        grid[f"fused_{width}"] = round_figures(fused, macs, peak_flops)
    if fused_concurrent_rounds:
        grid["fused_concurrent"] = round_figures(fused_concurrent_rounds, macs, peak_flops,
                                                 scale.get("fused_concurrent"))
    paper_images = len(nets) * PAPER_ITERATIONS * PAPER_BATCH_SIZE  # one seed's grid
    for g in grid.values():
        g["vs_reference"] = g["images_per_s"] / grid["reference"]["images_per_s"]
        g["projected_grid_minutes"] = paper_images / g["images_per_s"] / 60
    return rows, grid


def print_report(title: str, rows: list[dict], grid: dict, k: int) -> None:
    print(title)
    print()
    print(f"{'net':<10} {'MMACs':>7} {'(a) ref img/s':>14} {'(b) fast img/s':>15} {'b/a':>6} "
          f"{'MFU a':>7} {'MFU b':>7}")
    for r in rows:
        graphed = f"   (d) {r['graphed_images_per_s']:,.0f} img/s" if "graphed_images_per_s" in r else ""
        print(f"{r['arch'] + str(r['depth']):<10} {r['macs'] / 1e6:>7.1f} {r['reference_images_per_s']:>14,.0f} "
              f"{r['fast_images_per_s']:>15,.0f} {r['fast_over_reference']:>5.2f}x "
              f"{100 * r['reference_mfu']:>6.2f}% {100 * r['fast_mfu']:>6.2f}%{graphed}")
    print()
    print(f"whole grid ({len(rows)} nets; minutes projected for {PAPER_ITERATIONS:,} iterations x "
          f"{PAPER_BATCH_SIZE} images per net)")
    print(f"{'pipeline':<28} {'images/s':>10} {'vs (a)':>7} {'minutes':>9} {'MFU':>7}")
    titles = {"reference": "(a) reference", "fast": "(b) fast, one run at a time",
              "concurrent": f"(c) fast, K={k} at once", "graphed": "(d) --cuda-graph",
              "graphed_concurrent": f"(e) --cuda-graph, K={k} at once",
              "graphed_interleaved": f"(f) --cuda-graph --streams {k}",
              "fused_concurrent": f"(h) --fuse 2, K={k} at once"}
    for key, g in grid.items():
        title = titles.get(key) or f"(g) --fuse {key.split('_')[1]}"
        print(f"{title:<28} {g['images_per_s']:>10,.0f} {g['vs_reference']:>6.2f}x "
              f"{g['projected_grid_minutes']:>9.1f} {100 * g['mfu']:>6.2f}%", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--depths", help="comma-separated 6n+2 depths (CUDA 20,32,44,56,110; CPU 20,56)")
    p.add_argument("--steps", type=int, help="timed steps per window (CUDA 100, CPU 2)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing each net (CUDA 20, CPU 1)")
    p.add_argument("--repeats", type=int, help="timed windows; figures are their medians (CUDA 3, CPU 2)")
    p.add_argument("--batch-size", type=int, help="images per step (CUDA 128, the paper's; CPU 32)")
    p.add_argument("--workers", type=int, help="reference DataLoader workers (CUDA 4, CPU 2)")
    p.add_argument("--concurrency", type=int, help="processes training at once in (c) (CUDA 4, CPU 2)")
    p.add_argument("--precision", choices=PRECISIONS, help="fast path precision (CUDA bf16, CPU fp32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the fast path's nets, as `study run --compile` (at least 3 warm-up steps)")
    p.add_argument("--no-graph", action="store_true",
                   help="skip (d), (e) and (f), the fast path with --cuda-graph (CUDA only)")
    p.add_argument("--fuse", help="(g)'s widths: runs per grouped net, even, comma-separated (CUDA 2,10; CPU 2); "
                   "0 skips (g)")
    p.add_argument("--out", help="write every figure as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    settings = dict(DEFAULTS[device.type])
    settings |= {k: v for k, v in vars(args).items() if k in settings and v is not None}
    try:
        depths = [int(d) for d in str(settings["depths"]).split(",")]
        for d in depths:
            RunConfig(arch="plain", depth=d)  # validates 6n+2
    except ValueError as e:
        print(f"bad --depths {settings['depths']!r}: {e}", file=sys.stderr)
        return 2
    try:
        widths = [int(w) if w.strip().lstrip("-").isdigit() else -1 for w in str(settings["fuse"]).split(",")]
        widths = [w for w in widths if w != 0]
        if any(w < 2 or w % 2 for w in widths):
            raise ValueError("each width is an even number of runs, at least 2 (a plain net and its twin per seed)")
    except ValueError as e:
        print(f"bad --fuse {settings['fuse']!r}: {e}", file=sys.stderr)
        return 2
    for name, least in (("batch_size", 1), ("steps", 1), ("repeats", 1), ("concurrency", 1), ("warmup", 0),
                        ("workers", 0)):
        if settings[name] < least:
            print(f"--{name.replace('_', '-')} must be at least {least}", file=sys.stderr)
            return 2
    nets = [(arch, d) for d in depths for arch in ("plain", "resnet")]  # the grid's order
    k = min(settings["concurrency"], len(nets))
    machine = machine_info(device)
    cores = machine["cpu_cores"]
    # Compilation, and on CUDA the graph capture after it, take the first steps.
    settings |= {"device": str(device), "depths": depths, "concurrency": k, "compile": args.compile,
                 "warmup": max(settings["warmup"], 3) if args.compile else settings["warmup"]}
    if not cuda:
        torch.set_num_threads(max(1, cores // k))  # see the module's docstring
    settings["threads"] = torch.get_num_threads()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    def dump(figures_so_far: dict, partial: bool = False) -> None:
        """Write the JSON (``--out``); ``partial`` ones, written after each measurement, keep what a
        run stopped at its time limit had measured."""
        if not args.out:
            return
        result = {
            "benchmark": "grid_throughput",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": machine.get("gpu", f"cpu ({cores} cores, {settings['threads']} thread(s) per process)"),
            "torch": torch.__version__,
            "machine": machine,
            "command_line": sys.argv,
            "args": vars(args),
            "settings": settings | {
                "train_images": TRAIN_SIZE,
                "reference_cudnn_benchmark": True,
                "fast_cudnn_benchmark": torch.backends.cudnn.benchmark,
                "reference_conv_tf32": True,
                "fast_conv_tf32": False,  # `tune_device`, which (b) and after call, turns it off: IEEE fp32
                "fast_channels_last": cuda,
                "paper_images_per_grid": len(nets) * PAPER_ITERATIONS * PAPER_BATCH_SIZE,
            },
            "matmul_peak": peak,
            **({"partial": True} if partial else {}),
            **figures_so_far,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{args.out}.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.replace(args.out)
        log(f"wrote {args.out}{' (partial)' if partial else ''}")

    def per_net(rates: dict) -> list[dict]:
        return [{"arch": a, "depth": d, "result": r} for (a, d), r in rates.items()]

    peak = matmul_peak(device)
    log(f"matmul peak ({peak['dtype']} {peak['n']}^2): {peak['flops_per_s'] / 1e12:.2f} TFLOP/s")
    macs = {}
    for net in nets:
        with torch.device("meta"):  # shapes only: counting needs no storage
            model = build_model(*net)
        macs[net] = (count_macs(model, (3, 32, 32)), count_params(model))

    images, labels = synthetic_cifar()
    reference = measure_reference(nets, images, labels, settings, device, log)
    dump({"reference": per_net(reference)}, partial=True)
    fast = measure_fast(nets, images, labels, settings, device, log)
    dump({"reference": per_net(reference), "fast": per_net(fast)}, partial=True)
    graphed = measure_graphed(nets, images, labels, settings, device, log) if cuda and not args.no_graph else None
    if graphed is not None:
        dump({"reference": per_net(reference), "fast": per_net(fast), "graphed": per_net(graphed)}, partial=True)
    fused_rounds: dict[int, list[dict]] = {}
    for width in widths:
        log(f"(g) --fuse {width}{' --cuda-graph' if cuda else ''}: {width} runs per grouped net")
        try:
            fused_rounds[width] = fused_grid(nets, width, images, labels, settings, device)
            log_rounds(f"(g) --fuse {width}", fused_rounds[width], log)
        except Exception as e:  # noqa: BLE001 - report it; the other figures stand
            log(f"(g) --fuse {width} failed: {type(e).__name__}: {e}")
        dump({"reference": per_net(reference), "fast": per_net(fast),
              "graphed": per_net(graphed) if graphed is not None else None, "fused_rounds": fused_rounds},
             partial=True)
    free_memory(device)  # leave the memory to (c)'s processes
    log(f"(c) starting {k} processes")
    rounds = concurrent_grid(nets, k, settings)
    log_rounds("(c)", rounds, log)
    graphed_rounds = None
    if graphed is not None and all("images_per_s" in g for g in graphed.values()):
        dump({"reference": per_net(reference), "fast": per_net(fast), "graphed": per_net(graphed),
              "concurrent_rounds": rounds}, partial=True)
        log(f"(e) starting {k} processes, --cuda-graph")
        try:
            graphed_rounds = concurrent_grid(nets, k, settings | {"cuda_graph": True,
                                                                  "warmup": max(settings["warmup"], EAGER_STEPS_BEFORE_CAPTURE + 2)})
            log_rounds("(e)", graphed_rounds, log)
        except RuntimeError as e:
            log(f"(e) failed: {e}")
    interleaved_rounds = None
    if graphed is not None and all("images_per_s" in g for g in graphed.values()):
        dump({"reference": per_net(reference), "fast": per_net(fast), "graphed": per_net(graphed),
              "concurrent_rounds": rounds, "graphed_concurrent_rounds": graphed_rounds}, partial=True)
        log(f"(f) {k} runs interleaved in this process on {k} streams, --cuda-graph")
        try:
            interleaved_rounds = interleaved_grid(nets, k, images, labels, settings, device)
            log_rounds("(f)", interleaved_rounds, log)
        except Exception as e:  # noqa: BLE001 - report it; the other figures stand
            log(f"(f) failed: {type(e).__name__}: {e}")
        dump({"reference": per_net(reference), "fast": per_net(fast), "graphed": per_net(graphed),
              "concurrent_rounds": rounds, "graphed_concurrent_rounds": graphed_rounds,
              "interleaved_rounds": interleaved_rounds}, partial=True)

    fused_concurrent_rounds = None
    if 2 in widths and 2 in fused_rounds:
        log(f"(h) --fuse 2 in {k} processes{' --cuda-graph' if cuda else ''}: each process a plain net and its twin")
        units = [[("plain", d, 0), ("resnet", d, 0)] for d in depths]
        try:
            fused_concurrent_rounds = concurrent_grid(units, min(k, len(units)), settings | {
                "fused": True, "warmup": max(settings["warmup"], EAGER_STEPS_BEFORE_CAPTURE + 2)})
            log_rounds("(h)", fused_concurrent_rounds, log)
        except RuntimeError as e:
            log(f"(h) failed: {e}")

    # On CPU a round of P processes has P times the threads the peak was measured with, up to the
    # cores (GPU: one device whatever the processes). (h)'s processes train a pair each.
    def cpu_scale(nets_per_process: int) -> Callable[[dict], float]:
        threads = settings["threads"]
        return lambda r: min(len(r["nets"]) // nets_per_process * threads, cores) / threads

    peak_scale = {} if cuda else {"concurrent": cpu_scale(1), "fused_concurrent": cpu_scale(2)}
    rows, grid = figures(nets, macs, reference, fast, rounds, peak["flops_per_s"], graphed, graphed_rounds,
                         interleaved_rounds, fused_rounds, fused_concurrent_rounds, peak_scale)
    name = machine.get("gpu", f"cpu ({cores} cores, {settings['threads']} thread(s) per process)")
    print_report(
        f"grid throughput on {name}, torch {torch.__version__}: batch {settings['batch_size']}, "
        f"{settings['warmup']} warm-up + {settings['repeats']} x {settings['steps']} timed steps, medians; "
        f"fast path {settings['precision']}{', channels-last' if cuda else ''}"
        f"{', compiled' if settings['compile'] else ''}; "
        f"matmul peak {peak['flops_per_s'] / 1e12:.2f} TFLOP/s ({peak['dtype']})",
        rows, grid, k)
    total_s = time.perf_counter() - started
    log(f"done in {total_s:.0f} s")

    dump({"nets": rows, "grid": grid, "concurrent_rounds": rounds, "graphed_concurrent_rounds": graphed_rounds,
          "interleaved_rounds": interleaved_rounds, "fused_rounds": fused_rounds,
          "fused_concurrent_rounds": fused_concurrent_rounds, "wall_s": total_s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
