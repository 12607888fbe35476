"""The paper's CIFAR networks (section 4.2): 6n+2 weighted layers, plain or residual.

A plain net and its residual twin are built from the same `BasicBlock` class; the only difference is
the block's `residual` switch. With shortcut option A (the paper's CIFAR choice) the shortcut has no
parameters, so both nets have exactly the same modules, parameter names and - for the same seed -
the same initial weights.

Layout (paper, section 4.2): a 3x3 conv with 16 filters, then three stages of 2n 3x3 layers on maps
of 32/16/8 pixels with 16/32/64 filters (stride-2 conv at the first layer of stages 2 and 3), then
global average pooling and a fully connected layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SHORTCUTS, blocks_per_stage

STAGE_WIDTHS = (16, 32, 64)


def conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (BN follows every conv)."""
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias, for projection shortcuts (options B and C)."""
    return nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A: identity, and where dimensions grow, sub-sample by `stride` and zero-pad the new
    channels. Parameter-free, so a residual net with it has exactly its plain twin's parameters.
    With `groups` nets side by side in the channels (`study.fast.grouped`), each group's channels
    are padded at the group's end."""

    def __init__(self, in_planes: int, planes: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.stride, self.extra, self.groups = stride, planes - in_planes, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.is_contiguous(memory_format=torch.channels_last)  # before slicing: a view is not
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra > 0 and self.groups == 1:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))  # the channel dimension (dim 1), at its end
        elif self.extra > 0:
            n, c, h, w = x.shape
            x = F.pad(x.reshape(n, self.groups, c // self.groups, h, w), (0, 0, 0, 0, 0, self.extra))
            x = x.reshape(n, c + self.groups * self.extra, h, w)
            if channels_last:  # as F.pad keeps it for one net, for the addition that follows
                x = x.contiguous(memory_format=torch.channels_last)
        return x


def make_shortcut(option: str, in_planes: int, planes: int, stride: int) -> nn.Module:
    """The shortcut of one block for option A, B or C (paper section 3.3 / Table 3).

    A: parameter-free (identity or pad). B: projection only where dimensions change, identity
    elsewhere. C: projection on every shortcut.
    """
    if option not in SHORTCUTS:
        raise ValueError(f"unknown shortcut option {option!r}; choose one of {', '.join(SHORTCUTS)}")
    changes = stride != 1 or in_planes != planes
    if option == "C" or (option == "B" and changes):
        return nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))
    if option == "A" and changes:
        return PadShortcut(in_planes, planes, stride)
    return nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers. With `residual=True` the second BN's output is added to the shortcut
    before the final ReLU; with `residual=False` the block is two plain layers and the shortcut
    module is not built at all (a plain net has no shortcut parameters, whatever the option)."""

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, *, residual: bool = True, shortcut: str = "A"
    ) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = make_shortcut(shortcut, in_planes, planes, stride) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarNet(nn.Module):
    """Plain or residual CIFAR network of depth 6n+2 (paper section 4.2)."""

    def __init__(
        self,
        depth: int,
        *,
        residual: bool,
        shortcut: str = "A",
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        n = blocks_per_stage(depth)
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut option {shortcut!r}; choose one of {', '.join(SHORTCUTS)}")
        self.depth, self.residual, self.shortcut = depth, residual, shortcut
        self.conv1 = conv3x3(in_channels, STAGE_WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        stages = []
        in_planes = STAGE_WIDTHS[0]
        for i, planes in enumerate(STAGE_WIDTHS):
            blocks = []
            for b in range(n):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, residual=residual, shortcut=shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def init_weights(model: nn.Module) -> None:
    """He initialisation (fan-out normal, as in fb.resnet.torch and torchvision) for convs,
    BN scale 1 and shift 0; the FC layer keeps PyTorch's default. Modules are visited in
    registration order, so a plain net and its option-A twin consume the RNG identically."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def cifar_net(
    arch: str, depth: int, *, shortcut: str = "A", num_classes: int = 10, in_channels: int = 3
) -> CifarNet:
    """Build `plain` or `resnet` of the given depth (6n+2)."""
    if arch not in ("plain", "resnet"):
        raise ValueError(f"unknown arch {arch!r}; choose plain or resnet")
    return CifarNet(
        depth, residual=arch == "resnet", shortcut=shortcut, num_classes=num_classes, in_channels=in_channels
    )
