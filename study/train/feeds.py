"""Where a run's batches come from: a device-resident data set (CIFAR, Fashion-MNIST) or DataLoader
workers decoding JPEGs (ImageNet). Both draw from the run's generator, so they resume exactly."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from ..config import RunConfig
from ..data import Data, DataError, augment, decode, imagenet, normalize
from ..stopflag import StopFlag
from .distributed import Distributed
from ..models import memory_format
from .step import evaluate


def quiet(message: str) -> None:
    """A log that says nothing (a DDP process other than rank 0)."""


class CifarFeed:
    """Batches of a device-resident data set (CIFAR, Fashion-MNIST): one random order per epoch
    and the paper's per-image augmentation, both drawn from the run's generator. Under DDP every
    process draws the same order and augmentation for the whole batch and keeps its own slice, so
    the global batch is exactly the single-process one."""

    def __init__(self, cfg: RunConfig, data: Data, device: torch.device, ddp: Distributed,
                 fmt: torch.memory_format | None = None) -> None:
        self.cfg, self.data, self.ddp, self.device = cfg, data, ddp, device
        self.fmt = memory_format(device) if fmt is None else fmt
        self.num_classes, self.in_channels = data.info.num_classes, data.info.in_channels
        self.eval_split = data.eval_split
        self.n_train = len(data.train.labels)

    def start_epoch(self, epoch: int, gen: torch.Generator, partial: dict | None) -> None:
        if partial is None:
            self.order, self.pos = torch.randperm(self.n_train, generator=gen, device=self.device), 0
        else:
            self.order, self.pos = partial["order"].to(self.device), partial["pos"]

    def state(self) -> dict:
        return {"order": self.order, "pos": self.pos}

    def close(self) -> None:
        pass

    def next_batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(this process's augmented input, its labels, the global batch's size), or None at the
        epoch's end."""
        if self.pos >= self.n_train:
            return None
        idx = self.order[self.pos : self.pos + self.cfg.batch_size]
        self.pos += len(idx)
        x_u8, y = self.data.train.images.index_select(0, idx), self.data.train.labels.index_select(0, idx)
        x = augment(normalize(x_u8, self.data.mean), gen).contiguous(memory_format=self.fmt)
        if self.ddp.enabled:
            x, y = x.tensor_split(self.ddp.world)[self.ddp.rank], y.tensor_split(self.ddp.world)[self.ddp.rank]
        return x, y, len(idx)

    def evaluate(self, model: nn.Module, autocast: torch.autocast) -> dict:
        with autocast:
            loss, err = evaluate(model, self.data)
        return {"loss": loss, "error_pct": err}


