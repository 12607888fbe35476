"""One training step and one evaluation: the SGD step (eager, replayed as a CUDA graph, or done by a
fused group, each behind the same call), the network as the step trains it (BN split, DDP,
`torch.compile`), and the evaluation of a device-resident data set.

A step is called the same way whatever it is: `loss, out = yield from step(x, y, lr, iteration,
global_len)`. An eager or captured step does its work and returns at once (its generator yields
nothing); a fused member yields its `StepRequest` and returns the group's answer (its first call
yields its `Join` before). After each step's bookkeeping the loop yields None: there the process
may turn to its other runs (`study.train.interleave`; a fused run goes on to its next request)."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import onetime
from ..config import RunConfig
from ..data import Data, eval_batches, normalize
from ..fast.fused import Join, StepRequest, fusion_key
from ..fast.graphstep import GraphedStep
from ..models import memory_format, model_for
from ..models.syncbn import convert_sync_batchnorm
from ..probes import GradientNorms
from .distributed import Chunked, Distributed

EVAL_BATCH_SIZE = 1000
# `--compile` on CUDA: CUDA graphs (cudagraph trees) remove the launch overhead that dominates these
# thin nets. No "max-autotune": its Triton conv/GEMM search costs minutes of compilation, and these
# nets have one tiny GEMM and 16-64 channel convolutions, where cuDNN is the candidate that wins.
COMPILE_MODE_CUDA = "reduce-overhead"


class _NotAboutCudaOnACpu(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." (said when inductor loads its
    C++ tools on a machine with the CUDA toolkit and no GPU): of a CPU run it says nothing true."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


_NOT_ABOUT_CUDA = _NotAboutCudaOnACpu()
# Graphs one process may compile for a network's forward: one per distinct net and batch size of the
# runs it trains (a grid of 10 nets, each with its epoch's partial last batch, needs 20). Past torch's
# default of 8, later runs would train eagerly (slower, with only a warning) while recording
# `compiled`.
RECOMPILE_LIMIT = 64


def compile_model(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` as `--compile` trains it: torch.compile with CUDA graphs on CUDA, and static shapes
    (the epoch's last, partial batch gets its own graph instead of making every batch dynamic).
    The result shares its parameters with `module`."""
    if device.type == "cpu":
        logging.getLogger("torch.utils.cpp_extension").addFilter(_NOT_ABOUT_CUDA)
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    return torch.compile(module, mode=COMPILE_MODE_CUDA if device.type == "cuda" else None, dynamic=False)


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 the paper's within: TF32 off for convolutions and matmuls (`tune_device` turns it off for
    training too), and the caller's settings back on the way out, so that a notebook that trains, tests
    or probes through the package keeps its own."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def fp32_math() -> str:
    """How this process computes fp32 convolutions on a GPU, for a run's record: `ieee`, or `tf32`."""
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def tune_device(device: torch.device) -> None:
    """Keep fp32 the paper's: IEEE fp32 in convolutions and matmuls, not TF32 (10-bit mantissa), which
    PyTorch lets cuDNN use for fp32 convolutions on Ampere and later GPUs by default (bf16 runs compute
    their convolutions in bf16 under autocast either way). And on CUDA let cuDNN time its algorithms for
    each new shape (the shapes of a run repeat every step): that changes which kernels run, not what they
    compute beyond float rounding. Process-wide settings, the same for every run a process trains."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


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


@dataclass
class Trainee:
    """A run's network as the loop trains it. `model` is what checkpoints hold and evaluation uses;
    `forward` is the same parameters with the BN split, DDP and `torch.compile` on top."""

    model: nn.Module
    forward: nn.Module
    opt: torch.optim.SGD
    autocast: torch.autocast
    bf16: bool  # whether `autocast` is on (bf16), or a no-op (fp32)


def make_trainee(cfg: RunConfig, num_classes: int, in_channels: int, device: torch.device, ddp: Distributed,
                 *, compile: bool = False, sync_bn: bool = False, chunks: int = 1,
                 fmt: torch.memory_format | None = None) -> Trainee:
    """The run's network with its initial weights (a function of the seed alone), on `device`, and
    its SGD optimizer with the paper's momentum and weight decay; each process's share of a batch in
    `chunks` BN groups, or BN over the whole global batch (`sync_bn`, under DDP). Its autocast is
    the one place a run's precision becomes a context (bf16 or none). `fmt` is the layout of its
    weights (default: `models.memory_format`, channels-last on CUDA)."""
    torch.manual_seed(cfg.seed)  # the model's initial weights depend on the seed alone
    model = model_for(cfg, num_classes, in_channels).to(device)
    # Channels-last lets cuDNN pick its fastest kernels on tensor cores; on a CPU the plan's path decides.
    model = model.to(memory_format=memory_format(device) if fmt is None else fmt)
    if sync_bn and ddp.enabled:
        model = convert_sync_batchnorm(model, device)  # same parameter and buffer names
    trained: nn.Module = model if chunks == 1 else Chunked(model, chunks)
    if ddp.enabled:
        trained = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    # The compiled module shares its parameters with `model`; checkpoints keep using `model`, so
    # they load with or without --compile. Compilation happens on the first step at each batch
    # size; the metrics' warmup_s says how much of elapsed_s that was (`study.onetime`).
    tune_device(device)
    forward = compile_model(trained, device) if compile else trained
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return Trainee(model, forward, opt, autocast, cfg.bf16)


def _at_once(result: tuple[torch.Tensor, torch.Tensor]) -> Generator[Any, Any, tuple[torch.Tensor, torch.Tensor]]:
    """A step's result as a generator that returns it without yielding (see the module's docstring)."""
    return result
    yield  # unreachable: makes this function a generator


class Step(Protocol):
    """What the loop calls for each training step (see the module's docstring)."""

    fallback: str | None  # why a --cuda-graph capture failed, if it did (the run then trained eagerly)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, iteration: int, global_len: int
                 ) -> Generator[Any, Any, tuple[torch.Tensor, torch.Tensor]]: ...


