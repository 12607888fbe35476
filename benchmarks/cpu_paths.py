"""One SGD step of the CIFAR-style nets on a CPU, by execution path, side by side in one run.

Issue 29's question: which path should `study run` take on a CPU? Each path trains the same net
(`study.models.build_model`, the paper's option-A ResNet; a plain twin costs the same) with the
loop's own step (`study.train.step.sgd_step`: forward under autocast, cross-entropy, backward, SGD
with the paper's momentum and weight decay) on real Fashion-MNIST images (the embedded subset,
28x28, normalised as the feed does), at the paper's batch size 128:

- `fp32` (the default today): float32, NCHW, eager;
- `fp32-cl`: channels-last weights and inputs;
- `fp32-compile`, `fp32-cl-compile`: the same under `torch.compile` (inductor);
- `bf16`, `bf16-cl`, `bf16-cl-compile`: bf16 autocast (a deviation from the paper, `--precision bf16`).

For each net and path: one-time cost (building, compiling, the first steps) and the median ms per
step over the timed steps, with the ratio to `fp32` measured in the same run. The JSON records the
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
from study.runstore import cpu_model
from study.train.step import sgd_step

PATHS = {  # name: (bf16 autocast, channels-last, compiled)
    "fp32": (False, False, False),
    "fp32-cl": (False, True, False),
    "fp32-compile": (False, False, True),
    "fp32-cl-compile": (False, True, True),
    "bf16": (True, False, False),
    "bf16-cl": (True, True, False),
    "bf16-cl-compile": (True, True, True),
}
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def cpu_flags() -> dict[str, bool]:
    """Which of FLAGS the CPU reports (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    words = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    return {flag: flag in words for flag in FLAGS}


def time_path(depth: int, path: str, x: torch.Tensor, y: torch.Tensor, *, warmup: int, steps: int) -> dict:
    """One net on one path: seconds of one-time work (build, compile, `warmup` steps) and the ms of
    each of `steps` timed steps."""
    bf16, channels_last, compiled = PATHS[path]
    torch._dynamo.reset()  # each compiled path from scratch (no recompile limit reached across paths)
    start = time.perf_counter()
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model("resnet", depth, in_channels=1, dataset="fashion-mnist").to(memory_format=fmt).train()
    forward = torch.compile(model, dynamic=False) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    xs = x.contiguous(memory_format=fmt)
    for _ in range(warmup):
        sgd_step(forward, opt, xs, y, 0.1, autocast)
    onetime = time.perf_counter() - start
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss, _ = sgd_step(forward, opt, xs, y, 0.1, autocast)
        loss.item()  # the step's work is done (the CPU runs it synchronously anyway)
        times.append(1000 * (time.perf_counter() - t))
    return {"onetime_s": onetime, "ms_per_step": statistics.median(times), "ms_all": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="8,20,56,110", help="6n+2 depths (default 8,20,56,110)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    p.add_argument("--steps", type=int, default=6, help="timed steps per net and path (default 6)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default 3)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
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
        "warmup": args.warmup,
        "nets": {},
    }
    print(f"{record['cpu']}, {record['threads']} threads, torch {record['torch']}, flags "
          + ", ".join(f for f, on in record["cpu_flags"].items() if on))
    print(f"{'net':<10} {'path':<16} {'ms/step':>9} {'vs fp32':>8} {'one-time s':>11}")
    for depth in depths:
        rows = record["nets"][f"resnet{depth}"] = {}
        for path in paths:
            rows[path] = time_path(depth, path, x, y, warmup=args.warmup, steps=args.steps)
            base = rows.get("fp32", {}).get("ms_per_step")
            ratio = base / rows[path]["ms_per_step"] if base else float("nan")
            rows[path]["speedup_vs_fp32"] = ratio
            print(f"{'ResNet-' + str(depth):<10} {path:<16} {rows[path]['ms_per_step']:>9.1f} {ratio:>7.2f}x "
                  f"{rows[path]['onetime_s']:>11.1f}", flush=True)
            if args.out:  # after each row: a stopped run keeps what it measured
                Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
