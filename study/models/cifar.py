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


class PreActBlock(nn.Module):
    """The full pre-activation residual block (He, Zhang, Ren, Sun 2016, "Identity Mappings in Deep
    Residual Networks", Fig. 1(b) and 4(e)): BN and ReLU before each 3x3 conv, the branch added to
    the shortcut of the block's own input, nothing after the addition. The shortcut options are the
    original block's (`make_shortcut`); with option A the identity path is untouched from the first
    block to the last (as in fb.resnet.torch's preresnet.lua, whose shortcut also takes the block's
    input, not its pre-activation)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, shortcut: str = "A") -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = make_shortcut(shortcut, in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class PreActCifarNet(nn.Module):
    """The pre-activation ResNet of depth 6n+2 on CIFAR-style data (the 2016 paper's CIFAR nets with
    basic blocks): a bare 3x3 conv with 16 filters, three stages of `PreActBlock`s (16/32/64 filters,
    stride 2 at the first block of stages 2 and 3), then the one BN-ReLU before the global average
    pooling, and the fully connected layer. Its authors' code (KaimingHe/resnet-1k-layers) has the
    same stem and head: every BN-ReLU of the body is a block's own."""

    residual = True

    def __init__(self, depth: int, *, shortcut: str = "A", num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        n = blocks_per_stage(depth)
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut option {shortcut!r}; choose one of {', '.join(SHORTCUTS)}")
        self.depth, self.shortcut = depth, shortcut
        self.conv1 = conv3x3(in_channels, STAGE_WIDTHS[0])
        stages, in_planes = [], STAGE_WIDTHS[0]
        for i, planes in enumerate(STAGE_WIDTHS):
            blocks = []
            for b in range(n):
                blocks.append(PreActBlock(in_planes, planes, 2 if (i > 0 and b == 0) else 1, shortcut=shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.bn = nn.BatchNorm2d(STAGE_WIDTHS[-1])
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.conv1(x))))
        x = F.relu(self.bn(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def zero_init_residual(model: nn.Module) -> None:
    """Start every residual block as the identity (Goyal et al. 2017, "Accurate, Large Minibatch
    SGD", section 5.1; torchvision's `zero_init_residual`): the last layer of each residual branch
    starts at 0, so the branch adds 0. In an original block that is the scale of its last BN (the
    block then outputs ReLU(shortcut(x)), which is x for a non-negative x of its width). A
    pre-activation branch ends in conv2, whose weights are zeroed instead: zeroing its BN (which
    precedes conv2) would feed conv2's ReLU exactly 0, where ReLU passes no gradient, and the branch
    would never train. The block outputs shortcut(x)."""
    for m in model.modules():
        if isinstance(m, BasicBlock) and m.residual:
            nn.init.zeros_(m.bn2.weight)
        elif isinstance(m, PreActBlock):
            nn.init.zeros_(m.conv2.weight)


@torch.no_grad()
def delta_orthogonal_(weight: torch.Tensor, gain: float) -> torch.Tensor:
    """The delta-orthogonal initialisation of a conv kernel (Xiao et al. 2018, "Dynamical Isometry
    and a Mean Field Theory of CNNs", Algorithm 2): zeros but the centre tap, a random (semi-)
    orthogonal `out x in` matrix times `gain` (torch's `orthogonal_`, drawn from the global RNG)."""
    out_ch, in_ch, kh, kw = weight.shape
    centre = torch.empty(out_ch, in_ch)
    nn.init.orthogonal_(centre, gain=gain)
    weight.zero_()
    weight[:, :, kh // 2, kw // 2] = centre.to(weight.dtype)
    return weight


def delta_orthogonal_init(model: nn.Module) -> None:
    """Every 3x3 convolution of `model` delta-orthogonal, with ReLU's gain sqrt(2) (torch's
    `calculate_gain("relu")`, as He initialisation has), in registration order."""
    gain = nn.init.calculate_gain("relu")
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            delta_orthogonal_(m.weight, gain)


def init_weights(model: nn.Module) -> None:
    """He initialisation (fan-out normal, as in fb.resnet.torch and torchvision) for convs,
    BN scale 1 and shift 0; the FC layer keeps PyTorch's default. Modules are visited in
    registration order, so a plain net and its option-A twin consume the RNG identically. A net on the
    meta device (shapes, no storage: how `study models` counts the ImageNet nets) has no values to set,
    and is left as it is: there each draw costs milliseconds of Python for nothing."""
    if any(p.is_meta for p in model.parameters()):
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def cifar_net(
    arch: str, depth: int, *, shortcut: str = "A", num_classes: int = 10, in_channels: int = 3, init: str = "he"
) -> nn.Module:
    """Build `plain`, `resnet` or `preact` (the pre-activation ResNet) of the given depth (6n+2), with
    He initialisation (`init="he"`, the paper's), then, for the follow-ups' arms, its residual branches
    zeroed (`zero-residual`) or its 3x3 kernels delta-orthogonal (`delta-orthogonal`)."""
    if arch not in ("plain", "resnet", "preact"):
        raise ValueError(f"unknown arch {arch!r}; choose plain, resnet or preact")
    if arch == "preact":
        net: nn.Module = PreActCifarNet(depth, shortcut=shortcut, num_classes=num_classes, in_channels=in_channels)
    else:
        net = CifarNet(depth, residual=arch == "resnet", shortcut=shortcut, num_classes=num_classes,
                       in_channels=in_channels)
    if init == "zero-residual":
        zero_init_residual(net)
    elif init == "delta-orthogonal":
        delta_orthogonal_init(net)
    elif init != "he":
        raise ValueError(f"unknown init {init!r}; choose he, zero-residual or delta-orthogonal")
    return net
