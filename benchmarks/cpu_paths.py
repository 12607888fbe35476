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
from datetime import datetime, timezone
from pathlib import Path

import torch

from study.data import load_data, normalize
from study.models import build_model
from study.runstore import cpu_flags, cpu_model
from study.train.cpupath import alternate, warmed_step

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
def time_net(depth: int, paths: list[str], x: torch.Tensor, y: torch.Tensor, *, warmup: int, steps: int,
             rounds: int) -> dict[str, dict]:
    """Every path of one net: built and warmed up (`study.train.cpupath.warmed_step`), then timed in
    `rounds` alternating rounds (`cpupath.alternate`), as `study run --cpu-path auto` times them."""
    torch._dynamo.reset()  # this net's compiled paths from scratch
    built, onetime = {}, {}
    for path in paths:
        bf16, channels_last, compiled = PATHS[path]
        torch.manual_seed(0)
        built[path], onetime[path] = warmed_step(
            lambda: build_model("resnet", depth, in_channels=1, dataset="fashion-mnist"), x, y,
            channels_last=channels_last, compiled=compiled, bf16=bf16, lr=0.1, momentum=0.9, weight_decay=1e-4,
            warmup=warmup)
    times = alternate(built, rounds, steps)
    per_round = {path: [statistics.median(r) for r in times[path]] for path in paths}
    rows = {}
    for path in paths:
        rows[path] = {"onetime_s": onetime[path], "ms_per_step": statistics.median(ms for r in times[path] for ms in r),
                      "ms_per_round": per_round[path], "ms_all": [ms for r in times[path] for ms in r]}
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
            ratio = row.get("speedup_vs_fp32")  # none where fp32 was not among the --paths
            ratio = "-" if ratio is None else f"{ratio:.2f}x"
            print(f"{'ResNet-' + str(depth):<10} {path:<16} {row['ms_per_step']:>9.1f} {ratio:>8} "
                  f"{row['onetime_s']:>11.1f}", flush=True)
        if args.out:  # after each net: a stopped run keeps what it measured
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
