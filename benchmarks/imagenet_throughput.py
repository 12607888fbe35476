"""ImageNet's input pipeline on ImageNet-like JPEGs: four ways of making the training views, side by
side, with ResNet-18/34 training on them.

Writes synthetic JPEGs of ImageNet's typical size (500x375 by default) into a temporary ImageFolder
and measures, through the package's own loaders (`study.data.imagenet`) and nets, for each path:

- `resize-then-crop`: the reference (`imagenet.train_transform`, the pipeline before issue 20):
  workers decode each JPEG whole with PIL, resize the whole image, crop, flip;
- `crop-first-pil`: the CPU path as PIL alone makes it (`CropFirst(partial=False)`, what `study run`
  does where the compiled module `_jpegcrop` was not built): workers draw the view first, decode
  the whole JPEG (at 1/2, 1/4 or 1/8 of its size when the image is to shrink 2x or more) and
  resample the view's box alone;
- `crop-first`: the CPU path (`study run`'s default, `study.data.decode.CropFirst`): the same, but
  only the region under the box is decoded (libjpeg-turbo through `_jpegcrop`; the same as
  `crop-first-pil` where that module is missing, and the JSON's `partial_decoding` is then null);
- `gpu` (CUDA only; `--decode gpu`): workers read the bytes and draw the views, the training
  process decodes each batch with nvJPEG and resamples the boxes on the device.

For each: loader images/s (to the device, normalised, no model; on a CPU the training process
normalises with the cores the workers leave, one on 2 cores with 1 worker; the median of --rounds
measurements, the paths taking turns) and per worker; one worker's own
images/s (up to 320 images of the dataset read one by one in one process, the paths taking turns,
median of 5 rounds: the steadiest figure on a shared machine); then per net the
model's images/s on a batch already on the device (bf16 autocast and channels-last on CUDA), and
end to end, each step timed in two parts, waiting for the batch (data) and computing on it (model;
the device is synchronised between the parts, which costs a little speed). The per-pixel mean's
one-off pass (`imagenet.pixel_mean`) is timed once, against the reference loader's rate.

    python benchmarks/imagenet_throughput.py                      # CPU: a few minutes on 2 cores
    python benchmarks/imagenet_throughput.py --out benchmarks/results/imagenet_throughput_h200.json

Defaults depend on the device (CPU: 320 images, batch 8, 30 timed steps a net and 5 rounds of 120
for the loaders, 1 worker; CUDA: 4096 images, batch 256, 50 timed steps, one round, a worker per CPU
core). The file list is repeated so that one epoch
holds every measurement: the workers start once per measurement, not inside it (`repeat_files`;
`--restart-workers` measures without that, as the 2026-11-27 H200 run did).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from study.data.decode import BatchDecoder, CropFirst, EncodedView, partial_decoding
from study.data.imagenet import (
    Lighting,
    load_image,
    loaders_for,
    normalize,
    open_imagenet,
    pixel_mean,
    set_epoch,
    train_transform,
)
from study.models import build_model, count_macs

CLASSES = 10
IMAGENET_TRAIN_IMAGES = 1_281_167
PATHS = ("resize-then-crop", "crop-first-pil", "crop-first", "gpu")


def write_jpegs(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> float:
    """``count`` JPEGs of ``size`` (w, h) under root/train/<class>/, and a few under root/val/;
    returns their mean file size in bytes.

    Smooth random colour fields plus pixel noise: pure noise would compress far worse than photos
    (larger files, slower decoding), a flat colour far better; this lands near ImageNet's average
    of about 110 KB per image (about 100 KB at 500x375).
    """
    w, h = size

    def one(args: tuple[str, int]) -> int:
        path, i = args
        rng = np.random.default_rng(seed * 1_000_003 + i)
        coarse = Image.fromarray(rng.integers(0, 256, (h // 12 + 1, w // 12 + 1, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-25, 26, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        return Path(path).stat().st_size

    jobs = []
    for split, n in (("train", count), ("val", CLASSES)):
        for c in range(CLASSES):
            (root / split / f"class{c:02d}").mkdir(parents=True)
        jobs += [(str(root / split / f"class{i % CLASSES:02d}" / f"{split}_{i}.JPEG"), i) for i in range(n)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL releases the GIL while encoding
        sizes = list(pool.map(one, jobs))
    return sum(sizes) / len(sizes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_loader(root: Path, path: str, batch: int, workers: int, pin_memory: bool, epoch_batches: int = 0):
    """The training loader of ``path`` (one of PATHS) over ``root``. With ``epoch_batches`` its file
    list is repeated until one epoch holds at least that many batches (`repeat_files`)."""
    data = open_imagenet(root, decode="gpu" if path == "gpu" else "cpu")
    if path == "resize-then-crop":  # the reference: decode whole, resize whole, crop
        data.train.loader, data.train.transform = load_image, train_transform(data.scale)
    elif path == "crop-first-pil":  # the CPU path without the compiled module: PIL decodes whole images
        data.train.transform = CropFirst(data.scale, partial=False)
    repeat_files(data.train, epoch_batches * batch)
    return loaders_for(data, batch, workers, pin_memory=pin_memory).train


def repeat_files(folder, samples: int) -> int:
    """Repeat an ImageFolder's file list until it holds at least ``samples`` entries; returns how many
    times it now lists each file.

    A few thousand synthetic JPEGs make a short epoch, and every epoch starts the DataLoader's
    workers afresh (as `study run` does): each worker imports, then makes a whole batch before the
    first arrives. ImageNet's epochs are 5,005 batches of 256, so there that start is a small share;
    in a benchmark epoch of a handful of batches per worker it is most of the time measured (the
    2026-11-27 H200 figure: 2,048 images, batch 256, 16 workers, so 8 batches an epoch and half the
    workers idle). One epoch long enough for every measurement measures the steady state instead.
    """
    times = max(1, -(-samples // max(1, len(folder.samples))))
    folder.samples = folder.samples * times
    folder.imgs = folder.samples
    folder.targets = folder.targets * times
    return times


def batches(loader, device: torch.device, lighting: Lighting | None):
    """Endless device batches (normalised input, labels) from ``loader``, epoch after epoch."""
    decoder = BatchDecoder(device) if isinstance(loader.dataset.transform, EncodedView) else None
    epoch = 0
    while True:
        set_epoch(loader, epoch)
        for images, labels in loader:
            images = decoder(images) if decoder else images.to(device, non_blocking=True)
            x = normalize(images, lighting=lighting)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels.to(device, non_blocking=True)
        epoch += 1


def loader_throughput(loader, device, lighting, warmup: int, steps: int, threads: int | None = None) -> float:
    """Images/s the loader delivers, on the device and normalised, with no model; with ``threads``,
    this process's torch threads meanwhile (on a CPU: the cores the workers leave, so that normalising
    a batch does not take a worker's core for a moment on every batch)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _loader_throughput(loader, device, lighting, warmup, steps)
    finally:
        torch.set_num_threads(before)


