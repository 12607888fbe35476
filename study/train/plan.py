"""How a list of runs is trained: the device, the processes, how many runs a process trains at once
and how it takes a step.

An `ExecutionPlan` is built and checked once, where the command line (or a SLURM array task) is
read, and it alone carries the execution modes from there on: through `run_all`, the list runner,
`train_steps`, the `--concurrency` worker processes and `study.launch.SlurmTask`. `check` is the one
place that says which combinations of `--concurrency`, `--streams`, `--fuse`, `--compile`,
`--cuda-graph`, `--sync-bn`, `--decode`, `--workers`, `--download`, the SLURM flags, torchrun and
`--launcher slurm` are allowed, and which batch splits the processes can honour. The plan also
builds what the loop trains with: the network (`trainee`, compiled or not) and the step (`step`:
eager, compiled, replayed as a CUDA graph, or a member of a fused group), which the loop calls the
same way whatever it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch

from ..config import ConfigError, RunConfig
from ..probes import GradientNorms
from ..stopflag import StopFlag
from . import cpupath
from .cpupath import CPU_PATHS, CpuPath
from .distributed import Distributed
from ..models import memory_format
from .step import CapturedStep, EagerStep, FusedMemberStep, Step, Trainee, make_trainee

AUTO_GPU_CONCURRENCY = 4  # runs sharing one GPU when --concurrency is not given
#: The devices a SLURM array task may be told to use (its node's GPUs, or its CPUs).
SLURM_DEVICES = r"auto|cpu|cuda(:\d+)?"


@dataclass(frozen=True)
class ExecutionPlan:
    """`device` as asked (`auto`, `cpu`, `cuda[:N]`); `processes` train each run together (torchrun
    or `--gpus-per-run`), with BN per device or over all of them (`sync_bn`); `concurrency`
    processes share the device (None: auto); each trains `streams` runs interleaved or `fuse` runs
    fused at once; each step is eager, compiled or a CUDA graph. ImageNet's training JPEGs are
    read by `workers` DataLoader workers per process (None: `default_workers`) and decoded there or
    on the GPU (`decode`). `download` fetches a missing data set; `slurm_flags` are the SLURM
    options given (they need `launcher="slurm"`). On a CPU, `cpu_path` is the layout and compilation
    of a run's step (`study.train.cpupath`): `auto` until `for_run` resolves it for one run."""

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
    workers: int | None = None
    download: bool = False
    slurm_flags: tuple[str, ...] = ()
    cpu_path: str = "auto"
    #: After its own runs, wait for those another process holds (and train any whose process died);
    #: False (`--no-wait`): leave them to it and return.
    wait_held: bool = True

    @classmethod
    def from_args(cls, args: object, processes: int) -> "ExecutionPlan":
        """The plan `study run`'s options ask for (an argparse Namespace; options it lacks take their
        defaults), with `processes` per run (torchrun's, or `--gpus-per-run` on SLURM)."""
        from ..launch import SLURM_FLAGS

        def get(name: str, default: object) -> object:
            value = getattr(args, name, None)
            return default if value is None else value

        return cls(device=str(get("device", "auto")), processes=processes, concurrency=getattr(args, "concurrency", None),
                   streams=get("streams", 1), fuse=get("fuse", 1), compile=bool(get("compile", False)),
                   cuda_graph=bool(get("cuda_graph", False)), sync_bn=bool(get("sync_bn", False)),
                   launcher=str(get("launcher", "local")), decode=str(get("decode", "cpu")),
                   workers=getattr(args, "workers", None), download=bool(get("download", False)),
                   slurm_flags=tuple(f for f in SLURM_FLAGS if getattr(args, f, None) is not None),
                   cpu_path=str(get("cpu_path", "auto")), wait_held=not bool(get("no_wait", False)))

    def for_task(self) -> "ExecutionPlan":
        """The plan a SLURM array task trains its one run with: here, one process per device."""
        return replace(self, launcher="local", concurrency=1, slurm_flags=(), download=False)

    @property
    def runs_at_once(self) -> int:
        """Runs one process trains at once."""
        return max(self.streams, self.fuse)

    @property
    def step_kind(self) -> str:
        """What a run records as its `step` in config.json's provenance."""
        kind = "cuda-graph" if self.cuda_graph else "compiled" if self.compile else "eager"
        return f"fused-{kind}" if self.fuse > 1 else kind

    def memory_format(self, device: torch.device) -> torch.memory_format:
        """The layout of the run's weights and inputs: channels-last on CUDA (`models.memory_format`),
        and on a CPU when its path says so."""
        if device.type == "cpu" and self.cpu_path in CPU_PATHS:
            return torch.channels_last if CPU_PATHS[self.cpu_path][0] else torch.contiguous_format
        return memory_format(device)

    def for_run(self, cfg: RunConfig, device: torch.device, ddp: Distributed, *, input_shape: tuple[int, ...],
                num_classes: int, recorded: str | None, iterations_left: int,
                log: Callable[[str], None], stop: StopFlag | None = None) -> tuple["ExecutionPlan", CpuPath | None]:
        """This plan for one run on `device`: on a CPU, with its path resolved (`cpupath.choose`; a
        DDP job or a fused group, whose processes or members must agree, takes eager NCHW unless
        --cpu-path says otherwise), and that path; elsewhere itself and None. A signal in `stop`
        while the paths are measured raises StopRequested."""
        if device.type != "cpu":
            return self, None
        if self.cpu_path == "auto" and (ddp.enabled or self.fuse > 1):
            path = CpuPath("compiled" if self.compile else "eager", "default")
        else:
            path = cpupath.choose(cfg, self.cpu_path, compile=self.compile, input_shape=input_shape,
                                  num_classes=num_classes, recorded=recorded, iterations_left=iterations_left,
                                  log=log, stop=stop)
        return replace(self, cpu_path=path.name, compile=path.compiled), path

    def chunks(self, cfg: RunConfig) -> int:
        """How many BN groups each process splits its share of a batch into (RunConfig.batch_split,
        shared out over the processes; 1 with `sync_bn`). `check` has refused splits it cannot honour."""
        if self.processes == 1:
            return cfg.batch_split
        return 1 if self.sync_bn else cfg.batch_split // self.processes

    def check(self, configs: Iterable[RunConfig] | None, device: str | None = None) -> None:
        """ConfigError naming the fix if this plan cannot train `configs`; `configs` None: the rules
        of the modes alone (`study run` asks that before it lists the runs, then again with them).
        The checks that need the device run when `device` (the resolved one, e.g. `cpu` or
        `cuda:0`) is given."""
        listed = configs is not None
        configs = list(configs or [])
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
            preact = next((cfg.run_id for cfg in configs if cfg.arch == "preact"), None)
            if preact is not None:
                raise ConfigError(f"--fuse groups the paper's blocks, not the pre-activation ResNet's ({preact}); "
                                  "drop --fuse for it")
        if device is None and self.device != "auto":
            # As given: --device cpu is known to be no GPU before it is resolved, here or (--launcher slurm) on
            # the nodes, whose device this machine's cannot tell.
            device = self.device
        if self.cpu_path != "auto":
            if self.cpu_path not in CPU_PATHS:
                raise ConfigError(f"unknown --cpu-path {self.cpu_path!r}; choose from {', '.join(cpupath.CPU_PATH_CHOICES)}")
            if self.compile and not CPU_PATHS[self.cpu_path][1]:
                raise ConfigError(f"--compile and --cpu-path {self.cpu_path} (not compiled) disagree; drop one, or use "
                                  f"--cpu-path {'channels-last-' if CPU_PATHS[self.cpu_path][0] else ''}compiled")
            if self.fuse > 1:
                raise ConfigError("--fuse trains its group eagerly in NCHW on a CPU; drop --cpu-path")
            if device is not None and not device.startswith("cpu"):
                raise ConfigError(f"--cpu-path chooses how a run trains on a CPU (the device is {device}); "
                                  "drop it or use --device cpu")
        if self.cuda_graph:
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
        if listed:
            self._check_with_the_runs(configs, slurm)

    def _check_with_the_runs(self, configs: list[RunConfig], slurm: bool) -> None:
        """The rules that need the runs listed: what their data take, the BN split the processes can
        honour, and where the SLURM options go."""
        imagenet = [cfg for cfg in configs if cfg.imagenet]
        if self.workers is not None and configs and not imagenet:
            raise ConfigError("--workers sets ImageNet's DataLoader workers; CIFAR-style data sit on the device, drop it")
        if self.download and imagenet:
            raise ConfigError("ImageNet cannot be downloaded; drop --download and pass --data-dir to your copy")
        if self.slurm_flags and not slurm:
            raise ConfigError(f"--{self.slurm_flags[0].replace('_', '-')} applies to --launcher slurm only; "
                              "add --launcher slurm or drop it")
        if slurm and not re.fullmatch(SLURM_DEVICES, self.device):
            raise ConfigError(f"unknown device {self.device!r}; use --device auto, cpu or cuda")
        if self.processes > 1:
            for cfg in configs:
                if self.sync_bn and cfg.batch_split != 1:
                    raise ConfigError("--sync-bn computes BN over the whole batch; drop --batch-split or --sync-bn")
                if not self.sync_bn and cfg.batch_split % self.processes:
                    raise ConfigError(
                        f"with per-device BN, {self.processes} processes split each batch into at least "
                        f"{self.processes} BN groups; pass --batch-split {self.processes} (or a multiple), or --sync-bn"
                    )

    def torch_device(self, ddp: Distributed) -> torch.device:
        """The device this process trains on: `device` resolved, under torchrun this process's GPU."""
        device = self.device
        if ddp.enabled and device in ("auto", "cuda"):  # one GPU per process: torchrun's LOCAL_RANK
            device = f"cuda:{ddp.local_rank}" if torch.cuda.is_available() or device == "cuda" else "cpu"
        return resolve_device(device)

    def processes_per_device(self, device_type: str, runs: int, ddp: bool) -> int:
        """`concurrency`, or when it is auto: a few processes share a GPU (unless runs are
        interleaved or fused in one), one at a time on a CPU."""
        if self.concurrency is not None:
            return self.concurrency
        auto = device_type == "cuda" and not ddp and self.runs_at_once == 1
        return min(AUTO_GPU_CONCURRENCY, runs) if auto else 1

    def trainee(self, cfg: RunConfig, num_classes: int, in_channels: int, device: torch.device,
                ddp: Distributed) -> Trainee:
        """The run's network as this plan trains it (BN split, DDP, `--compile`), and its optimizer."""
        return make_trainee(cfg, num_classes, in_channels, device, ddp, compile=self.compile,
                            sync_bn=self.sync_bn, chunks=self.chunks(cfg), fmt=self.memory_format(device))

    def step(self, cfg: RunConfig, net: Trainee, grad_norms: GradientNorms, device: torch.device, ddp: Distributed,
             log: Callable[[str], None]) -> Step:
        """The run's training step: a member of a fused group (`--fuse`), replayed as a CUDA graph
        (`--cuda-graph`), or eager (compiled or not)."""
        if self.fuse > 1:
            return FusedMemberStep(cfg, net, grad_norms)
        if self.cuda_graph:
            return CapturedStep(net, grad_norms, device, log=log)
        return EagerStep(net, grad_norms, device, ddp, exact_mean=not ddp.enabled and self.chunks(cfg) == 1,
                         compile=self.compile)


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
    """`auto` picks CUDA when present; a device this machine cannot use (`cuda` without a GPU,
    `mps` off a Mac, a name torch does not know) is a one-line ConfigError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for but no CUDA GPU is visible; use --device cpu or auto")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use --device auto, cpu or cuda") from None
    if dev.type == "mps" and not torch.backends.mps.is_available():  # torch's own message runs to 2,000 characters
        raise ConfigError(f"--device {device} cannot be used here (MPS needs macOS and a torch built "
                          "with MPS); use --device auto, cpu or cuda")
    try:
        torch.empty(0, device=dev)  # e.g. `cuda:3` on a one-GPU machine
    except (RuntimeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = reason if len(reason) <= 160 else reason[:157].rstrip() + "..."  # one readable line
        raise ConfigError(f"--device {device} cannot be used here ({reason}); use --device auto, cpu or cuda") from None
    return dev


def default_workers() -> int:
    """DataLoader workers per process for ImageNet: the CPUs this process may use, at most 12."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(12, cpus))
