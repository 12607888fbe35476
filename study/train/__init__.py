"""Training: one run (`loop`), a list of runs (`runner`), and what they are made of.

- `loop`: `train_steps` / `train_run`, one run from start (or checkpoint) to end;
- `schedule`: the learning rate, the paper's step schedule and its lr warm-up for ResNet-110;
- `step`: the SGD step (eager, or a CUDA graph behind the same call), evaluation, `--compile`;
- `checkpoint`: every key a checkpoint holds, saved and restored in one place;
- `feeds`: CIFAR-style and ImageNet batches; `epoch`: an epoch's running sums and metrics rows;
- `plan`: `ExecutionPlan`, the one place that checks which execution modes go together;
- `runner`: `run_all`, the list of runs, locks and `--concurrency` processes;
- `interleave`: several runs in one process (`--streams`, `--fuse`);
- `distributed`: DDP processes and the BN split; `signals`: graceful stop on SIGTERM/SIGINT.
"""

from ..stopflag import StopFlag
from .distributed import Distributed, distributed_from_env
from .loop import train_run, train_steps
from .plan import AUTO_GPU_CONCURRENCY, ExecutionPlan, default_workers, resolve_device
from .runner import run_all
from .schedule import Schedule, lr_at
from .signals import StopRequested, graceful_stop
from .step import compile_model, evaluate, lay_out_like_params, sgd_step, tune_device

__all__ = [
    "AUTO_GPU_CONCURRENCY", "Distributed", "ExecutionPlan", "Schedule", "StopFlag", "StopRequested", "compile_model",
    "default_workers", "distributed_from_env", "evaluate", "graceful_stop", "lay_out_like_params", "lr_at",
    "resolve_device", "run_all", "sgd_step", "train_run", "train_steps", "tune_device",
]
