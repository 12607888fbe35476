"""An epoch's running sums and the metrics rows it ends with."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import RunConfig
from .distributed import Distributed, all_reduce


class Tally:
    """An epoch's running sums, kept on the device (no host sync per step): the summed loss, the
    wrong predictions, the images seen, and the first iteration whose loss was not finite (-1 while
    there is none). Under DDP each process sums its own share; `job_sums` adds them up."""

    def __init__(self, device: torch.device, ddp: Distributed, partial: dict | None = None) -> None:
        self.device, self.ddp = device, ddp
        if partial is None:
            self.seen = 0
            self.loss_sum = torch.zeros((), device=device)
            self.wrong = torch.zeros((), device=device, dtype=torch.long)
            self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        else:  # an interrupted epoch's sums, which are the whole job's: rank 0 carries them
            self.seen = partial["seen"]
            self.loss_sum, self.wrong = partial["loss_sum"].to(device), partial["wrong"].to(device)
            self.first_bad = partial["first_bad"].to(device)
            if not ddp.writer:
                self.seen, self.loss_sum, self.wrong = 0, torch.zeros_like(self.loss_sum), torch.zeros_like(self.wrong)

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor, iteration: int) -> None:
        """Count a step's batch (its mean `loss`, logits `out`, labels `y`), after `iteration` steps."""
        self.loss_sum += loss * len(y)
        self.wrong += (out.argmax(1) != y).sum()
        self.seen += len(y)
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), iteration, self.first_bad)

    def job_sums(self) -> torch.Tensor:
        """(loss sum, wrong, seen) of the epoch so far, summed over all processes."""
        seen = torch.tensor(float(self.seen), device=self.device, dtype=torch.float64)
        return all_reduce(torch.stack([self.loss_sum.double(), self.wrong.double(), seen]), self.ddp)

    def running_error(self) -> float:
        """The whole batch's running training error %, agreed by all processes (the warm-up's
        test; a single process waits for the device once)."""
        if self.ddp.enabled:
            _, wrong, seen = self.job_sums().tolist()
            return 100.0 * wrong / seen
        return 100.0 * self.wrong.item() / self.seen

    def local_error(self) -> float:
        """This process's running error % (the progress bar's)."""
        return 100.0 * self.wrong.item() / self.seen

    def state(self) -> dict:
        """The sums of an interrupted epoch, over all processes (every process calls this at the
        same step)."""
        if not self.ddp.enabled:
            return {"seen": self.seen, "loss_sum": self.loss_sum, "wrong": self.wrong, "first_bad": self.first_bad}
        total = self.job_sums()
        return {"seen": int(total[2].item()), "loss_sum": total[0].to(self.loss_sum.dtype),
                "wrong": total[1].round().to(self.wrong.dtype),
                "first_bad": all_reduce(self.first_bad.clone(), self.ddp, dist.ReduceOp.MAX)}

    def finish(self) -> tuple[float, float, int]:
        """The epoch's training loss and error % over all processes, and the first iteration whose
        loss was not finite (-1: none)."""
        loss_sum, wrong, seen = self.job_sums().tolist()
        first_bad = all_reduce(self.first_bad, self.ddp, dist.ReduceOp.MAX if self.ddp.enabled else None)
        return loss_sum / seen, 100.0 * wrong / seen, int(first_bad.item())


def metric_row(cfg: RunConfig, **values: object) -> dict:
    """One row of `metrics.parquet`: the run's identity, then `values`."""
    return {
        "run_id": cfg.run_id,
        "dataset": cfg.dataset,
        "arch": cfg.arch,
        "depth": cfg.depth,
        "shortcut": cfg.shortcut,
        "seed": cfg.seed,
        **values,
    }
