"""ImageNet (paper sections 3.4 and 4.1): folders of JPEGs, decoded by DataLoader workers.

Unlike the CIFAR-sized data sets, ImageNet does not fit on the device, so this is the one data set
that goes through `torchvision.datasets.ImageFolder` and a `DataLoader`. The layout is torchvision's:

    root/train/<class>/*.JPEG
    root/val/<class>/*.JPEG      (the official flat val/ must first be sorted into class folders)

Labels are the indices of the sorted class-folder names, the same in both splits.

The work is split where it is cheapest. Workers draw each image's view, decode it, resample its crop
alone with PIL, flip it and hand over uint8 224x224 crops (a quarter of the bytes of float32 through
pinned memory); `normalize` then turns a whole batch into the model's input on the training device,
with the optional PCA colour lighting applied there, batched.

Mean subtraction: the paper subtracts "the per-pixel mean" (AlexNet's, its reference [21]): a 224x224
mean image, subtracted from every crop. How it was computed under scale augmentation the paper does
not say; `pixel_mean` averages the training images as the evaluation sees them (shorter side 256,
centre 224x224 crop), once per data set, cached in the runs dir. `--mean channel` subtracts instead
the per-channel ImageNet mean (torchvision's values), a deviation. Neither divides by a standard
deviation, as in the paper.

Training views are drawn before decoding and only the crop is resampled (`study.data.decode`):
`CropFirst` in the workers by default; with `--decode gpu` (`ImageNetData.decode`) the workers read
the JPEG bytes and draw the views, and the training process decodes each batch on the GPU
(`decode.BatchDecoder`). `train_transform` is the resize-then-crop reference both are tested against;
`benchmarks/imagenet_throughput.py` measures all three.
"""

from __future__ import annotations

import atexit
import copy
import fcntl
import functools
import itertools
import math
import multiprocessing
import multiprocessing.synchronize
import os
import re
import signal
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader, find_classes
from torchvision.transforms import v2

from .decode import CROP, TRAIN_SCALE, CropFirst, EncodedView, collate_encoded, open_image, partial_decoding
from .sources import DataError

#: Validation and 10-crop testing resize the shorter side to this before cropping: AlexNet's 256, as
#: torchvision and fb.resnet.torch do (the paper names the 10-crop test but not the resize).
EVAL_RESIZE = 256
#: Per-channel mean of the ImageNet training set in [0, 1] scale (RGB), as torchvision uses it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
#: `pixel_mean`'s cache, a file in the runs dir; {key} names the data root.
PIXEL_MEAN_FILE = ".imagenet-pixel-mean-{key}.pt"

# PCA of the ImageNet training set's RGB pixel values in [0, 1] scale, for AlexNet's lighting
# augmentation (Krizhevsky et al. 2012, section 4.1, which describes it but prints no values): the
# values fb.resnet.torch (Facebook's Torch reimplementation of ResNet) applies; eigenvalues, and
# eigenvectors as columns.
PCA_EIGENVALUES = (0.2175, 0.0188, 0.0045)
PCA_EIGENVECTORS = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class Lighting(nn.Module):
    """AlexNet's PCA colour augmentation: add to every pixel of an image the RGB offset
    ``eigenvectors @ (alpha * eigenvalues)``, alpha ~ N(0, alphastd^2) drawn once per image.

    Takes float images in [0, 1] scale, one (3, H, W) or a batch (..., 3, H, W); each image gets its
    own alpha. ``alphastd=0.1`` is AlexNet's value.
    """

    def __init__(self, alphastd: float = 0.1) -> None:
        super().__init__()
        self.alphastd = alphastd
        self.register_buffer("eigenvalues", torch.tensor(PCA_EIGENVALUES), persistent=False)
        self.register_buffer("eigenvectors", torch.tensor(PCA_EIGENVECTORS), persistent=False)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.alphastd == 0:
            return images
        lead = images.shape[:-3]
        alpha = torch.randn((*lead, 3), generator=generator, device=images.device) * self.alphastd
        eigenvalues = self.eigenvalues.to(images.device)
        eigenvectors = self.eigenvectors.to(images.device)
        offset = (alpha * eigenvalues) @ eigenvectors.T  # (..., 3): one RGB shift per image
        return images + offset[..., None, None].to(images.dtype)


