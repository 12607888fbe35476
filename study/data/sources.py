"""Where the images come from: CIFAR-10/100, Fashion-MNIST and the embedded Fashion-MNIST subset.

Every data set is loaded whole into two uint8 tensors (images N,C,H,W and int64 labels), because the
paper's data sets are small enough to live on the device; batching and augmentation are tensor ops
(see ``augment.py``), so no DataLoader is involved.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DATASETS


class DataError(Exception):
    """Bad or missing data; ``str(e)`` is one line naming the problem and the fix."""


DEFAULT_DATASET = "fashion-mnist-mini"

#: Where the embedded subset lives, shipped as package data.
MINI_DIR = Path(__file__).resolve().parent / "fashion_mnist_mini"

#: Debian's ``dataset-fashion-mnist`` package puts the raw files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

#: Raw IDX file stems per split, named as torchvision and Zalando name them.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# The validation split must be the same for every run and every run seed, so it has its own seed.
HOLDOUT_SEED = 45_000
HOLDOUT_FRACTION = 0.1  # the paper's 5k of 50k


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set, known without touching any file."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int  # the full official training set, before any hold-out


_INFO = {
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, 50_000),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, 50_000),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, 60_000),
    "fashion-mnist-mini": DatasetInfo("fashion-mnist-mini", 10, 1, 28, 10_000),
}


def dataset_info(name: str) -> DatasetInfo:
    """Return the static description of data set ``name``; raise DataError if it is unknown."""
    try:
        return _INFO[name]
    except KeyError:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}") from None


@dataclass
class Split:
    """A whole split as tensors: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> Split:
        """Return this split with both tensors on ``device``."""
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Data:
    """A training split, an evaluation split and the training set's per-pixel mean."""

    info: DatasetInfo
    train: Split
    eval: Split
    eval_split: str  # "test" (official test set) or "val" (held out of the training set)
    mean: torch.Tensor  # float32 (C, H, W), in [0, 1] scale
    where: Path | None = None  # the folder its files were read from (None: built in memory)
    _sha256: str | None = field(default=None, repr=False, compare=False)  # `fingerprint`, once computed

    def to(self, device: torch.device | str) -> Data:
        """Return this data with every tensor on ``device``."""
        return Data(self.info, self.train.to(device), self.eval.to(device), self.eval_split,
                    self.mean.to(device), self.where, self._sha256)

    def source(self) -> dict:
        """What a run read, for its provenance: the folder, the images of each split, and the sha256 of
        the images and labels it trained and was evaluated on (`fingerprint`: the same for gzipped and
        plain IDX files, or a download and Debian's copy of one release; computed once)."""
        if self._sha256 is None:
            self._sha256 = fingerprint(self.train, self.eval)
        return {"dir": None if self.where is None else str(self.where), "sha256": self._sha256,
                "images": {"train": len(self.train), self.eval_split: len(self.eval)}}


def fingerprint(*splits: Split) -> str:
    """The sha256 of the splits' images and labels as decoded (shapes, dtypes and bytes), in order."""
    digest = hashlib.sha256()
    for split in splits:
        for tensor in (split.images, split.labels):
            array = tensor.detach().cpu().contiguous().numpy()
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


#: The folders a torchvision download makes inside the data dir before it fetches anything (deepest
#: first): Fashion-MNIST's raw files go to FashionMNIST/raw; CIFAR's archive to the data dir itself.
DOWNLOAD_DIRS = ("FashionMNIST/raw", "FashionMNIST")


def load_data(name: str, data_dir: str | os.PathLike | None = None, *, holdout: bool = False,
              download: bool = False) -> Data:
    """Load data set ``name`` into CPU tensors (see `_load_data`). A failed ``download`` leaves no
    directory behind that it created (they are removed if still empty): the data dir and its parents,
    and the folders torchvision makes inside it before it fetches a file."""
    root = Path(data_dir if data_dir is not None else "data").absolute()
    inside = [root / d for d in DOWNLOAD_DIRS]
    created = [p for p in (*inside, root, *root.parents) if not p.exists()] if download else []
    try:
        return _load_data(name, data_dir, holdout=holdout, download=download)
    except DataError:
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:  # not empty (it holds something else): kept, as are its parents
                continue
        raise


