"""How a list of runs is trained: the device, the processes, how many runs a process trains at once
and how it takes a step. `ExecutionPlan.check` is the one place that says which combinations of
`--concurrency`, `--streams`, `--fuse`, `--compile`, `--cuda-graph`, `--sync-bn`, `--decode`, torchrun
and `--launcher slurm` are allowed; every entry point (`study run`, `run_all`, `train_steps`, the
SLURM submitter) asks it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..config import ConfigError, RunConfig

AUTO_GPU_CONCURRENCY = 4  # runs sharing one GPU when --concurrency is not given


@dataclass(frozen=True)
class ExecutionPlan:
    """`device` as asked (`auto`, `cpu`, `cuda[:N]`); `processes` train each run together (torchrun
    or `--gpus-per-run`); `concurrency` processes share the device (None: auto); each trains
    `streams` runs interleaved or `fuse` runs fused at once; each step is eager, compiled or a CUDA
    graph. `decode`: where ImageNet's training JPEGs are decoded (`cpu` workers, or `gpu`)."""

    device: str = "auto"
    processes: int = 1
    concurrency: int | None = 1
    streams: int = 1
    fuse: int = 1
    compile: bool = False
    cuda_graph: bool = False
    sync_bn: bool = False
    launcher: str = "local"
    decode: str = "cpu"

    @classmethod
    def from_args(cls, args: object, processes: int) -> "ExecutionPlan":
        """The plan `study run`'s options ask for (an argparse Namespace; options it lacks take their
        defaults), with `processes` per run (torchrun's, or `--gpus-per-run` on SLURM)."""
        def get(name: str, default: object) -> object:
            value = getattr(args, name, None)
            return default if value is None else value

        return cls(device=str(get("device", "auto")), processes=processes, concurrency=getattr(args, "concurrency", None),
                   streams=get("streams", 1), fuse=get("fuse", 1), compile=bool(get("compile", False)),
                   cuda_graph=bool(get("cuda_graph", False)), sync_bn=bool(get("sync_bn", False)),
                   launcher=str(get("launcher", "local")), decode=str(get("decode", "cpu")))

    @property
    def runs_at_once(self) -> int:
        """Runs one process trains at once."""
        return max(self.streams, self.fuse)

    @property
    def step_kind(self) -> str:
        """What a run records as its `step` in config.json's provenance."""
        kind = "cuda-graph" if self.cuda_graph else "compiled" if self.compile else "eager"
        return f"fused-{kind}" if self.fuse > 1 else kind

    def check(self, configs: Iterable[RunConfig], device: str | None = None) -> None:
        """ConfigError naming the fix if this plan cannot train `configs`. The checks that need the
        device run when `device` (the resolved one, e.g. `cpu` or `cuda:0`) is given."""
        configs = list(configs)
        slurm = self.launcher == "slurm"
        if self.sync_bn and self.processes == 1:
            raise ConfigError("--sync-bn applies to runs launched by torchrun over several processes; drop it")
        if slurm:
            if self.concurrency not in (None, 1):
                raise ConfigError("--concurrency does not apply to --launcher slurm (each run is its own array task); "
                                  "use --slurm-array-parallelism")
            for flag, value in (("streams", self.streams), ("fuse", self.fuse)):
                if value not in (None, 1):
                    raise ConfigError(f"--{flag} does not apply to --launcher slurm (each run is its own array task); drop it")
            if self.processes > 1 and self.device == "cpu":
                raise ConfigError(f"--gpus-per-run {self.processes} trains on GPUs; drop --device cpu")
        ddp = self.processes > 1 and not slurm
        if ddp and self.concurrency not in (None, 1):
            raise ConfigError("--concurrency shares one device between runs; under torchrun each run uses all processes, drop it")
        if self.streams < 1:
            raise ConfigError(f"--streams must be at least 1; got {self.streams}")
        if ddp and self.streams > 1:
            raise ConfigError("--streams interleaves runs in one process; under torchrun each run uses all processes, drop it")
        if self.fuse < 1:
            raise ConfigError(f"--fuse must be at least 1; got {self.fuse}")
        if self.fuse > 1 and self.streams > 1:
            raise ConfigError("--fuse and --streams are two ways to train several runs in one process; pick one")
        if self.fuse > 1:
            if self.compile:
                raise ConfigError("--fuse with --compile is not supported; use --fuse with --cuda-graph on a GPU")
            _check_one_process_cifar_step("--fuse", configs, self.processes)
        if device is None and not slurm and self.device != "auto":
            device = self.device  # as given: --device cpu is known to be no GPU before it is resolved
        if self.cuda_graph:
            if slurm and self.device == "cpu":
                raise ConfigError("--cuda-graph captures CUDA graphs and needs a GPU; drop it or --device cpu")
            if device is not None and not device.startswith("cuda"):
                raise ConfigError(f"--cuda-graph captures CUDA graphs and needs a GPU (the device is {device}); drop it")
            if self.compile:
                raise ConfigError("--cuda-graph and --compile are two ways to remove launch overhead; pick one")
            _check_one_process_cifar_step("--cuda-graph", configs, self.processes)
        if self.decode == "gpu":
            cifar = next((cfg.run_id for cfg in configs if not cfg.imagenet), None)
            if cifar is not None:
                raise ConfigError(f"--decode applies only to ImageNet runs ({cifar} is not one); drop --decode")
            if device is not None and not device.startswith("cuda"):
                raise ConfigError(f"--decode gpu decodes JPEGs with the GPU's decoder and needs CUDA (the device is {device}); "
                                  "use --decode cpu")
        if self.streams > 1 and self.compile and device is not None and device.startswith("cuda"):
            # torch.compile's CUDA graphs share one memory pool that assumes replays in one order on
            # one stream; interleaving compiled runs on several streams is untested.
            raise ConfigError("--streams with --compile is not supported on a GPU; use --streams with --cuda-graph")

    def processes_per_device(self, device_type: str, runs: int, ddp: bool) -> int:
        """`concurrency`, or when it is auto: a few processes share a GPU (unless runs are
        interleaved or fused in one), one at a time on a CPU."""
        if self.concurrency is not None:
            return self.concurrency
        auto = device_type == "cuda" and not ddp and self.runs_at_once == 1
        return min(AUTO_GPU_CONCURRENCY, runs) if auto else 1


def _check_one_process_cifar_step(flag: str, configs: list[RunConfig], processes: int) -> None:
    """What `flag`'s step needs: one process, the CIFAR-style nets, whole batches in one BN group."""
    if processes > 1:
        raise ConfigError(f"{flag} trains a run in one process; drop it under torchrun or --gpus-per-run > 1")
    for cfg in configs:
        if cfg.imagenet:
            raise ConfigError(f"{flag} is for the CIFAR-style data sets; {cfg.run_id} is ImageNet, drop it")
        if cfg.batch_split > 1:
            raise ConfigError(f"{flag} does not split BN over parts of a batch ({cfg.run_id}); drop one of them")


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


def default_workers() -> int:
    """DataLoader workers per process for ImageNet: the CPUs this process may use, at most 12."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(12, cpus))