class EagerStep:
    """`sgd_step` through the trainee's forward. The loss is the batch mean for a single process
    with one BN group (the original, fastest form), otherwise each process's summed loss scaled to
    its share of the global mean. The first steps at each batch size of this session are one-time
    work (compiling, cuDNN's autotuning; compiled on CUDA the second records the CUDA graph that
    later steps replay), timed apart (`study.onetime`)."""

    def __init__(self, trainee: Trainee, grad_norms: GradientNorms, device: torch.device, ddp: Distributed,
                 *, exact_mean: bool, compile: bool) -> None:
        self.trainee, self.grad_norms, self.device, self.ddp, self.exact_mean = trainee, grad_norms, device, ddp, exact_mean
        self.stepped: Counter[int] = Counter()
        self.onetime_steps = 2 if compile and device.type == "cuda" else 1
        self.fallback: str | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, iteration: int, global_len: int
                 ) -> Generator[Any, Any, tuple[torch.Tensor, torch.Tensor]]:
        t = self.trainee
        with onetime.timed(self.device, self.stepped[len(y)] < self.onetime_steps):
            loss, out = sgd_step(
                t.forward, t.opt, x, y, lr, t.autocast,
                loss_scale=None if self.exact_mean else self.ddp.world / global_len,
                before_update=lambda: self.grad_norms.maybe_record(iteration + 1),
            )
        self.stepped[len(y)] += 1
        return _at_once((loss, out))


class CapturedStep:
    """The same step replayed as one CUDA graph per batch size (`--cuda-graph`, `study.fast.graphstep`);
    on a CPU, or after a failed capture, the same step runs uncaptured."""

    def __init__(self, trainee: Trainee, grad_norms: GradientNorms, device: torch.device, *,
                 log: Callable[[str], None]) -> None:
        self.grad_norms = grad_norms
        self.graphed = GraphedStep(trainee.model, trainee.opt, [w for _, w in grad_norms.params],
                                   bf16=trainee.bf16, device=device, log=log)

    @property
    def fallback(self) -> str | None:
        """Why the capture failed, if it did (the run then trained eagerly)."""
        return self.graphed.fallback

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, iteration: int, global_len: int
                 ) -> Generator[Any, Any, tuple[torch.Tensor, torch.Tensor]]:
        loss, out, norms = self.graphed.step(x, y, lr, norms=self.grad_norms.due(iteration + 1))
        if norms is not None:
            self.grad_norms.record(iteration + 1, norms)
        return _at_once((loss, out))


class FusedMemberStep:
    """A run's step done by the group it is fused into (`--fuse`, `study.fast.fused.Fuser`, which
    `study.train.interleave` drives): its first call yields the run's `Join` (model, optimizer,
    fusion key), every call a `StepRequest`, answered with the step's (loss, logits, gradient norms)."""

    def __init__(self, cfg: RunConfig, trainee: Trainee, grad_norms: GradientNorms) -> None:
        self.trainee, self.grad_norms = trainee, grad_norms
        self.join: Join | None = Join(trainee.model, trainee.opt, [name for name, _ in grad_norms.params],
                                      fusion_key(cfg, trainee.model), bf16=trainee.bf16, name=cfg.run_id)
        self.joined = self.join

    @property
    def fallback(self) -> str | None:
        """Why its group's capture failed, if it did (set by the Fuser)."""
        return self.joined.fallback

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, iteration: int, global_len: int
                 ) -> Generator[Join | StepRequest, Any, tuple[torch.Tensor, torch.Tensor]]:
        if self.join is not None:
            join, self.join = self.join, None
            yield join
        for group in self.trainee.opt.param_groups:  # what the checkpoint records
            group["lr"] = lr
        loss, out, norms = yield StepRequest(x, y, lr, norms=self.grad_norms.due(iteration + 1))
        if norms is not None:
            self.grad_norms.record(iteration + 1, norms)
        return loss, out