def _load_data(name: str, data_dir: str | os.PathLike | None = None, *, holdout: bool = False,
               download: bool = False) -> Data:
    """Load data set ``name`` into CPU tensors.

    With ``holdout=False`` the model trains on the full official training set and is evaluated on
    the official test set (the paper's curves). With ``holdout=True`` a fixed, class-stratified 10%
    of the training set becomes the evaluation split ("val"), as the paper's 45k/5k split did to
    pick the stopping point. ``mean`` is always computed from the training split actually used.
    ``data_dir`` defaults to ``./data`` (Fashion-MNIST also searches Debian's location);
    the embedded ``fashion-mnist-mini`` ignores it. Raises DataError on missing or bad files.
    """
    info = dataset_info(name)
    # With a hold-out the official test set is never looked at, so it is not loaded either.
    if name in ("cifar10", "cifar100"):
        where = Path(data_dir if data_dir is not None else "data") / _cifar(name)[1].base_folder
        train = _load_cifar(name, data_dir, train=True, download=download)
        test = None if holdout else _load_cifar(name, data_dir, train=False, download=download)
    elif name == "fashion-mnist":
        where = _find_fashion_mnist(data_dir, download)
        train = read_idx_split(where, "train")
        test = None if holdout else read_idx_split(where, "test")
    else:
        where = MINI_DIR
        train = _load_mini("train")
        test = None if holdout else _load_mini("test")

    _check(train, info, "training", where)
    if holdout:
        train, evaluation = holdout_split(train, info.num_classes)
    else:
        _check(test, info, "test", where)
        evaluation = test
    return Data(info, train, evaluation, "val" if holdout else "test", pixel_mean(train.images),
                where=Path(where).absolute())


def pixel_mean(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean (C, H, W) of uint8 images in [0, 1] scale, as float32."""
    # Chunks of 4096 keep memory small (a float copy of all of CIFAR is 600 MB) and keep every
    # float32 partial sum an integer below 2**24, so it is exact; the chunk sums add in float64.
    total = sum(chunk.float().sum(dim=0).double() for chunk in images.split(4096))
    return (total / (255.0 * images.shape[0])).float()


def stratified_pick(labels: torch.Tensor, per_class: torch.Tensor, seed: int) -> torch.Tensor:
    """Boolean mask picking ``per_class[c]`` examples of each class c uniformly at random.

    The draw depends only on ``labels``, ``per_class`` and ``seed``, never on global RNG state.
    """
    n = labels.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # A stable sort by label groups the shuffled indices by class and keeps their random order
    # within each class, so taking the first k of every class group is a uniform sample.
    order = perm[torch.argsort(labels[perm], stable=True)]
    counts = torch.bincount(labels, minlength=per_class.shape[0])
    first_of_class = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(n) - first_of_class[labels[order]]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order] = rank_in_class < per_class[labels[order]]
    return mask


def holdout_split(split: Split, num_classes: int) -> tuple[Split, Split]:
    """Split off a fixed, class-stratified ``HOLDOUT_FRACTION`` of ``split`` as validation.

    Returns (train, val), both in the original order. The draw uses ``HOLDOUT_SEED``, so every
    run sees the same split whatever its own seed.
    """
    counts = torch.bincount(split.labels, minlength=num_classes)
    is_val = stratified_pick(split.labels, torch.round(counts * HOLDOUT_FRACTION).long(),
                             HOLDOUT_SEED)
    return (Split(split.images[~is_val], split.labels[~is_val]),
            Split(split.images[is_val], split.labels[is_val]))


def _check(split: Split, info: DatasetInfo, what: str, where: Path) -> None:
    """Catch files that parse but do not hold this data set (wrong shape, count or labels)."""
    fix = f"check or replace the files in {where}/"
    shape = (info.in_channels, info.image_size, info.image_size)
    if split.images.dtype != torch.uint8 or tuple(split.images.shape[1:]) != shape:
        raise DataError(f"{info.name} {what} images have shape {tuple(split.images.shape)} "
                        f"({split.images.dtype}), expected (N, {', '.join(map(str, shape))}) uint8; "
                        f"{fix}")
    if len(split) != split.images.shape[0] or len(split) == 0:
        raise DataError(f"{info.name} {what} set has {split.images.shape[0]} images but "
                        f"{len(split)} labels; {fix}")
    if split.labels.min() < 0 or split.labels.max() >= info.num_classes:
        raise DataError(f"{info.name} {what} labels outside 0..{info.num_classes - 1}; {fix}")


def _one_line(error: BaseException, limit: int = 300) -> str:
    """`error` as one line: its type and its message's lines joined (torchvision's download errors put
    the cause, "Tried <mirror>, got: <urlopen error ...>", on the lines after the first), cut at `limit`."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# --- CIFAR ---------------------------------------------------------------------------------------

