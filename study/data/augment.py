"""Device-resident batching, normalisation and the paper's augmentation as batched tensor ops.

The whole uint8 data set sits on the device; a batch is an index_select, and augmentation is one
gather over a padded batch. torchvision's RandomCrop/RandomHorizontalFlip draw one transform per
call, so on a batch they would move every image the same way; the paper augments each image
independently, hence the per-image indices below.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .sources import Split


def normalize(images_uint8: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """uint8 images -> [0, 1] minus the per-pixel ``mean``, in the mean's dtype (float32; float64 in
    tests that need exact sums). The paper divides by no std."""
    return images_uint8.to(mean.dtype).div_(255.0).sub_(mean)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The paper's training augmentation, independently per image, on ``images``' device.

    ``images`` is a float (B, C, H, W) batch, already mean-subtracted, so the zero padding is the
    mean image (the paper says "padded with zeros" without saying before or after the mean is
    subtracted: docs/protocol.md, "Choices the paper leaves open"). Each image is zero-padded by ``pad`` on
    every side, cropped back to H x W at an offset drawn uniformly from [0, 2*pad] in each
    direction, and mirrored left-right with probability 0.5. All randomness comes from
    ``generator``, which must live on the same device as ``images``.
    """
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=device)
    flip = torch.rand(b, generator=generator, device=device) < 0.5

    rows = dy[:, None] + torch.arange(h, device=device)                    # (B, H)
    col = torch.arange(w, device=device)
    # Mirroring the crop reads its columns right to left; folding that into the column index
    # makes crop and flip a single gather.
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - col, col)       # (B, W)
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) batches in the split's own order, the last one possibly partial."""
    for start in range(0, len(split), batch_size):
        yield split.images[start:start + batch_size], split.labels[start:start + batch_size]