def normalize(
    images: torch.Tensor,
    *,
    mean: tuple[float, float, float] | torch.Tensor = IMAGENET_MEAN,
    lighting: Lighting | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 crops from these loaders (B, 3, H, W), or (B, 10, 3, H, W) for 10-crop) -> the
    model's float32 input, on the images' device: scale to [0, 1], apply ``lighting`` if given
    (training only), subtract ``mean``: a (3, H, W) mean image (`pixel_mean`) or a per-channel
    triple (no std division, as in the paper)."""
    x = v2.functional.to_dtype(images, torch.float32, scale=True)
    if lighting is not None:
        x = lighting(x, generator)
    if isinstance(mean, torch.Tensor):
        return x - mean.to(x.device, torch.float32)
    return v2.functional.normalize(x, list(mean), [1.0, 1.0, 1.0])


def pixel_mean(
    root: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    workers: int = 0,
    device: torch.device | str = "cpu",
    distributed: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
    train: ImageFolder | None = None,
    stop: Callable[[], None] | None = None,
) -> torch.Tensor:
    """The per-pixel mean of ``root/train`` (the paper's, 3.4): a (3, 224, 224) float32 image in
    [0, 1] scale, the average of every training image resized to a shorter side of 256 and centre
    cropped to 224x224 (as the validation images are). Computed once (a pass over the training
    set, with ``workers`` DataLoader workers; under DDP each process averages its share) and cached
    in ``cache_dir``, keyed by the data root's absolute path, for every later run and `study
    evaluate`. ``train``: the already scanned training folder, if there is one; a cache made from
    another number of images than it holds (the folder has changed) is a DataError: recomputing it
    would change the mean under the runs that trained with it, so deleting it is the user's call.
    An unreadable cache is computed again. The cache is written by rank 0, atomically, one process
    at a time (an flock on ``cache_dir``). ``stop``, called after each batch of the pass, may raise to
    end it (a signal: the pass takes an hour on ImageNet), and nothing is cached."""
    cache = pixel_mean_cache(root, cache_dir)
    images = None if train is None else len(train)
    if (mean := _read_pixel_mean(cache, log, images)) is not None:
        return mean
    if distributed:  # every process takes part in the one pass
        return _compute_pixel_mean(root, cache, workers, device, distributed, progress, log, train, stop)
    # One process at a time: `--concurrency` workers, SLURM array tasks and `study evaluate` that
    # start together wait for the first one's pass and read its result.
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache.parent, os.O_RDONLY)  # an flock on the directory: no lock file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if (mean := _read_pixel_mean(cache, lambda message: None, images)) is not None:
            return mean
        return _compute_pixel_mean(root, cache, workers, device, distributed, progress, log, train, stop)
    finally:
        os.close(fd)  # releases the flock


def pixel_mean_cache(root: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Where `pixel_mean` caches the mean of ``root/train`` in ``cache_dir``: keyed by the root's absolute path."""
    import hashlib

    key = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir) / PIXEL_MEAN_FILE.format(key=key)


def cached_pixel_mean(root: str | os.PathLike, cache_dir: str | os.PathLike) -> torch.Tensor | None:
    """The mean of ``root/train`` cached in ``cache_dir`` (`pixel_mean`'s), read without the folder; None where
    there is none, or it is unreadable."""
    return _read_pixel_mean(pixel_mean_cache(root, cache_dir), lambda message: None)


def _read_pixel_mean(cache: Path, log: Callable[[str], None], images: int | None = None) -> torch.Tensor | None:
    """The cached mean image, or None when there is none or it is unreadable (said in `log`);
    DataError when (``images`` given) it was made from another number of images."""
    try:
        record = torch.load(cache, map_location="cpu", weights_only=True)
        mean = record["mean"]
        if not (isinstance(mean, torch.Tensor) and mean.shape == (3, CROP, CROP)):
            raise ValueError("not a 3x224x224 mean image")
    except FileNotFoundError:
        return None
    except Exception as e:  # a truncated or foreign file: compute it again
        log(f"{cache} is unreadable ({type(e).__name__}); computing the per-pixel mean again")
        return None
    if images is not None and record.get("images") != images:
        raise DataError(
            f"the per-pixel mean cached in {cache} was made from {record.get('images')} training images of "
            f"{record.get('root')}, which now has {images:,}; if the data set changed on purpose, delete {cache} "
            "to compute it again (runs that trained with the old mean then go on with the new one)")
    return mean.float()


def _compute_pixel_mean(root, cache: Path, workers: int, device, distributed: bool, progress: bool,
                        log: Callable[[str], None], train: ImageFolder | None,
                        stop: Callable[[], None] | None = None) -> torch.Tensor:
    """`pixel_mean`'s pass over the training set; rank 0 writes the cache."""
    from tqdm import tqdm

    from ..runstore import atomic_write

    if train is None:
        train = image_folder(root, "train", None)
    centre = copy.copy(train)  # shares the scanned file list; only the loader and transform differ
    centre.loader, centre.transform = load_image, val_transform()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    shard = Subset(centre, range(rank, len(centre), world))
    loader = _Loader(shard, batch_size=256, num_workers=workers, worker_init_fn=_WORKER_INIT)
    device = torch.device(device)
    total = torch.zeros((3, CROP, CROP), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    if rank == 0:
        log(f"computing the per-pixel mean of the {len(centre):,} images in {Path(root) / 'train'} "
            f"(once; cached in {cache})")
    with tqdm(total=len(loader), desc="per-pixel mean", unit="batch", disable=not progress or rank != 0,
              leave=False, dynamic_ncols=True) as bar:
        for images, _ in batches(loader):  # an unreadable image: one line (`batches`)
            total += images.to(device).double().sum(0)
            count += images.shape[0]
            bar.update(1)
            if stop is not None:
                stop()
    if distributed:
        dist.all_reduce(total)
        dist.all_reduce(count)
    mean = (total / count / 255.0).float().cpu()
    if rank == 0:
        record = {"mean": mean, "images": int(count.item()), "root": str(Path(root).resolve())}
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda p: torch.save(record, p))
    return mean


def train_transform(scale: tuple[int, int] = TRAIN_SCALE, crop: int = CROP) -> v2.Compose:
    """Per-image training augmentation (paper 3.4) as it reads, on a decoded RGB image: shorter side
    resized to a length drawn uniformly from ``scale`` (inclusive), random ``crop`` x ``crop`` crop,
    horizontal flip with p=0.5; uint8 out. The reference: training uses `decode.CropFirst`, which
    draws the same views and resamples the crop alone."""
    lo, hi = scale
    return v2.Compose(
        [
            v2.RandomShortestSize(list(range(lo, hi + 1))),
            v2.RandomCrop(crop),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
        ]
    )


def val_transform(resize: int = EVAL_RESIZE, crop: int = CROP) -> v2.Compose:
    """Centre-crop validation (the paper's Figure 4 curves): shorter side to ``resize``, centre crop."""
    return v2.Compose([v2.Resize(resize), v2.CenterCrop(crop), v2.PILToTensor()])


class _StackCrops(nn.Module):
    """A tuple of crops -> one (n, C, H, W) tensor, so a 10-crop sample collates like any other."""

    def forward(self, crops: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.stack(crops)


def ten_crop_transform(resize: int = EVAL_RESIZE, crop: int = CROP) -> v2.Compose:
    """The standard 10-crop test (paper 4.1, Table 2): the four corner and centre crops of the image
    resized to ``resize``, and their mirror images; a (10, 3, crop, crop) uint8 tensor out."""
    return v2.Compose([v2.Resize(resize), v2.TenCrop(crop), v2.PILToTensor(), _StackCrops()])


def from_worker(e: DataError) -> DataError:
    """A DataError raised in a DataLoader worker arrives with the worker's traceback in its message;
    the same error with its own one line."""
    last = str(e).strip().splitlines()[-1]
    return DataError(last.split("DataError: ", 1)[-1])


def load_image(path: str) -> Image.Image:
    """ImageFolder's own loader (RGB, so greyscale and CMYK JPEGs work too); an unreadable file is a
    DataError naming it."""
    try:
        return default_loader(path)
    except OSError as e:  # PIL's UnidentifiedImageError and "image file is truncated" are OSErrors
        raise DataError(f"cannot decode image {path} ({e}); replace or delete that file") from e


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """``root/split``, or DataError (one line, naming the fix) if it or ``root`` is missing."""
    where = Path(root) / split
    if Path(root).exists() and not Path(root).is_dir():
        raise DataError(f"ImageNet root {root} is a file, not a folder; pass --data-dir pointing at the folder "
                        "that holds train/ and val/")
    if not Path(root).is_dir():
        raise DataError(f"ImageNet root {root}/ not found; pass --data-dir pointing at the folder "
                        "that holds train/ and val/")
    if not where.is_dir():
        raise DataError(f"{where}/ not found; ImageNet needs {root}/train/<class>/*.JPEG and "
                        f"{root}/val/<class>/*.JPEG (torchvision's ImageFolder layout)")
    return where


def image_folder(root: str | os.PathLike, split: str, transform: Callable | None,
                 loader: Callable[[str], Image.Image] = load_image) -> ImageFolder:
    """``root/split`` as an ImageFolder with ``transform`` (over decoded RGB images, or over opened
    ones with ``loader=decode.open_image``); DataError (one line, naming the fix) if the folder is
    missing, holds no class folders or a class folder holds no images."""
    where = split_dir(root, split)
    try:
        return ImageFolder(str(where), transform=transform, loader=loader)
    except FileNotFoundError as e:  # ImageFolder: no class folders, or a class without images
        first_sentence = str(e).split(". ")[0]
        empty = re.match(r"Found no valid file for the classes (.+)", first_sentence)
        if empty:  # some class folders hold no image: the others are fine
            raise DataError(f"{where}/ has class folders with no image ({empty[1]}); put that class's JPEGs in "
                            "them, or delete them from train/ and val/ alike") from e
        raise DataError(f"{where}/ holds no usable <class>/<image> files ({first_sentence}); "
                        f"put one folder of JPEGs per class in {where}/") from e


def _check_pair(train: ImageFolder, val: ImageFolder, root: str | os.PathLike) -> None:
    """Catch layouts that load but would mislabel: different classes in train/ and val/, or files
    that are not images (checked on each split's first file, not all 1.3 million)."""
    _check_classes(train.classes, val.classes, root)
    for ds in (train, val):
        load_image(ds.samples[0][0])


def _check_classes(train: list[str], val: list[str], root: str | os.PathLike, split: str = "val") -> None:
    """DataError (one line, naming the fix) unless train/ and ``split``/ (val/) have the same class
    folders: a label is the index of its class among train/'s, so other folders would mislabel it."""
    if train != val:
        differ = sorted(set(train) ^ set(val))[:3]
        raise DataError(
            f"{root}/train/ has {len(train)} class folders and {root}/{split}/ has "
            f"{len(val)}, differing in e.g. {', '.join(differ)}; sort {split}/ into the same class "
            "folders as train/ (ImageNet's official val/ is flat: sort it first, e.g. with valprep.sh)")


def train_classes(root: str | os.PathLike) -> list[str]:
    """The class-folder names of ``root/train``, sorted (the labels' order), from its listing alone
    (not the scan of its images); DataError, naming the fix, if it is missing or holds none."""
    where = split_dir(root, "train")
    try:
        return find_classes(str(where))[0]
    except FileNotFoundError as e:
        raise DataError(f"{where}/ holds no class folders ({e}); put one folder of JPEGs per class in {where}/") from e


class EvalResult(NamedTuple):
    """Mean cross-entropy loss and top-1 / top-5 error % over an evaluation set."""

    loss: float
    top1: float
    top5: float


@dataclass
class Loaders:
    """The training loader and the centre-crop validation loader of one ImageNet root."""

    train: DataLoader
    val: DataLoader

    @property
    def classes(self) -> list[str]:
        """Class-folder names; label i is ``classes[i]``."""
        return self.train.dataset.classes


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way: `skip` leading indices of this
    process's shard are left out (set it after `set_epoch`, before iterating), so a run stopped
    mid-epoch resumes with the images it had not yet seen, without decoding the others."""

    skip: int = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


def _sampler(dataset: ImageFolder, distributed: bool, *, shuffle: bool, seed: int) -> DistributedSampler | None:
    if distributed:
        return ResumableSampler(dataset, shuffle=shuffle, seed=seed)
    # One replica of a DistributedSampler is a seeded shuffle whose order depends on (seed, epoch)
    # alone, so training order is set the same way, and resumes the same way, with or without DDP.
    return ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed) if shuffle else None


def _per_process_batch(batch_size: int, distributed: bool) -> int:
    if not distributed:
        return batch_size
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs torch.distributed initialised first "
                         "(launch with torchrun and call init_process_group)")
    world = dist.get_world_size()
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} does not split evenly over {world} processes; "
                         f"use a multiple of {world}")
    return batch_size // world


#: Set when the training process exits (`_shutdown_live_workers`): from then on its workers obey
#: SIGTERM, which multiprocessing's exit handler sends them before waiting for them.
_EXITING = multiprocessing.Event()


def _ignore_stop_signals(worker_id: int, exiting: "multiprocessing.synchronize.Event | None" = None) -> None:
    """DataLoader workers leave SIGTERM, SIGINT and SIGUSR2 to the training process: SLURM and a
    terminal signal every process, and a worker killed by one would turn the run's orderly stop
    (step, checkpoint, exit) into a `DataLoader worker exited unexpectedly` failure. The training
    process shuts its workers down when it exits (`_Loader`); once it is exiting (`exiting` set),
    a SIGTERM ends the worker."""
    for signum in (signal.SIGINT, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)

    def on_sigterm(signum: int, frame: object) -> None:
        if exiting is not None and exiting.is_set():
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)


#: What the workers of this package's loaders run first.
_WORKER_INIT = functools.partial(_ignore_stop_signals, exiting=_EXITING)
_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


class _Loader(DataLoader):
    """A DataLoader whose worker iterators are shut down at exit. Workers ignore SIGTERM
    (`_ignore_stop_signals`), and multiprocessing's exit handler stops workers still alive (an
    iterator kept by an exception's traceback cycle, say: `batches`) with SIGTERM and waits for
    them: it would wait for ever. `_shutdown_workers` at exit, before that handler, asks them to
    stop instead. (A second line of defence: `batches` and the training feed stop them first.)"""

    def _get_iterator(self):
        it = super()._get_iterator()
        if hasattr(it, "_shutdown_workers"):
            _LIVE_ITERATORS.add(it)
        return it


def shutdown_workers(it: Iterator | None) -> None:
    """Stop a DataLoader iterator's worker processes now (a no-op for anything else)."""
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


def batches(loader: Iterable) -> Iterator:
    """``loader``'s batches; its workers stop as soon as the iteration ends, by exhaustion, an
    error or the consumer's break. Not left to the garbage collector: an error raised in a worker
    is re-raised by a frame that also holds the exception (torch's `ExceptionWrapper.reraise`),
    a reference cycle through the traceback that keeps the iterator, and its workers, alive until
    a collection finds it; at exit that can be never, and the exit would hang (`_Loader`).
    A DataError raised in a worker (an unreadable image) comes out as its own one line (`from_worker`)."""
    it = iter(loader)
    try:
        yield from it
    except DataError as e:  # raised in a worker, it arrives with the worker's traceback
        raise from_worker(e) from None
    finally:
        shutdown_workers(it)


@atexit.register  # registered after multiprocessing's handler, so it runs before it
def _shutdown_live_workers() -> None:
    _EXITING.set()
    for it in list(_LIVE_ITERATORS):
        it._shutdown_workers()


def _loader(dataset: ImageFolder, batch_size: int, workers: int, sampler: DistributedSampler | None,
            pin_memory: bool | None, seed: int, collate_fn: Callable | None = None) -> DataLoader:
    return _Loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        # Seeds the workers' augmentation; `set_epoch` re-seeds it per epoch.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_WORKER_INIT,
    )


@dataclass
class ImageNetData:
    """The two scanned folders of an ImageNet root (scanning 1.3 million files takes a while, so a
    grid does it once and builds each run's loaders from these)."""

    root: Path
    train: ImageFolder
    val: ImageFolder
    eval_split: str = "val"
    #: Where training JPEGs are decoded: "cpu" (`decode.CropFirst` in the workers) or "gpu" (the
    #: workers read bytes, `decode.BatchDecoder` decodes each batch on the training device).
    decode: str = "cpu"
    #: The training scale range (paper: [256, 480]).
    scale: tuple[int, int] = TRAIN_SCALE
    #: The per-pixel mean of train/ (`pixel_mean`), once a run has needed it.
    pixel_mean: torch.Tensor | None = None

    def mean_for(self, kind: str, cache_dir: str | os.PathLike, **options: object) -> tuple | torch.Tensor:
        """What a run with ``RunConfig.mean == kind`` subtracts: the per-pixel mean image of train/
        (`pixel_mean` with ``options``, once per process, then kept here), or the per-channel
        `IMAGENET_MEAN`."""
        if kind != "pixel":
            return IMAGENET_MEAN
        if self.pixel_mean is None:
            self.pixel_mean = pixel_mean(self.root, cache_dir, train=self.train, **options)
        return self.pixel_mean

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    def source(self) -> dict:
        """What a run read, for its provenance: the root and the images of each split (1.3 million files
        are not hashed: the classes and counts tell two copies apart, not two versions of one image)."""
        return {"dir": str(self.root.absolute()), "classes": self.num_classes,
                "images": {"train": len(self.train), self.eval_split: len(self.val)}}


def views_decoder(decode: str) -> str:
    """What makes the training views, in words, for a run's log and provenance."""
    if decode == "gpu":
        return "decoded in batches on the device (--decode gpu)"
    library = partial_decoding()
    if library is not None:
        return f"the region under each view decoded on the CPU ({library})"
    return ("whole images decoded on the CPU by PIL (the package's _jpegcrop module was not built; "
            "docs/imagenet.md says how to build it)")


def open_imagenet(root: str | os.PathLike, *, scale: tuple[int, int] = TRAIN_SCALE, decode: str = "cpu") -> ImageNetData:
    """Scan ``root/train`` and ``root/val`` (with the training views of ``decode``, `ImageNetData.decode`,
    and the centre-crop transform); DataError, naming the fix, for missing or malformed folders."""
    if decode not in ("cpu", "gpu"):
        raise ValueError(f"decode must be 'cpu' or 'gpu'; got {decode!r}")
    for split in ("train", "val"):  # both folders exist before the long scan of either
        split_dir(root, split)
    views = CropFirst(scale) if decode == "cpu" else EncodedView(scale)
    train = image_folder(root, "train", views, loader=open_image)
    val = image_folder(root, "val", val_transform())
    _check_pair(train, val, root)
    return ImageNetData(Path(root), train, val, decode=decode, scale=scale)


def loaders_for(
    data: ImageNetData,
    batch_size: int,
    workers: int,
    distributed: bool = False,
    *,
    seed: int = 0,
    pin_memory: bool | None = None,
) -> Loaders:
    """Training and centre-crop validation DataLoaders over scanned folders (see `make_loaders`).
    With ``data.decode == "gpu"`` the training batches are (`decode.EncodedBatch`, labels)."""
    per_process = _per_process_batch(batch_size, distributed)
    collate = collate_encoded if data.decode == "gpu" else None
    return Loaders(
        train=_loader(data.train, per_process, workers, _sampler(data.train, distributed, shuffle=True, seed=seed),
                      pin_memory, seed, collate),
        val=_loader(data.val, per_process, workers, _sampler(data.val, distributed, shuffle=False, seed=seed),
                    pin_memory, seed),
    )


def make_loaders(
    root: str | os.PathLike,
    batch_size: int,
    workers: int,
    distributed: bool = False,
    *,
    seed: int = 0,
    scale: tuple[int, int] = TRAIN_SCALE,
    pin_memory: bool | None = None,
    decode: str = "cpu",
) -> Loaders:
    """Training and centre-crop validation DataLoaders over ``root/train`` and ``root/val``.

    Batches are (uint8 images (B, 3, 224, 224), int64 labels); pass the images through
    `normalize` on the device. With ``decode="gpu"`` the training batches' images are a
    `decode.EncodedBatch` instead: `decode.BatchDecoder` turns it into those images on the device. ``batch_size`` is the global batch: with ``distributed=True``
    (torch.distributed already initialised) each process loads ``batch_size / world_size`` images
    of its own ``DistributedSampler`` shard, and validation is sharded too (`evaluate` sums over
    processes; the sampler pads the shards to equal length by repeating up to world_size - 1
    images). Pinned memory defaults to on when CUDA is available. The last, smaller batch is kept.

    The training order is a function of (``seed``, epoch), with or without DDP: **the caller must
    call `set_epoch(loaders.train, epoch)` at the start of every epoch**, or every epoch repeats the
    first one's order. Raises DataError, naming the fix, for missing or malformed folders.
    """
    data = open_imagenet(root, scale=scale, decode=decode)
    return loaders_for(data, batch_size, workers, distributed, seed=seed, pin_memory=pin_memory)


def make_ten_crop_loader(
    root: str | os.PathLike,
    batch_size: int,
    workers: int,
    distributed: bool = False,
    *,
    split: str = "val",
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader of (uint8 (B, 10, 3, 224, 224), labels) 10-crop batches of ``root/split``,
    for `ten_crop_error`. ``batch_size`` counts images (each brings 10 crops), globally as in
    `make_loaders`. DataError, naming the fix, as for `make_loaders`' folders: another split than
    train/ must hold the same class folders as train/ (the labels are train/'s, as the runs trained),
    where train/ is there: a folder of val/ alone is tested by its own class folders' order."""
    dataset = image_folder(root, split, ten_crop_transform())
    if split != "train" and (Path(root) / "train").is_dir():
        _check_classes(train_classes(root), dataset.classes, root, split)
    load_image(dataset.samples[0][0])
    per_process = _per_process_batch(batch_size, distributed)
    return _loader(dataset, per_process, workers, _sampler(dataset, distributed, shuffle=False, seed=0),
                   pin_memory, 0)


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Start epoch ``epoch`` of a training loader from `make_loaders`; call it before iterating.
    ``skip_batches`` > 0 resumes the epoch after that many of this process's batches (the same
    images follow; their random crops are drawn afresh, so a mid-epoch resume is not bit-exact).

    Sets the sampler's shuffle (the same permutation on every process, each taking its shard) and
    re-seeds the workers' augmentation from (seed, rank, epoch), so an epoch sees the same images
    and crops whether or not the run was stopped and resumed before it (for the same number of
    workers and processes, and ``workers > 0``: without workers, augmentation draws from the main
    process's global RNG).
    """
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler):
        raise TypeError("set_epoch needs a training loader from make_loaders")
    sampler.set_epoch(epoch)
    if isinstance(sampler, ResumableSampler):
        sampler.skip = skip_batches * loader.batch_size
    elif skip_batches:
        raise TypeError("skip_batches needs a loader from make_loaders")
    # Distinct per process, so that shards are not all cropped with one random stream.
    loader.generator.manual_seed(((sampler.seed * 1_000_003 + sampler.rank) * 1_000_003 + epoch) % 2**63)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    *,
    crops: int | None = None,
    mean: tuple[float, float, float] | torch.Tensor = IMAGENET_MEAN,
    autocast: bool = False,
) -> EvalResult:
    """Loss and top-1/top-5 error % of ``model`` (eval mode) over ``loader``.

    Centre-crop batches (B, 3, H, W) are scored directly; multi-crop batches (B, n, 3, H, W) by the
    average of the n crops' softmax probabilities (the standard 10-crop test). ``crops``, if given,
    is the number of crops every batch must carry (ValueError otherwise). With a sharded
    (distributed) loader the counts are summed over all processes, so every process gets the
    whole set's result. ``autocast`` runs the forward pass in bfloat16. An unreadable image is a
    one-line DataError naming it (`batches`).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    # Sums stay on the device, so there is no host sync per batch: loss, top-1 and top-5 misses.
    totals = torch.zeros(3, device=device, dtype=torch.float64)
    n = 0
    for images, labels in batches(loader):
        n_crops = images.shape[1] if images.ndim == 5 else 1
        if crops is not None and n_crops != crops:
            raise ValueError(f"expected batches of {crops} crops per image, got shape {tuple(images.shape)}")
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = normalize(images.flatten(0, 1) if images.ndim == 5 else images, mean=mean)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        log_probs = F.log_softmax(logits.float(), dim=1).unflatten(0, (labels.shape[0], n_crops))
        # The log of the crops' mean probability; exactly log_softmax for a single crop.
        log_probs = torch.logsumexp(log_probs, dim=1) - math.log(n_crops)
        top5 = log_probs.topk(min(5, log_probs.shape[1]), dim=1).indices
        totals += torch.stack(
            [
                F.nll_loss(log_probs, labels, reduction="sum"),
                (top5[:, 0] != labels).sum(),
                (top5 != labels[:, None]).all(1).sum(),
            ]
        ).double()
        n += labels.shape[0]
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
        totals = torch.cat([totals, torch.tensor([float(n)], device=device, dtype=torch.float64)])
        dist.all_reduce(totals)
        totals, n = totals[:3], int(totals[3].item())
    model.train(was_training)
    if n == 0:
        raise DataError("the evaluation loader yielded no images; check its folder")
    loss, wrong1, wrong5 = totals.tolist()
    return EvalResult(loss / n, 100.0 * wrong1 / n, 100.0 * wrong5 / n)


def ten_crop_error(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    *,
    mean: tuple[float, float, float] | torch.Tensor = IMAGENET_MEAN,
    autocast: bool = False,
) -> EvalResult:
    """The paper's 10-crop test (Tables 2 and 3) over a loader from `make_ten_crop_loader`:
    loss, top-1 and top-5 error % of the 10 crops' averaged softmax; ``mean`` as the run trained."""
    return evaluate(model, loader, device, crops=10, mean=mean, autocast=autocast)
