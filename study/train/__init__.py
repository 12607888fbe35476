"""Training: one run (`loop`), a list of runs (`runner`), and what they are made of.

- `loop`: `train_steps`, one run from start (or checkpoint) to end, in a `Session` (device, DDP
  place, stop flag, log);
- `schedule`: the learning rate, the paper's step schedule and its lr warm-up for ResNet-110;
- `step`: the SGD step (eager, a CUDA graph, or a fused group's member, behind the same call),
  evaluation, `--compile`;
- `checkpoint`: every key a checkpoint holds, saved and restored in one place;
- `feeds`: CIFAR-style and ImageNet batches; `epoch`: an epoch's running sums and metrics rows;
- `plan`: `ExecutionPlan`, the one carrier of the execution modes and the one place that checks
  which go together; it builds the network and the step the loop trains with;
- `runner`: `run_all`, the list of runs, locks and `--concurrency` processes;
- `interleave`: several runs in one process (`--streams`, `--fuse`);
- `distributed`: DDP processes and the BN split; `signals`: graceful stop on SIGTERM/SIGINT.
"""

from ..stopflag import StopFlag
from .distributed import Distributed, distributed_from_env
from .loop import Session, train_steps
from .plan import AUTO_GPU_CONCURRENCY, ExecutionPlan, default_workers, resolve_device
from .runner import run_all
from .schedule import Schedule, lr_at
from .signals import StopRequested, graceful_stop
from .step import compile_model, evaluate, fp32_math, ieee_fp32, lay_out_like_params, sgd_step, tune_device

__all__ = [
    "AUTO_GPU_CONCURRENCY", "Distributed", "ExecutionPlan", "Schedule", "Session", "StopFlag", "StopRequested", "compile_model",
    "default_workers", "distributed_from_env", "evaluate", "graceful_stop", "lay_out_like_params", "lr_at",
    "resolve_device", "run_all", "sgd_step", "train_steps", "tune_device", "ieee_fp32", "fp32_math",
]