def _loader_throughput(loader, device, lighting, warmup: int, steps: int) -> float:
    it = batches(loader, device, lighting)
    for _ in range(warmup):
        next(it)
    sync(device)
    start, n = time.perf_counter(), 0
    for _ in range(steps):
        x, _ = next(it)
        n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - start)


def worker_throughput(loaders: dict, rounds: int = 5, images: int = 320) -> dict[str, float]:
    """Images/s one DataLoader worker makes, per path: the first ``images`` of each path's dataset read
    image by image in this process (what a worker does, without the loader around it), the paths
    taking turns for ``rounds`` rounds so that a change in the machine's speed hits them alike; the
    median round."""
    times: dict[str, list[float]] = {path: [] for path in loaders}
    for _ in range(rounds):
        for path, loader in loaders.items():
            dataset = loader.dataset
            n = min(images, len(dataset))
            start = time.perf_counter()
            for i in range(n):
                dataset[i]
            times[path].append(n / (time.perf_counter() - start))
    return {path: float(np.median(t)) for path, t in times.items()}


def mean_pass_throughput(root: Path, images: int, workers: int, device: torch.device) -> float:
    """Images/s of the per-pixel mean's pass over the folder's training images: one untimed pass
    (imports, the page cache), then a timed one into a fresh cache directory."""
    for attempt in range(2):
        start = time.perf_counter()
        pixel_mean(root, root / f"mean-cache-{attempt}", workers=workers, device=device, log=lambda message: None)
        sync(device)
        elapsed = time.perf_counter() - start
    return images / elapsed


