"""The paper's ImageNet networks (section 3.4, Table 1): plain and residual, 18 and 34 layers.

They are built from the CIFAR nets' own `BasicBlock`, so the residual switch and the shortcut
options A/B/C mean exactly what they mean there: a plain net is its option-A residual twin without
the additions, with the same modules, parameter names and initial weights for a seed.

Table 1, read top to bottom (the stage names are the paper's conv2_x ... conv5_x):

    conv1     7x7, 64, stride 2, then BN + ReLU          112x112
              3x3 max pool, stride 2                      56x56
    stage1    conv2_x: blocks of [3x3, 64;  3x3, 64]      56x56
    stage2    conv3_x: blocks of [3x3, 128; 3x3, 128]     28x28  (stride 2 in its first block)
    stage3    conv4_x: blocks of [3x3, 256; 3x3, 256]     14x14  (stride 2 in its first block)
    stage4    conv5_x: blocks of [3x3, 512; 3x3, 512]      7x7   (stride 2 in its first block)
              global average pool, fully connected (1000 classes)

with 2,2,2,2 blocks for 18 layers and 3,4,6,3 for 34. With option B the residual nets are
torchvision's `resnet18`/`resnet34` layer for layer; `from_torchvision` renames the keys of their
state_dicts so that they load here.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IMAGENET_DEPTHS, SHORTCUTS
from .cifar import BasicBlock, init_weights

#: Blocks per stage (conv2_x ... conv5_x) for each depth of Table 1 (`IMAGENET_DEPTHS`).
STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)


def stage_blocks(depth: int) -> tuple[int, int, int, int]:
    """Blocks per stage for an ImageNet depth; ValueError naming the fix for any other depth."""
    try:
        return STAGE_BLOCKS[depth]
    except KeyError:
        raise ValueError(
            f"ImageNet depth must be one of {', '.join(map(str, IMAGENET_DEPTHS))}; got {depth}"
        ) from None


class ImageNetNet(nn.Module):
    """Plain or residual ImageNet network of 18 or 34 layers (paper Table 1)."""

    def __init__(
        self,
        depth: int,
        *,
        residual: bool,
        shortcut: str = "A",
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        blocks = stage_blocks(depth)
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut option {shortcut!r}; choose one of {', '.join(SHORTCUTS)}")
        self.depth, self.residual, self.shortcut = depth, residual, shortcut
        # The stem shrinks 224x224 to 56x56 before any block: most of the image's pixels are seen
        # once, by one large kernel, which is what keeps the 34-layer net at 3.6e9 MACs.
        self.conv1 = nn.Conv2d(in_channels, STAGE_WIDTHS[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = STAGE_WIDTHS[0]
        stages = []
        for i, (n, planes) in enumerate(zip(blocks, STAGE_WIDTHS)):
            # conv2_x follows the max pool, which already halved the maps; conv3_1, conv4_1 and
            # conv5_1 down-sample with stride 2 themselves (Table 1).
            first_stride = 1 if i == 0 else 2
            stage = []
            for b in range(n):
                stage.append(
                    BasicBlock(in_planes, planes, first_stride if b == 0 else 1, residual=residual, shortcut=shortcut)
                )
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def imagenet_net(
    arch: str, depth: int, *, shortcut: str = "A", num_classes: int = 1000, in_channels: int = 3
) -> ImageNetNet:
    """Build `plain` or `resnet` of 18 or 34 layers."""
    if arch not in ("plain", "resnet"):
        raise ValueError(f"unknown arch {arch!r}; choose plain or resnet")
    return ImageNetNet(
        depth, residual=arch == "resnet", shortcut=shortcut, num_classes=num_classes, in_channels=in_channels
    )


# torchvision calls the stages layer1..layer4 and a projection shortcut `downsample`; every other
# name (conv1, bn1, blockwise conv1/bn1/conv2/bn2, fc, and the projection's 0/1 indices) is shared.
_TORCHVISION_RENAMES = ((re.compile(r"^layer([1-4])\."), r"stage\1."), (re.compile(r"\.downsample\."), ".shortcut."))


def from_torchvision(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of a torchvision `resnet18()`/`resnet34()` state_dict to this module's names.

    The result loads (strictly) into `imagenet_net("resnet", 18 or 34, shortcut="B")`, which then
    computes what the torchvision model computes. Tensors are shared, not copied.
    """
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in _TORCHVISION_RENAMES:
            key = pattern.sub(replacement, key)
        renamed[key] = value
    return renamed
