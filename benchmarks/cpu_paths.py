"""One SGD step of the CIFAR-style nets on a CPU, by execution path, side by side in one run.

Issue 29's question: which path should `study run` take on a CPU? Each path trains the same net
(`study.models.build_model`, the paper's option-A ResNet; a plain twin costs the same) with the
loop's own step (`study.train.step.sgd_step`: forward under autocast, cross-entropy, backward, SGD
with the paper's momentum and weight decay) on real Fashion-MNIST images (the embedded subset,
28x28, normalised as the feed does), at the paper's batch size 128:

- `fp32` (the default today): float32, NCHW, eager;
- `fp32-cl`: channels-last weights and inputs;
- `fp32-compile`, `fp32-cl-compile`: the same under `torch.compile` (inductor);
- `bf16`, `bf16-compile`, `bf16-cl`, `bf16-cl-compile`: bf16 autocast (a deviation from the paper, `--precision bf16`).

For each net, every path is built and warmed up first (its one-time cost: building, compiling, the
first steps); then the paths take turns, `--rounds` rounds of `--steps` timed steps each, in
alternating order (forward, then backward), so that a drift in the machine's speed (a VM's
neighbours) falls on all paths alike. A path's ms per step is the median of all its timed steps;
its ratio to `fp32` is the median over rounds of the ratio within the round. The JSON records the
CPU's model and its relevant flags (AVX-512, AVX-512 BF16, AMX), torch's version and thread count,
and the date. Run it on an otherwise idle machine:

    python benchmarks/cpu_paths.py --out benchmarks/results/cpu_paths_<machine>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from study.data import load_data, normalize
from study.models import build_model
from study.runstore import cpu_flags, cpu_model
from study.train.step import compile_model, sgd_step

PATHS = {  # name: (bf16 autocast, channels-last, compiled)
    "fp32": (False, False, False),
    "fp32-cl": (False, True, False),
    "fp32-compile": (False, False, True),
    "fp32-cl-compile": (False, True, True),
    "bf16": (True, False, False),
    "bf16-compile": (True, False, True),
    "bf16-cl": (True, True, False),
    "bf16-cl-compile": (True, True, True),
}
class Built:
    """One net built for one path, warmed up, ready to be timed."""

    def __init__(self, depth: int, path: str, x: torch.Tensor, y: torch.Tensor, *, warmup: int) -> None:
        bf16, channels_last, compiled = PATHS[path]
        start = time.perf_counter()
        torch.manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = build_model("resnet", depth, in_channels=1, dataset="fashion-mnist").to(memory_format=fmt).train()
        self.forward = compile_model(model, torch.device("cpu")) if compiled else model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        self.x, self.y = x.contiguous(memory_format=fmt), y
        self.time(warmup)
        self.onetime_s = time.perf_counter() - start

    def time(self, steps: int) -> list[float]:
        """The ms of each of `steps` SGD steps."""
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            loss, _ = sgd_step(self.forward, self.opt, self.x, self.y, 0.1, self.autocast)
            loss.item()  # the step's work is done (the CPU runs it synchronously anyway)
            times.append(1000 * (time.perf_counter() - t))
        return times


def time_net(depth: int, paths: list[str], x: torch.Tensor, y: torch.Tensor, *, warmup: int, steps: int,
             rounds: int) -> dict[str, dict]:
    """Every path of one net: built and warmed up, then timed in `rounds` alternating rounds."""
    torch._dynamo.reset()  # this net's compiled paths from scratch
    built = {path: Built(depth, path, x, y, warmup=warmup) for path in paths}
    per_round: dict[str, list[float]] = {path: [] for path in paths}
    all_ms: dict[str, list[float]] = {path: [] for path in paths}
    for r in range(rounds):
        for path in paths if r % 2 == 0 else paths[::-1]:
            times = built[path].time(steps)
            all_ms[path] += times
            per_round[path].append(statistics.median(times))
    rows = {}
    for path in paths:
        rows[path] = {"onetime_s": built[path].onetime_s, "ms_per_step": statistics.median(all_ms[path]),
                      "ms_per_round": per_round[path], "ms_all": all_ms[path]}
        if "fp32" in per_round:
            rows[path]["speedup_vs_fp32"] = statistics.median(
                b / t for b, t in zip(per_round["fp32"], per_round[path]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="8,20,56,110", help="6n+2 depths (default 8,20,56,110)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    p.add_argument("--steps", type=int, default=4, help="timed steps per net, path and round (default 4)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds over the paths (default 5)")
    p.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default 3)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    depths = [int(d) for d in args.depths.split(",")]
    paths = args.paths.split(",")
    unknown = [q for q in paths if q not in PATHS]
    if unknown:
        p.error(f"unknown path {unknown[0]!r}; choose from {', '.join(PATHS)}")

    data = load_data("fashion-mnist-mini")
    x = normalize(data.train.images[: args.batch_size], data.mean)
    y = data.train.labels[: args.batch_size]
    record = {
        "benchmark": "cpu_paths",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "nets": {},
    }
    print(f"{record['cpu']}, {record['threads']} threads, torch {record['torch']}, flags "
          + ", ".join(f for f, on in record["cpu_flags"].items() if on))
    print(f"{'net':<10} {'path':<16} {'ms/step':>9} {'vs fp32':>8} {'one-time s':>11}")
    for depth in depths:
        rows = record["nets"][f"resnet{depth}"] = time_net(depth, paths, x, y, warmup=args.warmup, steps=args.steps,
                                                           rounds=args.rounds)
        for path, row in rows.items():
            ratio = row.get("speedup_vs_fp32", float("nan"))
            print(f"{'ResNet-' + str(depth):<10} {path:<16} {row['ms_per_step']:>9.1f} {ratio:>7.2f}x "
                  f"{row['onetime_s']:>11.1f}", flush=True)
        if args.out:  # after each net: a stopped run keeps what it measured
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