def make_step(depth: int, device: torch.device, compile_model: bool):
    """One SGD training step of ResNet-``depth`` (option B, as torchvision's) with the paper's
    optimiser settings; bf16 autocast and channels-last on CUDA."""
    model = build_model("resnet", depth, shortcut="B", dataset="imagenet", num_classes=CLASSES).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    forward = torch.compile(model) if compile_model else model

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def model_throughput(step, batch: int, device: torch.device, warmup: int, steps: int) -> float:
    """Images/s of training steps on one batch that already sits on the device."""
    x = normalize(torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device))
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    for _ in range(warmup):
        step(x, y)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def end_to_end(step, loader, device, lighting, warmup: int, steps: int) -> dict:
    """Loader and model together: images/s, and seconds per step waiting for data vs computing."""
    it = batches(loader, device, lighting)
    for _ in range(warmup):
        step(*next(it))
    sync(device)
    data_s = model_s = 0.0
    n = 0
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = next(it)
        sync(device)
        t1 = time.perf_counter()
        step(x, y)
        sync(device)
        t2 = time.perf_counter()
        data_s, model_s, n = data_s + t1 - t0, model_s + t2 - t1, n + x.shape[0]
    return {
        "images_per_s": n / (data_s + model_s),
        "data_s_per_step": data_s / steps,
        "model_s_per_step": model_s / steps,
        "data_fraction": data_s / (data_s + model_s),
    }


