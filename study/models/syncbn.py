"""BN over the whole global batch of a DDP job (`study run --sync-bn` under torchrun).

On CUDA this is torch's own `nn.SyncBatchNorm`. torch's runs only on GPUs (its kernels have no CPU
implementation), so on CPU processes (the gloo backend: tests, or a CPU cluster) `GlobalBatchNorm2d`
computes the same thing from two all-reduced sums per channel, differentiably (`_AllReduceSum`:
the backward of a sum over processes all-reduces the gradients), so the gradient of every
process's input sees the whole batch, exactly as in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """y = sum of x over all processes; dL/dx = sum over processes of dL/dy (each process's loss
    depends on every process's x through y)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose training statistics are those of the batch summed over all processes.

    Mean and (biased) variance come from the all-reduced per-channel sums of x and x^2 and the
    image-pixel count; the running variance gets the unbiased estimate, as BatchNorm2d's does.
    Outside training, or in a single process, it is BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        count = torch.full((1,), x.numel() / c, dtype=torch.float64, device=x.device)
        sums = torch.cat([x.double().sum((0, 2, 3)), x.double().square().sum((0, 2, 3)), count])
        sums = _AllReduceSum.apply(sums)
        n = sums[-1]
        mean = sums[:c] / n
        var = sums[c : 2 * c] / n - mean.square()
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_((var * n / (n - 1)).to(self.running_var.dtype), alpha=m)
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype)[None, :, None, None]) * scale[None, :, None, None]
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of `model` made global-batch: torch's SyncBatchNorm on CUDA, otherwise
    `GlobalBatchNorm2d`. Parameter and buffer names (and so checkpoints) are unchanged."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model
