"""K CIFAR nets side by side in one grouped network, which `study.fast.fused` trains K runs as.

`grouped_cifar_net` builds the paper's `CifarNet` and widens it layer by layer, keeping every
module's name: each convolution becomes K grouped ones (group k is net k's layer), each BN acts on
the K x C channels (per channel, so per net), option A's shortcut pads each group's channels
(`PadShortcut` with groups) and the classifier is K classifiers side by side (`GroupedLinear`). Its
input is the K nets' images stacked along the channels (N, K x in_channels, H, W), its output their
logits (N, K x num_classes), and net k's weights are the k-th slice along the first dimension of
each parameter, under the same name as in net k.

A plain net has the parameters of its option-A residual twin, so the two are fused into a residual
grouped net whose shortcuts `gate_shortcuts` scales by 0 on the plain nets' channels (a shortcut
that adds exactly 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.cifar import BasicBlock, CifarNet, PadShortcut, init_weights


class GroupedLinear(nn.Module):
    """`groups` independent fully connected layers side by side: input (N, G x in_features), output
    (N, G x out_features). Parameters: `weight` (G x out_features, in_features) and `bias`, net g's
    rows at [g*out_features, (g+1)*out_features). Computed as a grouped 1x1 convolution."""

    def __init__(self, in_features: int, out_features: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(groups * out_features))
        bound = in_features**-0.5  # each group as nn.Linear initialises itself
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x.unsqueeze(-1), self.weight.unsqueeze(-1), self.bias, groups=self.groups).squeeze(-1)


class GatedShortcut(nn.Module):
    """A parameter-free shortcut scaled per channel by `gate` (C, 1, 1), a non-persistent buffer.
    It holds no parameters or saved buffers, so the block's state-dict names do not change."""

    def __init__(self, shortcut: nn.Module, gate: torch.Tensor) -> None:
        super().__init__()
        self.inner = shortcut
        self.register_buffer("gate", gate, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate * self.inner(x)


def _grouped(module: nn.Module, k: int) -> nn.Module | None:
    """The grouped counterpart of one layer of a `CifarNet`, or None for a module kept as it is."""
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(module.in_channels * k, module.out_channels * k, module.kernel_size, stride=module.stride,
                         padding=module.padding, bias=module.bias is not None, groups=k)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(module.num_features * k, eps=module.eps, momentum=module.momentum)
    if isinstance(module, PadShortcut):
        return PadShortcut(0, module.extra, module.stride, groups=k)  # the same stride and padding, per group
    if isinstance(module, nn.Linear):
        return GroupedLinear(module.in_features, module.out_features, k)
    return None


def grouped_cifar_net(
    depth: int, *, residual: bool, shortcut: str = "A", num_classes: int = 10, in_channels: int = 3, groups: int
) -> CifarNet:
    """`groups` CIFAR nets of one shape as one `CifarNet` (module docstring), initialised as
    `CifarNet` initialises itself. With `groups` 1 it is the paper's net itself."""
    net = CifarNet(depth, residual=residual, shortcut=shortcut, num_classes=num_classes, in_channels=in_channels)
    if groups == 1:
        return net
    for name, module in list(net.named_modules()):
        grouped = _grouped(module, groups)
        if grouped is not None:
            owner, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(owner) if owner else net, leaf, grouped)  # same name, same place
    init_weights(net)
    return net


def gate_shortcuts(net: CifarNet, residual: Sequence[bool], dtype: torch.dtype, device: torch.device) -> None:
    """Scale the shortcuts of the grouped residual `net` by 1 on the channels of the nets that are
    `residual` and by 0 on the plain nets' (their shortcuts then add exactly 0), channel by channel,
    in `dtype`, the activations' (so that the sum keeps the dtype it has in a run alone)."""
    k = len(residual)
    for block in list(net.modules()):
        if isinstance(block, BasicBlock) and block.shortcut is not None:
            planes = block.bn2.num_features // k
            gate = torch.tensor(list(residual), dtype=dtype, device=device).repeat_interleave(planes)
            block.shortcut = GatedShortcut(block.shortcut, gate.view(-1, 1, 1))