class ImageNetFeed:
    """Batches from DataLoader workers that decode JPEGs (ImageNet): uint8 crops to the device,
    then mean subtraction and the optional PCA lighting there. With ``data.decode == "gpu"`` the
    workers hand over JPEG bytes and views, decoded and cropped on the device (`decode.BatchDecoder`);
    the images it could not decode there are counted in the log at each epoch's end. Under DDP each
    process loads its own DistributedSampler shard of every global batch."""

    def __init__(self, cfg: RunConfig, data: imagenet.ImageNetData, device: torch.device,
                 ddp: Distributed, workers: int, mean: tuple | torch.Tensor,
                 log: Callable[[str], None] = quiet, fmt: torch.memory_format | None = None) -> None:
        self.cfg, self.ddp, self.device, self.log = cfg, ddp, device, log
        self.fmt = memory_format(device) if fmt is None else fmt
        self.decoder = decode.BatchDecoder(device) if data.decode == "gpu" else None
        self.mean = mean.to(device) if isinstance(mean, torch.Tensor) else mean
        self.num_classes, self.in_channels, self.eval_split = data.num_classes, 3, data.eval_split
        self.loaders = imagenet.loaders_for(data, cfg.batch_size, workers, ddp.enabled, seed=cfg.seed)
        self.lighting = imagenet.Lighting(cfg.lighting).to(device) if cfg.lighting else None
        if data.decode == "cpu" and decode.partial_decoding() is None:  # slower: say so (config.json records it)
            log(f"{cfg.run_id}: training views: {imagenet.views_decoder(data.decode)}")

    def start_epoch(self, epoch: int, gen: torch.Generator, partial: dict | None) -> None:
        self.batches = 0 if partial is None else partial["batches"]
        imagenet.set_epoch(self.loaders.train, epoch, skip_batches=self.batches)
        # The lighting draws: per process and epoch, like the workers' crops (set_epoch).
        gen.manual_seed(((self.cfg.seed * 1_000_003 + self.ddp.rank) * 1_000_003 + epoch) % 2**63)
        self.it = iter(self.loaders.train)

    def state(self) -> dict:
        return {"batches": self.batches}

    def close(self) -> None:
        """Stop the epoch's DataLoader workers now, not whenever the iterator is collected: a worker
        ignores SIGTERM (`_ignore_stop_signals`), so one still alive when the process exits would
        hang multiprocessing's exit, which stops workers with SIGTERM and waits for them."""
        imagenet.shutdown_workers(getattr(self, "it", None))
        self.it = None

    def next_batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        try:
            images, labels = next(self.it)
        except StopIteration:
            return None
        except DataError as e:  # raised in a worker, it arrives with the worker's traceback
            self.close()  # now: the error's traceback keeps the iterator alive (`imagenet.batches`)
            raise imagenet.from_worker(e) from None
        self.batches += 1
        images = self.decoder(images) if self.decoder else images.to(self.device, non_blocking=True)
        x = imagenet.normalize(images, mean=self.mean, lighting=self.lighting, generator=gen)
        y = labels.to(self.device, non_blocking=True)
        # Shards are padded to equal length, so every process's batch has the same size.
        return x.contiguous(memory_format=self.fmt), y, len(y) * self.ddp.world

    def evaluate(self, model: nn.Module, autocast: torch.autocast) -> dict:
        if self.decoder is not None and self.decoder.images:
            d = self.decoder
            self.log(f"{self.cfg.run_id}: {d.cpu_decoded:,} of the {d.images:,} training images decoded so far "
                     f"in this process went through the CPU (not a colour JPEG the {self.device.type} decoder takes)")
        result = imagenet.evaluate(model, self.loaders.val, self.device, mean=self.mean,
                                   autocast=self.cfg.bf16)
        return {"loss": result.loss, "error_pct": result.top1, "top5_error_pct": result.top5}


def pixel_mean_options(workers: int, device: torch.device, ddp: Distributed, progress: bool | None,
                       log: Callable[[str], None], stop: StopFlag | None = None) -> dict:
    """`imagenet.pixel_mean`'s options for this process: its workers and device, its share under
    DDP, rank 0 alone showing a bar and logging, and (one process: DDP's ranks must end the pass
    together) a signal in `stop` ending the pass after the current batch."""
    from .signals import raise_if_stopped

    return dict(workers=workers, device=device, distributed=ddp.enabled, log=log if ddp.writer else quiet,
                progress=ddp.writer and (sys.stderr.isatty() if progress is None else progress),
                stop=None if ddp.enabled or stop is None else (lambda: raise_if_stopped(stop)))


def make_feed(cfg: RunConfig, data: "Data | imagenet.ImageNetData", device: torch.device, ddp: Distributed, *,
              workers: int, runs_dir, progress: bool | None, log: Callable[[str], None],
              fmt: torch.memory_format | None = None) -> "CifarFeed | ImageNetFeed":
    """The run's feed, its batches laid out in `fmt` (default: `models.memory_format`); for ImageNet
    with its mean (the per-pixel mean from the runs dir's cache)."""
    if isinstance(data, imagenet.ImageNetData):
        mean = data.mean_for(cfg.mean, runs_dir, **pixel_mean_options(workers, device, ddp, progress, log))
        return ImageNetFeed(cfg, data, device, ddp, workers, mean, log if ddp.writer else quiet, fmt=fmt)
    return CifarFeed(cfg, data, device, ddp, fmt=fmt)


def input_of(data: "Data | imagenet.ImageNetData") -> tuple[tuple[int, ...], int]:
    """The shape of one training input (C, H, W) and the number of classes."""
    if isinstance(data, imagenet.ImageNetData):
        return (3, decode.CROP, decode.CROP), data.num_classes
    return tuple(data.train.images.shape[1:]), data.info.num_classes
