"""What recording per-layer gradient norms costs a training step (`study.probes.GradientNorms`).

Times the paper's training step (forward, cross-entropy, backward, SGD step) on random CIFAR-sized
batches, without recording and with `GradientNorms` every N iterations, flushing the buffer to rows
once per epoch (391 iterations at 50k images / 128) as training does. torch.utils.benchmark times it
(it synchronises CUDA). Two numbers per setting: the difference in whole-step time (noisy on a busy
machine: it can even come out negative) and the time of the recording itself, timed on its own, as a
share of a step (the cost that recording adds, free of the step's noise).

    python benchmarks/gradient_overhead.py                          # ResNet-56, batch 128, auto device
    python benchmarks/gradient_overhead.py --depth 20 --batch-size 32 --device cpu --every 1,100
    python benchmarks/gradient_overhead.py --json results.json      # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from study.models import build_model
from study.probes import GradientNorms
from study.train import resolve_device

ITERATIONS_PER_EPOCH = 391  # CIFAR-10: ceil(50,000 / 128)


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, every: int | None):
    """One training step as `study.train` takes it, with gradient recording every `every` steps
    (None: none), and the buffer turned into rows once per epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    grads = GradientNorms(model, every) if every else None
    iteration = 0

    def step() -> None:
        nonlocal iteration
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        iteration += 1
        if grads is not None:
            grads.maybe_record(iteration)
            if iteration % ITERATIONS_PER_EPOCH == 0:
                grads.rows("bench")
        opt.step()

    return step


def recording_cost_ms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, every: int, min_time: float) -> float:
    """Milliseconds that recording adds per training step at interval `every`, measured directly:
    one `maybe_record` on real gradients, plus the epoch's flush to rows shared over its steps."""
    F.cross_entropy(model(x), y).backward()
    grads = GradientNorms(model, every=1)
    record = benchmark.Timer(stmt="g.maybe_record(1)", globals={"g": grads}).blocked_autorange(min_run_time=min_time)
    grads.rows("bench")
    recordings = max(ITERATIONS_PER_EPOCH // every, 1)
    for _ in range(recordings):
        grads.maybe_record(1)
    flush = benchmark.Timer(stmt="g.rows('bench')", globals={"g": grads}).timeit(1)
    model.zero_grad(set_to_none=True)
    return record.median * 1e3 / every + flush.median * 1e3 / ITERATIONS_PER_EPOCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("plain", "resnet"), default="resnet")
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--every", default="100,1", help="recording intervals to time, e.g. 100,10,1")
    parser.add_argument("--min-time", type=float, default=5.0, help="seconds of timing per setting")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (evens out a drifting load)")
    parser.add_argument("--out", "--json", dest="json", help="also write the results to this file as JSON")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(args.arch, args.depth).to(device).train()
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    settings = [None] + [int(e) for e in args.every.split(",")]
    steps = {every: make_step(model, x, y, every) for every in settings}
    for step in steps.values():
        for _ in range(3):  # warm-up: allocator, cuDNN autotuning
            step()
    # Settings take turns, so a load that drifts over the run hits them alike.
    times: dict = {every: [] for every in settings}
    for _ in range(args.rounds):
        for every, step in steps.items():
            m = benchmark.Timer(stmt="step()", globals={"step": step}).blocked_autorange(
                min_run_time=args.min_time / args.rounds
            )
            times[every] += m.times
    base = torch.tensor(times[None]).median().item() * 1e3
    results = []
    for every in settings:
        measured = torch.tensor(times[every]).median().item() * 1e3
        row = {
            "every": every,
            "median_ms": measured,
            "steps": len(times[every]),
            "measured_overhead_pct": 100 * (measured / base - 1),
        }
        if every is not None:
            row["recording_ms_per_step"] = recording_cost_ms(model, x, y, every, min(args.min_time, 2.0))
            row["direct_overhead_pct"] = 100 * row["recording_ms_per_step"] / base
        results.append(row)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{args.arch}-{args.depth}, batch {args.batch_size}, {device} ({name}), torch {torch.__version__}")
    for r in results:
        label = "no recording" if r["every"] is None else f"every {r['every']} it."
        line = f"  {label:<14} {r['median_ms']:8.2f} ms/step ({r['steps']} timed blocks)"
        if r["every"] is not None:
            line += (
                f"  step-time difference {r['measured_overhead_pct']:+.2f}%;"
                f" recording itself {r['recording_ms_per_step']:.4f} ms/step = {r['direct_overhead_pct']:.3f}%"
            )
        print(line)
    if args.json:
        meta = {
            "arch": args.arch,
            "depth": args.depth,
            "batch_size": args.batch_size,
            "device": str(device),
            "device_name": name,
            "torch": torch.__version__,
        }
        with open(args.json, "w") as f:
            json.dump({**meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