#: Name and torchvision dataset class per data set. (torchvision is imported where it is used:
#: its import costs seconds, which `study grids`, `status` and the analysis need not pay.)
_CIFAR = {
    "cifar10": ("CIFAR-10", "CIFAR10"),
    "cifar100": ("CIFAR-100", "CIFAR100"),
}


def _cifar(name: str) -> tuple[str, type]:
    """The data set's name and its torchvision class."""
    import torchvision.datasets

    title, class_name = _CIFAR[name]
    return title, getattr(torchvision.datasets, class_name)


def _load_cifar(name: str, data_dir: str | os.PathLike | None, *, train: bool,
                download: bool) -> Split:
    """One CIFAR split through torchvision, so its md5 checks guard the files."""
    title, cls = _cifar(name)
    root = Path(data_dir if data_dir is not None else "data")
    folder = root / cls.base_folder
    try:
        ds = cls(root=root, train=train, download=download)
    except RuntimeError as e:
        # torchvision's "not found or corrupted": a file is missing or its md5 does not match. Which one:
        raise DataError(f"{title} not found or corrupted in {root}/ ({_cifar_fault(cls, folder)}); " + (
            f"the download did not check out: delete {folder}/ and {root / cls.filename} and retry --download"
            if download else "put the extracted archive there or pass --download when online")) from e
    except OSError as e:  # a failed download, or a file that cannot be opened
        raise DataError(f"{title} could not be read or downloaded into {root}/ ({_one_line(e)}); "
                        f"put the extracted {cls.filename} there or retry --download when online"
                        ) from e
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError,
            AttributeError) as e:
        # The md5s matched (or were changed) but the pickles do not hold CIFAR batches.
        raise DataError(f"{title} files in {folder}/ cannot be unpickled ({_one_line(e)}); "
                        f"delete that directory and re-extract {cls.filename} there, "
                        "or pass --download when online") from e
    # torchvision keeps CIFAR as HWC numpy; the models want CHW tensors.
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return Split(images, torch.as_tensor(ds.targets, dtype=torch.int64))


def _cifar_fault(cls: type, folder: Path) -> str:
    """The first of a CIFAR folder's files that is missing or fails its official md5, in words."""
    from torchvision.datasets.utils import check_integrity

    listed = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    for name, md5 in listed:
        path = folder / name
        if not path.is_file():
            return f"{path} is missing" if folder.is_dir() else f"expected {folder}/ from {cls.filename}"
        if not check_integrity(str(path), md5):
            return f"{path} fails its md5"
    return f"expected {folder}/ from {cls.filename}"


# --- Fashion-MNIST (raw IDX files) ---------------------------------------------------------------

def _idx_file(directory: Path, stem: str) -> Path | None:
    """The IDX file ``stem`` in ``directory``, uncompressed or gzipped, or None."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_fashion_mnist(directory: Path) -> bool:
    return all(_idx_file(directory, stem) is not None
               for stems in FASHION_MNIST_FILES.values() for stem in stems)


def _fashion_mnist_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """The directories searched, in order: torchvision's layout first, then a flat directory."""
    if data_dir is not None:
        return [Path(data_dir) / "FashionMNIST" / "raw", Path(data_dir)]
    return [Path("data") / "FashionMNIST" / "raw", Path("data"), DEBIAN_FASHION_MNIST]


