"""How a run trains on a CPU: the layout of its tensors and whether it is compiled, chosen by
measurement (`study run --cpu-path auto`, the default).

The same fp32 step can run four ways on a CPU: NCHW or channels-last tensors, eager or under
`torch.compile`. Which is fastest depends on the CPU (oneDNN uses AVX-512 and AMX kernels for some
layouts and not others), the net and the thread count, so `study run` measures them: a few SGD
steps of the run's own net at its batch size, on random inputs, each path in turn. A path wins
when its one-time cost (compiling) plus the run's steps at its measured speed beat the eager NCHW
path (today's and the paper's reference path) by at least `MARGIN`. All paths compute the paper's
step; they differ only in float rounding.

The measurements are kept per CPU model, flags, torch version, thread count, net, input shape,
batch size and precision in a cache file (`cache_path`), so that the same command on the same
machine takes the same path, and trains to the same metrics, every time. A run records its path in
config.json's provenance (`cpu_path`) and keeps it when it resumes. Short runs (fewer than
`PROBE_MIN_ITERATIONS`) are not worth measuring and take the eager NCHW path (compiled with
`--compile`).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..config import CPU_PATH_CHOICES, CPU_PATHS, RunConfig  # noqa: F401 (CPU_PATH_CHOICES: re-exported)
from ..runstore import atomic_write_text, bf16_unit_names, cpu_flags, cpu_model, duration
from ..stopflag import StopFlag
from .signals import raise_if_stopped

#: Runs shorter than this take the eager path without measuring: the probe (about 40 steps and two
#: compilations) would cost more than a faster path could save.
PROBE_MIN_ITERATIONS = 2000
#: A path must beat eager NCHW by this fraction of the run's estimated time to be taken.
MARGIN = 0.05
WARMUP_STEPS, ROUNDS, STEPS_PER_ROUND = 2, 3, 3
#: Measured beside the run's own precision, for the user's note (`choose`): channels-last eager in
#: the precision named, {name: bf16 autocast on}.
OTHER_PRECISION = {"bf16": True, "fp32": False}


def cache_path() -> Path:
    """Where measurements are kept: $STUDY_CACHE_DIR, else $XDG_CACHE_HOME/study, else ~/.cache/study."""
    base = os.environ.get("STUDY_CACHE_DIR")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "study")
    return Path(base) / "cpu-paths.json"


def bf16_units() -> list[str]:
    """The bf16 matrix units this CPU reports (e.g. ['AMX-BF16', 'AVX-512 BF16']); empty if none
    or unknown (no /proc/cpuinfo)."""
    return bf16_unit_names(flag for flag, on in cpu_flags().items() if on)


@dataclass(frozen=True)
class CpuPath:
    """The path a run trains with, how it was chosen (`given` by --cpu-path, `resumed` from the
    run's config.json, `short run`, `measured` now or `cached`), and the measurements behind it
    (ms per step and one-time seconds per path; `bf16` is measured for the note only)."""

    name: str
    how: str
    ms_per_step: dict[str, float] = field(default_factory=dict)
    onetime_s: dict[str, float] = field(default_factory=dict)

    @property
    def channels_last(self) -> bool:
        return CPU_PATHS[self.name][0]

    @property
    def compiled(self) -> bool:
        return CPU_PATHS[self.name][1]

    def record(self) -> dict:
        """What config.json's provenance says of it."""
        out: dict = {"name": self.name, "chosen": self.how}
        if self.ms_per_step:
            out["ms_per_step"] = {k: round(v, 2) for k, v in self.ms_per_step.items()}
            out["onetime_s"] = {k: round(v, 2) for k, v in self.onetime_s.items()}
        return out


def decide(measured: dict[str, float], onetime: dict[str, float], iterations: int) -> str:
    """The path with the least estimated time for `iterations` steps (one-time cost plus steps),
    if it beats eager (or, without eager among them, the first) by `MARGIN`; else that one."""
    paths = [p for p in CPU_PATHS if p in measured]
    base = "eager" if "eager" in measured else paths[0]

    def total(p: str) -> float:
        return onetime.get(p, 0.0) + iterations * measured[p] / 1000

    best = min(paths, key=total)
    return best if total(best) < (1 - MARGIN) * total(base) else base


def cache_key(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int, bf16: bool) -> str:
    flags = ",".join(f for f, on in sorted(cpu_flags().items()) if on)
    return (f"{cpu_model()} [{flags}] | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"{cfg.arch}-{cfg.depth}-{cfg.shortcut} | {'x'.join(map(str, input_shape))} -> {num_classes} | "
            f"batch {cfg.batch_size}/{cfg.batch_split} | {'bf16' if bf16 else 'fp32'}")


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _cache_lock(log: Callable[[str], None]) -> Iterator[None]:
    """Hold the cache's lock (a sidecar file) while one process checks, measures and writes: two
    `--concurrency` processes starting runs of one net then measure once and take the same path.
    Where no lock can be taken (no fcntl, an unwritable cache folder), go on without one."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 (closed below)
    except OSError:
        yield
        return
    try:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # Windows: no lock; at worst an entry is measured twice
            pass
        yield
    finally:
        lock.close()


def _write_cache(key: str, entry: dict, log: Callable[[str], None]) -> None:
    """Add `entry` to the cache (under `_cache_lock`)."""
    path = cache_path()
    try:
        data = _read_cache()
        data[key] = entry
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        log(f"study: could not keep the CPU path measurements in {path} ({e.strerror or e}); "
            "the next run will measure again (set STUDY_CACHE_DIR to a writable folder)")


def warmed_step(build: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor, *, channels_last: bool,
                compiled: bool, bf16: bool, lr: float, momentum: float, weight_decay: float,
                warmup: int, between: Callable[[], None] = lambda: None) -> tuple[Callable[[], None], float]:
    """One SGD step of the net `build` makes (the loop's own `sgd_step`, on the batch `x`, `y`) in a
    layout, compilation and precision, warmed up by `warmup` steps; and its one-time cost in seconds
    (building, compiling, the warm-up steps). The step waits for its loss, so a caller can time it.
    `between` is called before each warm-up step (it may raise to stop)."""
    from .step import compile_model, sgd_step

    start = time.perf_counter()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build().to(memory_format=fmt).train()
    forward = compile_model(model, torch.device("cpu")) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    xs = x.contiguous(memory_format=fmt)

    def step() -> None:
        sgd_step(forward, opt, xs, y, lr, autocast)[0].item()

    for _ in range(warmup):
        between()
        step()
    return step, time.perf_counter() - start


def alternate(steps: dict[str, Callable[[], None]], rounds: int, per_round: int,
              between: Callable[[], None] = lambda: None) -> dict[str, list[list[float]]]:
    """The ms of each timed call of each of `steps`: `rounds` rounds of `per_round` calls of each,
    in an order that reverses every round, so that a drift in the machine's speed (a VM's
    neighbours) falls on all alike. {name: one list of ms per round}. `between` is called before
    each timed call, outside its time (it may raise to stop)."""
    names = list(steps)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            ms = []
            for _ in range(per_round):
                between()
                t = time.perf_counter()
                steps[name]()
                ms.append(1000 * (time.perf_counter() - t))
            times[name].append(ms)
    return times


def probe(cfg: RunConfig, paths: list[str], input_shape: tuple[int, ...], num_classes: int, *,
          bf16: bool, stop: StopFlag | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """ms per SGD step and one-time seconds (building, compiling, `WARMUP_STEPS` steps) of the run's
    net on each of `paths` (a name of CPU_PATHS, in the run's precision `bf16`; or one of
    `OTHER_PRECISION`, channels-last eager in the precision it names), timed in `ROUNDS` alternating
    rounds (`alternate`). Random inputs from a generator of its own; the global random state is left
    as it was. A signal in `stop` ends it between steps with StopRequested (nothing measured is kept)."""
    from ..models import model_for

    gen = torch.Generator().manual_seed(0)
    x = torch.randn((cfg.batch_size, *input_shape), generator=gen)
    y = torch.randint(0, num_classes, (cfg.batch_size,), generator=gen)
    built, onetime = {}, {}
    with torch.random.fork_rng(devices=[]):
        for path in paths:
            channels_last, compiled = CPU_PATHS.get(path, (True, False))
            built[path], onetime[path] = warmed_step(
                lambda: model_for(cfg, num_classes, input_shape[0]), x, y, channels_last=channels_last,
                compiled=compiled, bf16=OTHER_PRECISION.get(path, bf16), lr=0.01, momentum=cfg.momentum,
                weight_decay=cfg.weight_decay, warmup=WARMUP_STEPS, between=lambda: raise_if_stopped(stop))
        times = alternate(built, ROUNDS, STEPS_PER_ROUND, between=lambda: raise_if_stopped(stop))
    return {p: statistics.median(ms for r in rounds for ms in r) for p, rounds in times.items()}, onetime


def choose(cfg: RunConfig, asked: str, *, compile: bool, input_shape: tuple[int, ...], num_classes: int,
           recorded: str | None, iterations_left: int, log: Callable[[str], None],
           stop: StopFlag | None = None) -> CpuPath:
    """The CPU path of one run: `asked` (--cpu-path) unless it is `auto`; then the one the run
    recorded when it started (a resumed run keeps it); then, for a run too short to measure, eager
    (compiled with `compile`); else the fastest by measurement (among the compiled paths with
    `compile`), from the cache or measured now and cached. Its line gives the run's time at that
    speed. The other precision is measured too where the user should hear of it: bf16 on a CPU with
    bf16 units, fp32 for a bf16 run on a CPU without them (emulated bf16 can be many times slower).
    A signal in `stop` during the measurement raises StopRequested at once."""
    if asked != "auto":
        return CpuPath(asked, "given")
    if recorded in CPU_PATHS:
        unlike = " (not compiled, although --compile was given)" if compile and not CPU_PATHS[recorded][1] else ""
        log(f"{cfg.run_id}: CPU path {recorded}, kept from the run's first session{unlike}")
        return CpuPath(recorded, "resumed")
    if cfg.iterations < PROBE_MIN_ITERATIONS:
        return CpuPath("compiled" if compile else "eager", "short run")
    candidates = [p for p, (_, compiled) in CPU_PATHS.items() if compiled or not compile]
    measure_bf16 = not cfg.bf16 and bool(bf16_units())
    measure_fp32 = cfg.bf16 and not bf16_units() and bool(cpu_flags())
    wanted = candidates + (["bf16"] if measure_bf16 else []) + (["fp32"] if measure_fp32 else [])
    key = cache_key(cfg, input_shape, num_classes, cfg.bf16)
    with _cache_lock(log):
        entry = _read_cache().get(key, {})
        how, took = "cached", ""
        if not all(p in entry.get("ms_per_step", {}) for p in wanted):
            # All candidates together (not only those missing): their times are compared with each other.
            start = time.perf_counter()
            ms, onetime = probe(cfg, wanted, input_shape, num_classes, bf16=cfg.bf16, stop=stop)
            entry = {"ms_per_step": {**entry.get("ms_per_step", {}), **ms},
                     "onetime_s": {**entry.get("onetime_s", {}), **onetime},
                     "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            _write_cache(key, entry, log)
            how, took = "measured", f" in {time.perf_counter() - start:.0f} s"
    ms = {p: float(entry["ms_per_step"][p]) for p in wanted}
    onetime = {p: float(entry["onetime_s"][p]) for p in wanted}
    name = decide({p: ms[p] for p in candidates}, onetime, iterations_left)
    base = candidates[0]
    gain = f", {ms[base] / ms[name]:.2f}x {base}'s speed" if name != base else ""
    steps_take = duration(iterations_left * ms[name] / 1000)
    log(f"{cfg.run_id}: CPU path {name} ({ms[name]:.0f} ms a step{gain}: about {steps_take} of steps for the "
        f"{iterations_left:,} iterations left; {how}{took}, {cache_path()}; --cpu-path to choose)")
    if measure_bf16:
        say_once(f"study: this CPU has bf16 matrix units ({', '.join(bf16_units())}): --precision bf16 (a deviation "
                 f"from the paper's fp32) measured {ms[name] / ms['bf16']:.2f}x this path's speed for "
                 f"{cfg.arch}-{cfg.depth} here", log)
    if measure_fp32:
        # The run's first line (`precision_note`) said bf16 is emulated here; this one gives the measured cost.
        say_once(f"study: emulated bf16 measured against fp32, the paper's precision: fp32 "
                 f"{ms[name] / ms['fp32']:.1f}x this path's speed for {cfg.arch}-{cfg.depth} here "
                 "(--precision fp32 for it; a bf16 study keeps its precision)", log)
    return CpuPath(name, how, ms, onetime)


_said: set[str] = set()


def say_once(line: str, log: Callable[[str], None]) -> None:
    """Log `line` once per process (a grid's runs share the note)."""
    if line not in _said:
        _said.add(line)
        log(line)


def precision_note(cfg: RunConfig, log: Callable[[str], None]) -> None:
    """One line, once per process, on what bf16 means on this CPU: emulated (slow) without bf16
    units; for an fp32 run on a CPU with them, that --precision bf16 would use them (a measured run
    says by how much, in `choose`)."""
    units = bf16_units()
    if cfg.bf16 and not units and cpu_flags():
        say_once("study: this CPU has no bf16 units (neither AMX-BF16 nor AVX-512 BF16): --precision bf16 is "
                 "emulated here and may train slower than fp32", log)
    elif not cfg.bf16 and units and cfg.iterations < PROBE_MIN_ITERATIONS:
        say_once(f"study: this CPU has bf16 matrix units ({', '.join(units)}): --precision bf16 would use them "
                 "(faster; a deviation from the paper's fp32)", log)