def save(result: dict, out: str | None) -> None:
    """Write ``result`` as JSON to ``out`` (if given), replacing it whole."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(out).with_suffix(".json.part")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--images", type=int, help="synthetic training JPEGs (CPU 320, CUDA 4096)")
    p.add_argument("--batch", type=int, help="batch size (CPU 8, CUDA 256)")
    p.add_argument("--steps", type=int, help="timed steps per net, model alone and end to end (CPU 30, CUDA 50)")
    p.add_argument("--loader-steps", type=int, help="timed batches per loader measurement (CPU 120, CUDA as --steps)")
    p.add_argument("--warmup", type=int, help="untimed steps first (CPU 2, CUDA one per worker, at least 10)")
    p.add_argument("--workers", type=int, help="DataLoader workers (CPU 1, CUDA one per core)")
    p.add_argument("--rounds", type=int, help="loader measurements per path, the paths taking turns; the median "
                                              "counts (CPU 5, CUDA 1)")
    p.add_argument("--size", default="500x375", help="JPEG width x height (ImageNet's typical 500x375)")
    p.add_argument("--depths", type=int, nargs="*", default=[18, 34], choices=[18, 34],
                   help="nets for the model and end-to-end figures (none: the loaders alone)")
    p.add_argument("--paths", nargs="+", choices=PATHS, help="pipelines to measure (default: all this device has)")
    p.add_argument("--lighting", action="store_true", help="include PCA colour lighting in the loader path")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--restart-workers", action="store_true",
                   help="measure as before 2026-12-03: the JPEGs once per epoch, so a short epoch restarts the "
                        "workers inside the timed steps (default: the file list repeated so that one epoch "
                        "holds every measurement)")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    images = args.images or (4096 if cuda else 320)
    batch = args.batch or (256 if cuda else 8)
    steps = args.steps or (50 if cuda else 30)
    workers = args.workers if args.workers is not None else (cores if cuda else 1)
    loader_rounds = args.rounds or (1 if cuda else 5)
    loader_steps = args.loader_steps or (steps if cuda else 120)
    # On CUDA the warm-up lets every worker deliver its first batch, so the timed steps start in the
    # steady state rather than on a queue the workers filled together.
    warmup = args.warmup if args.warmup is not None else (max(10, workers) if cuda else 2)
    # One epoch holds the warm-up, the timed steps and what the workers fetch ahead (2 batches each).
    epoch_batches = 0 if args.restart_workers else warmup + max(steps, loader_steps) + 2 * max(1, workers)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    paths = args.paths or [p for p in PATHS if cuda or p != "gpu"]
    if "gpu" in paths and not cuda:
        print("the gpu path needs CUDA; drop it from --paths or run on a GPU", file=sys.stderr)
        return 2
    lighting = Lighting(0.1).to(device) if args.lighting else None
    torch.manual_seed(0)
    if cuda:
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        mean_bytes = write_jpegs(Path(tmp), images, size)
        print(f"wrote {images} JPEGs of {size[0]}x{size[1]} ({mean_bytes / 1e3:.0f} KB each) "
              f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        loaders = {path: training_loader(Path(tmp), path, batch, workers, cuda, epoch_batches) for path in paths}
        repeats = len(next(iter(loaders.values())).dataset) // images
        main_threads = None if cuda else max(1, cores - workers)
        # Rounds with the paths taking turns, so that a change in the machine's speed hits them alike;
        # the median round.
        rounds: dict[str, list[float]] = {path: [] for path in loaders}
        for _ in range(loader_rounds):
            for path, loader in loaders.items():
                rounds[path].append(loader_throughput(loader, device, lighting, warmup, loader_steps, main_threads))
        loader_ips = {path: float(np.median(r)) for path, r in rounds.items()}
        worker_ips = worker_throughput(loaders)
        reference = loader_ips.get("resize-then-crop")
        one_worker = worker_ips.get("resize-then-crop")
        loader_rows = {
            path: {"images_per_s": ips, "rounds_images_per_s": rounds[path],
                   "images_per_s_per_worker": ips / max(1, workers),
                   "vs_resize_then_crop": None if reference is None else ips / reference,
                   "one_worker_images_per_s": worker_ips[path],
                   "one_worker_vs_resize_then_crop": None if one_worker is None else worker_ips[path] / one_worker}
            for path, ips in loader_ips.items()
        }
        print(f"partial decoding: {partial_decoding() or 'not built (crop-first is crop-first-pil)'}")
        print(f"{'path':<17} {'loader img/s':>12} {'per worker':>10} {'vs reference':>12} {'one worker':>10} {'vs reference':>12}")
        for path, r in loader_rows.items():
            ratio = "" if r["vs_resize_then_crop"] is None else f"{r['vs_resize_then_crop']:.2f}x"
            ratio1 = "" if r["one_worker_vs_resize_then_crop"] is None else f"{r['one_worker_vs_resize_then_crop']:.2f}x"
            print(f"{path:<17} {r['images_per_s']:>12.1f} {r['images_per_s_per_worker']:>10.1f} {ratio:>12} "
                  f"{r['one_worker_images_per_s']:>10.1f} {ratio1:>12}", flush=True)
        result = {
            "benchmark": "imagenet_throughput",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "cpu_cores": cores,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": Image.__version__,
            "partial_decoding": partial_decoding(),
            "python": platform.python_version(),
            "settings": {
                "images": images, "batch": batch, "steps": steps, "loader_steps": loader_steps, "warmup": warmup,
                "workers": workers,
                "epoch_images": images * repeats, "restart_workers": args.restart_workers,
                "loader_main_threads": main_threads, "loader_rounds": loader_rounds,
                "jpeg_size": list(size), "jpeg_mean_bytes": round(mean_bytes), "lighting": args.lighting,
                "compile": args.compile, "bf16_autocast": cuda, "channels_last": cuda,
            },
            "reference": "resize-then-crop",
            "loaders": loader_rows,
            "nets": [],
            "pixel_mean_pass": None,
        }
        # Written after each part, so that a run stopped at a time limit keeps what it measured.
        save(result, args.out)
        for depth in args.depths:
            step = make_step(depth, device, args.compile)
            model_ips = model_throughput(step, batch, device, warmup, steps)
            with torch.device("meta"):
                macs = count_macs(build_model("resnet", depth, shortcut="B", dataset="imagenet"), (3, 224, 224))
            net = {
                "model": f"resnet{depth}",
                "model_images_per_s": model_ips,
                # Forward + backward is about 3 forward passes; a MAC is 2 FLOPs.
                "model_tflops": 6 * macs * model_ips / 1e12,
                "end_to_end": {path: end_to_end(step, loader, device, lighting, warmup, steps)
                               for path, loader in loaders.items()},
            }
            result["nets"].append(net)
            save(result, args.out)
            print(f"{net['model']}: model alone {net['model_images_per_s']:.1f} img/s ({net['model_tflops']:.2f} TFLOP/s)")
            for path, e2e in net["end_to_end"].items():
                print(f"  {path:<17} end to end {e2e['images_per_s']:>9.1f} img/s, data {e2e['data_s_per_step']:.3f} s "
                      f"+ model {e2e['model_s_per_step']:.3f} s per step: {100 * e2e['data_fraction']:.1f}% waiting for data",
                      flush=True)
        mean_ips = mean_pass_throughput(Path(tmp), images, workers, device)

    base = reference or next(iter(loader_ips.values()))
    result["pixel_mean_pass"] = {
        "images_per_s": mean_ips,
        "ratio_to_training_loader": mean_ips / base,
        "imagenet_minutes": IMAGENET_TRAIN_IMAGES / mean_ips / 60,
    }
    print(f"per-pixel mean pass: {mean_ips:.1f} img/s; over ImageNet's {IMAGENET_TRAIN_IMAGES:,} training images: "
          f"{result['pixel_mean_pass']['imagenet_minutes']:.1f} min with {workers} workers")
    save(result, args.out)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