def _find_fashion_mnist(data_dir: str | os.PathLike | None, download: bool) -> Path:
    """The first directory holding all four raw files, downloading them if asked and none does."""
    searched = _fashion_mnist_dirs(data_dir)
    for directory in searched:
        if _has_fashion_mnist(directory):
            return directory
    root = Path(data_dir if data_dir is not None else "data")
    if download:
        import torchvision.datasets

        try:
            # torchvision downloads, checks md5s and unpacks into root/FashionMNIST/raw.
            torchvision.datasets.FashionMNIST(root=root, train=True, download=True)
        except (RuntimeError, OSError) as e:
            raise DataError(f"Fashion-MNIST download into {root}/FashionMNIST/raw failed "
                            f"({_one_line(e)}); retry when online, or install "
                            "dataset-fashion-mnist (apt-get) and drop --download") from e
        raw, legacy = root / "FashionMNIST" / "raw", root / "FashionMNIST" / "processed"
        if not _has_fashion_mnist(raw) and legacy.is_dir():  # torchvision reads its pre-0.9 cache, downloads nothing
            raise DataError(f"--download fetched nothing into {raw}/: torchvision found its old cache {legacy}/ and "
                            "stopped there; delete that folder and retry")
        return raw
    raise DataError(
        f"Fashion-MNIST not found (searched {', '.join(map(str, searched))} for "
        f"{FASHION_MNIST_FILES['train'][0]}[.gz] and the other three raw files); "
        "run `apt-get install dataset-fashion-mnist`, pass --data-dir DIR, "
        "or pass --download when online")


def read_idx_split(directory: str | os.PathLike, split: str) -> Split:
    """Read the raw IDX ``split`` ("train" or "test") from ``directory``, gzipped or not.

    The files are parsed by torchvision's own IDX reader. Raises DataError if they are missing or
    cannot be parsed.
    """
    directory = Path(directory)
    paths = [_idx_file(directory, stem) for stem in FASHION_MNIST_FILES[split]]
    if None in paths:
        raise DataError(f"{FASHION_MNIST_FILES[split][paths.index(None)]}[.gz] missing in "
                        f"{directory}/; put the raw Fashion-MNIST files there")
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images = _read_idx_file(paths[0], read_image_file, "images (N x 28 x 28)")
    labels = _read_idx_file(paths[1], read_label_file, "labels (N)")
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split} files in {directory}/ do not match: {len(images):,} images but "
                        f"{len(labels):,} labels; replace them with the intact raw IDX files of one release")
    # (N, 28, 28) -> (N, 1, 28, 28): the models take a channel axis.
    return Split(images.unsqueeze(1).contiguous(), labels.to(torch.int64))


def _load_mini(split: str) -> Split:
    """A split of the embedded subset; missing files mean a broken install, not a user mistake."""
    try:
        return read_idx_split(MINI_DIR, split)
    except _UnpackError:  # no room to unpack: nothing wrong with the install
        raise
    except DataError as e:
        raise DataError(f"the embedded fashion-mnist-mini is missing or damaged in {MINI_DIR}/ "
                        f"({e}); reinstall the package, or rebuild it with "
                        "`python -m study.data.fashion_mnist_mini.build`") from e


class _UnpackError(DataError):
    """A gzipped IDX file that could not be unpacked for want of room in the temporary folder."""


def _read_idx_file(path: Path, reader, what: str) -> torch.Tensor:
    """`_read_idx`, with any failure a one-line DataError naming the file and what is wrong."""
    # An unpacked file is read before its .gz: where the unpacked one is damaged (an interrupted unpack,
    # say) and the .gz is beside it, the fix is to delete it.
    gz = path.with_name(path.name + ".gz")
    fix = (f"delete it, and {gz.name} beside it is read instead" if path.suffix != ".gz" and gz.is_file()
           else "replace it with the intact raw Fashion-MNIST file")
    try:
        return _read_idx(path, reader)
    except _UnpackError:
        raise
    except AssertionError:  # torchvision's reader asserts on the header: magic number, dimensions
        raise DataError(f"{path} is corrupt: its header is not that of an IDX file of {what}; {fix}") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the reader raise
        # gzip raises OSError/EOFError on a damaged archive, a truncated body fails to reshape, a
        # type byte the header check lets through (10) or skips (python -O) is a KeyError.
        raise DataError(f"{path} is corrupt ({_one_line(e)}); {fix}") from e


def _read_idx(path: Path, reader) -> torch.Tensor:
    if path.suffix != ".gz":
        return reader(str(path))
    # torchvision's reader takes only an uncompressed path, so unpack to a temporary directory
    # with torchvision's own extractor rather than keeping a decompressed copy next to the data.
    from torchvision.datasets.utils import extract_archive

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return reader(str(extract_archive(str(path), tmp)))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # no room to write the unpacked copy: the temporary folder
            raise _UnpackError(f"cannot unpack {path} into the temporary folder {tempfile.gettempdir()} "
                               f"({_one_line(e)}); free space there, or set TMPDIR to a folder with room") from e
        raise
