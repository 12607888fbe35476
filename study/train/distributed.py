"""One process's place in a DDP job (torchrun, or SLURM via submitit), and the BN split that makes
one device compute what S devices would (how many parts: `ExecutionPlan.chunks`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import torchrun_place
from ..runstore import Run


@dataclass(frozen=True)
class Distributed:
    """This process's rank among `world` processes training one run together (torchrun), or the
    single process. Rank 0 alone writes the run's files."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        return self.rank == 0


SINGLE = Distributed()


def distributed_from_env(device: str = "auto") -> Distributed:
    """Join the DDP job torchrun (or SLURM via submitit) describes in RANK / WORLD_SIZE /
    LOCAL_RANK / MASTER_ADDR / MASTER_PORT; the single process when WORLD_SIZE is unset or 1.
    NCCL on CUDA, gloo on CPU: `device` is --device, so that `--device cpu` on a machine with GPUs
    trains on its CPUs through gloo."""
    rank, world, local_rank = torchrun_place()
    if world <= 1:
        return SINGLE
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Distributed(rank=rank, world=world, local_rank=local_rank)


def all_reduce(values: torch.Tensor, ddp: Distributed, op: "dist.ReduceOp" = None) -> torch.Tensor:
    """`values` summed (or reduced by `op`) over the job's processes, in place; as is alone."""
    if ddp.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM if op is None else op)
    return values


def broadcast(value: object, ddp: Distributed) -> object:
    """Rank 0's `value` on every process."""
    if not ddp.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Follower:
    """A Run seen by a DDP rank other than 0: it reads the run's files but writes nothing."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self.cfg, self.dir = run.cfg, run.dir

    def load_checkpoint(self, log: object = None) -> dict | None:
        return self._run.load_checkpoint()

    # What the loop writes through a Run: nothing, on this rank.
    def prepare(self, *args: object, **kwargs: object) -> None:
        pass

    clean_temporaries = write_metrics = save_checkpoint = set_status = record_resume = prepare


class Chunked(nn.Module):
    """Forward a batch as `chunks` equal parts, so each BN normalises with its own part's
    statistics (as on that many devices), and return the concatenated outputs. The BN running
    averages are updated from the first part only, as under DDP, whose buffers are rank 0's: so a
    `--batch-split S` run is the same computation on one device as on S."""

    def __init__(self, model: nn.Module, chunks: int) -> None:
        super().__init__()
        self.model, self.chunks = model, chunks
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = x.chunk(self.chunks)
        outs = [self.model(first)]
        if rest:
            tracking = [bn.track_running_stats for bn in self.bns]
            for bn in self.bns:
                bn.track_running_stats = False  # batch statistics, running averages untouched
            try:
                outs += [self.model(part) for part in rest]
            finally:
                for bn, flag in zip(self.bns, tracking):
                    bn.track_running_stats = flag
        return torch.cat(outs)
