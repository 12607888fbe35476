"""Tests for study.data: loading through the real on-disk formats, hold-out, augmentation, batches."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from study.data import (
    DATASETS,
    DEFAULT_DATASET,
    Data,
    DataError,
    Split,
    augment,
    dataset_info,
    eval_batches,
    load_data,
    normalize,
)
from study.data.fashion_mnist_mini.build import write_idx
from study.data.sources import DEBIAN_FASHION_MNIST, MINI_DIR, read_idx_split

# --- helpers: the genuine CIFAR on-disk format ---------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2 ``str``, as cPickle did when the real CIFAR batches were made.

    So the files load exactly like the originals: keys are b"data" under encoding="bytes" and
    "data" under torchvision's encoding="latin1", and numpy arrays take numpy's Python 2 path.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3072) uint8 rows of R, G, B planes; byte 0 holds the image's index, as an id."""
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0] = np.arange(n)
    return data


def _write_cifar(root: Path, monkeypatch: pytest.MonkeyPatch, *, hundred: bool) -> dict:
    """Write a tiny CIFAR-10 (5x20 train, 20 test) or CIFAR-100 (200 train, 100 test) under root.

    torchvision checks the official md5s, so the class attributes are patched to the md5s of the
    files written here; everything else is torchvision's own loading code.
    """
    rng = np.random.default_rng(0)
    cls = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = b"fine_labels" if hundred else b"labels"
    classes = 100 if hundred else 10
    n_train, n_test = (200, 100) if hundred else (100, 20)
    train, test = _images(n_train, rng), _images(n_test, rng)
    train_labels = [i % classes for i in range(n_train)]
    test_labels = [(3 * i) % classes for i in range(n_test)]
    if hundred:
        files = {"train": (train, train_labels), "test": (test, test_labels)}
    else:
        files = {f"data_batch_{b + 1}": (train[20 * b:20 * b + 20], train_labels[20 * b:20 * b + 20])
                 for b in range(5)}
        files["test_batch"] = (test, test_labels)
    for name, (data, labels) in files.items():
        entry = {b"batch_label": name.encode(), label_key: labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
        if hundred:
            entry[b"coarse_labels"] = [label // 5 for label in labels]
        _py2_pickle(folder / name, entry)
    meta_key = cls.meta["key"].encode()
    _py2_pickle(folder / cls.meta["filename"],
                {meta_key: [f"class_{i}".encode() for i in range(classes)]})

    listed = [[name, _md5(folder / name)] for name in files]
    monkeypatch.setattr(cls, "train_list", listed[:-1])
    monkeypatch.setattr(cls, "test_list", listed[-1:])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})
    return {"root": root, "folder": folder, "train": train, "train_labels": train_labels,
            "test": test, "test_labels": test_labels}


@pytest.fixture
def cifar10(tmp_path, monkeypatch) -> dict:
    return _write_cifar(tmp_path / "data", monkeypatch, hundred=False)


@pytest.fixture
def cifar100(tmp_path, monkeypatch) -> dict:
    return _write_cifar(tmp_path / "data", monkeypatch, hundred=True)


def _assert_one_line_naming(error: pytest.ExceptionInfo, text: str) -> None:
    message = str(error.value)
    assert "\n" not in message and text in message, message


# --- data set catalogue --------------------------------------------------------------------------

def test_dataset_info_without_files():
    assert DEFAULT_DATASET in DATASETS
    info = dataset_info("cifar10")
    assert (info.num_classes, info.in_channels, info.image_size, info.train_size) == (10, 3, 32, 50000)
    assert dataset_info("cifar100").num_classes == 100
    fm = dataset_info("fashion-mnist")
    assert (fm.in_channels, fm.image_size, fm.train_size) == (1, 28, 60000)
    assert dataset_info("fashion-mnist-mini").train_size == 10000
    with pytest.raises(DataError) as error:
        dataset_info("imagenet-21k")
    _assert_one_line_naming(error, "cifar10")


# --- CIFAR ---------------------------------------------------------------------------------------

def test_generated_cifar_files_have_the_real_key_layout(cifar10):
    # The real batches unpickle with bytes keys under encoding="bytes" (Python 2 str keys).
    with open(cifar10["folder"] / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert {b"data", b"labels", b"batch_label", b"filenames"} <= set(entry)
    assert entry[b"data"].shape == (20, 3072) and entry[b"data"].dtype == np.uint8


def test_cifar10_loads_through_torchvision(cifar10):
    data = load_data("cifar10", cifar10["root"])
    train, test = data.train, data.eval
    assert data.eval_split == "test" and data.info.name == "cifar10"
    assert train.images.shape == (100, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == cifar10["train_labels"]
    assert test.labels.tolist() == cifar10["test_labels"]
    # Row layout is R plane, G plane, B plane, each row-major: byte 2*1024 + 5*32 + 9 is B at (5, 9).
    assert train.images[37, 2, 5, 9] == cifar10["train"][37, 2 * 1024 + 5 * 32 + 9]
    assert train.images[37, 0, 31, 0] == cifar10["train"][37, 31 * 32]
    assert torch.equal(train.images.reshape(100, -1), torch.from_numpy(cifar10["train"]))
    assert torch.equal(test.images.reshape(20, -1), torch.from_numpy(cifar10["test"]))
    expected_mean = cifar10["train"].reshape(100, 3, 32, 32).astype(np.float64).mean(0) / 255
    assert data.mean.dtype == torch.float32 and data.mean.shape == (3, 32, 32)
    np.testing.assert_allclose(data.mean.numpy(), expected_mean, rtol=0, atol=1e-6)


def test_cifar100_loads_fine_labels(cifar100):
    data = load_data("cifar100", cifar100["root"])
    assert data.train.images.shape == (200, 3, 32, 32) and data.eval.images.shape == (100, 3, 32, 32)
    assert data.train.labels.tolist() == cifar100["train_labels"]
    assert data.info.num_classes == 100


def test_cifar_corrupted_batch_is_a_one_line_error(cifar10, monkeypatch):
    path = cifar10["folder"] / "data_batch_3"
    raw = bytearray(path.read_bytes())
    raw[100:110] = bytes(b ^ 0xFF for b in raw[100:110])
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as error:
        load_data("cifar10", cifar10["root"])
    _assert_one_line_naming(error, str(cifar10["root"]))
    assert f"{path} fails its md5" in str(error.value) and "--download" in str(error.value)
    # A missing batch is named as missing; a download that does not check out says to delete and retry.
    path.unlink()
    with pytest.raises(DataError) as error:
        load_data("cifar10", cifar10["root"])
    assert f"{path} is missing" in str(error.value), error.value
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: None)  # as if fetched, still bad
    with pytest.raises(DataError) as error:
        load_data("cifar10", cifar10["root"], download=True)
    assert "the download did not check out: delete" in str(error.value) and "retry --download" in str(error.value)


def test_cifar_unreadable_batch_with_matching_md5(cifar10, monkeypatch):
    # A file whose md5 passes (e.g. a wrong file recorded as right) but is not a pickle.
    path = cifar10["folder"] / "data_batch_3"
    path.write_bytes(b"this is not a pickle at all")
    cls = torchvision.datasets.CIFAR10
    listed = [[n, _md5(path) if n == "data_batch_3" else m] for n, m in cls.train_list]
    monkeypatch.setattr(cls, "train_list", listed)
    with pytest.raises(DataError) as error:
        load_data("cifar10", cifar10["root"])
    _assert_one_line_naming(error, str(cifar10["folder"]))


def test_cifar_missing_directory(tmp_path):
    with pytest.raises(DataError) as error:
        load_data("cifar10", tmp_path / "nowhere")
    _assert_one_line_naming(error, str(tmp_path / "nowhere"))
    assert "cifar-10-batches-py" in str(error.value)


def test_holdout_is_fixed_stratified_and_disjoint(cifar10):
    torch.manual_seed(1)
    data = load_data("cifar10", cifar10["root"], holdout=True)
    torch.manual_seed(2)  # the split must not depend on the global RNG (or any run seed)
    again = load_data("cifar10", cifar10["root"], holdout=True)
    assert data.eval_split == "val"
    assert len(data.train) == 90 and len(data.eval) == 10
    assert torch.bincount(data.eval.labels, minlength=10).tolist() == [1] * 10
    assert torch.bincount(data.train.labels, minlength=10).tolist() == [9] * 10
    train_ids = set(data.train.images[:, 0, 0, 0].tolist())
    val_ids = set(data.eval.images[:, 0, 0, 0].tolist())
    assert not train_ids & val_ids and train_ids | val_ids == set(range(100))
    # Labels stay attached to their images.
    ids = data.eval.images[:, 0, 0, 0].long()
    assert data.eval.labels.tolist() == [cifar10["train_labels"][i] for i in ids.tolist()]
    assert torch.equal(data.eval.images, again.eval.images)
    assert torch.equal(data.train.labels, again.train.labels)
    # The mean comes from the 90 training images actually used.
    kept = cifar10["train"][sorted(train_ids)].reshape(90, 3, 32, 32).astype(np.float64)
    np.testing.assert_allclose(data.mean.numpy(), kept.mean(0) / 255, rtol=0, atol=1e-6)


# --- Fashion-MNIST -------------------------------------------------------------------------------

def _write_fashion_mnist(directory: Path, compressed: bool = True) -> dict:
    """Tiny raw IDX files (30 train, 10 test) in torchvision's file names."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    arrays = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (30, 28, 28), generator=gen, dtype=torch.uint8),
        "train-labels-idx1-ubyte": (torch.arange(30) % 10).to(torch.uint8),
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (10, 28, 28), generator=gen, dtype=torch.uint8),
        "t10k-labels-idx1-ubyte": torch.arange(10).flip(0).to(torch.uint8),
    }
    for stem, tensor in arrays.items():
        write_idx(directory / f"{stem}.gz", tensor)
        if not compressed:
            with gzip.open(directory / f"{stem}.gz") as src, open(directory / stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
            (directory / f"{stem}.gz").unlink()
    return arrays


@pytest.mark.parametrize("layout, compressed", [("", True), ("FashionMNIST/raw", False)])
def test_fashion_mnist_from_raw_idx(tmp_path, layout, compressed):
    arrays = _write_fashion_mnist(tmp_path / layout, compressed)
    data = load_data("fashion-mnist", tmp_path)
    assert data.train.images.shape == (30, 1, 28, 28) and data.eval.images.shape == (10, 1, 28, 28)
    assert torch.equal(data.train.images[:, 0], arrays["train-images-idx3-ubyte"])
    assert data.train.labels.dtype == torch.int64
    assert data.eval.labels.tolist() == list(range(9, -1, -1))
    assert torch.allclose(data.mean, data.train.images.double().mean(0).div(255).float())


def test_fashion_mnist_corrupt_gzip(tmp_path):
    _write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as error:
        load_data("fashion-mnist", tmp_path)
    _assert_one_line_naming(error, str(tmp_path))


def test_a_damaged_unpacked_idx_file_beside_its_gz_says_to_delete_it(tmp_path):
    """An unpacked file is read before its .gz: where it is damaged (an interrupted unpack) and the intact .gz
    is beside it, the error says to delete it; with it deleted, the .gz is read."""
    _write_fashion_mnist(tmp_path)
    packed = tmp_path / "t10k-images-idx3-ubyte.gz"
    unpacked = tmp_path / "t10k-images-idx3-ubyte"
    unpacked.write_bytes(gzip.decompress(packed.read_bytes())[:500])  # cut short
    with pytest.raises(DataError) as error:
        load_data("fashion-mnist", tmp_path)
    assert "\n" not in str(error.value) and str(error.value).startswith(f"{unpacked} is corrupt")
    assert str(error.value).endswith("delete it, and t10k-images-idx3-ubyte.gz beside it is read instead")
    unpacked.unlink()
    assert load_data("fashion-mnist", tmp_path).eval.images.shape == (10, 1, 28, 28)


def test_no_room_to_unpack_a_gz_names_the_temporary_folder_not_the_data(tmp_path, monkeypatch):
    """A full temporary folder is not a damaged data set (nor a broken install for the embedded subset)."""
    import errno

    import torchvision.datasets.utils

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torchvision.datasets.utils, "extract_archive", full)
    _write_fashion_mnist(tmp_path)
    for name, where in (("fashion-mnist", tmp_path), ("fashion-mnist-mini", None)):
        with pytest.raises(DataError) as error:
            load_data(name, where)
        message = str(error.value)
        assert message.startswith("cannot unpack ") and "into the temporary folder" in message, message
        assert message.endswith("free space there, or set TMPDIR to a folder with room") and "\n" not in message
        assert "corrupt" not in message and "reinstall" not in message


def test_download_stopped_by_torchvisions_old_processed_cache_says_so(tmp_path):
    """torchvision (before 0.9) cached Fashion-MNIST as processed/training.pt and test.pt; where they are,
    its FashionMNIST reads them and downloads nothing: the error names that folder, not missing raw files."""
    legacy = tmp_path / "FashionMNIST" / "processed"
    legacy.mkdir(parents=True)
    for name in ("training.pt", "test.pt"):
        torch.save((torch.zeros(2, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)), legacy / name)
    with pytest.raises(DataError) as error:
        load_data("fashion-mnist", tmp_path, download=True)
    assert f"torchvision found its old cache {legacy}/ and stopped there; delete that folder and retry" in str(
        error.value) and "\n" not in str(error.value), error.value


def test_fashion_mnist_wrong_header(tmp_path):
    _write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", torch.zeros(10, 28, dtype=torch.uint8))
    with pytest.raises(DataError) as error:
        load_data("fashion-mnist", tmp_path)
    assert "\n" not in str(error.value)
    assert f"{tmp_path / 't10k-images-idx3-ubyte.gz'} is corrupt" in str(error.value)  # the file, by name


def test_fashion_mnist_random_bytes(tmp_path):
    _write_fashion_mnist(tmp_path)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes(range(256)) * 8)
    with pytest.raises(DataError) as error:
        load_data("fashion-mnist", tmp_path)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"{tmp_path / 'train-images-idx3-ubyte.gz'} is corrupt: its header is not")


def test_fashion_mnist_type_byte_the_header_check_lets_through(tmp_path):
    """Type byte 10 passes torchvision's range assertion (8..14) but names no type: one line too."""
    _write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path) as f:
        raw = bytearray(f.read())
    raw[2] = 0x0A
    with gzip.open(path, "wb") as f:
        f.write(bytes(raw))
    with pytest.raises(DataError) as error:
        load_data("fashion-mnist", tmp_path)
    assert "\n" not in str(error.value) and str(error.value).startswith(f"{path} is corrupt")


def test_fashion_mnist_images_and_labels_that_do_not_match(tmp_path):
    _write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", torch.zeros(29, dtype=torch.uint8))
    with pytest.raises(DataError) as error:
        load_data("fashion-mnist", tmp_path)
    _assert_one_line_naming(error, str(tmp_path))
    assert "30 images but 29 labels" in str(error.value)


def test_fashion_mnist_labels_out_of_range(tmp_path):
    _write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", torch.full((30,), 10, dtype=torch.uint8))
    with pytest.raises(DataError) as error:
        load_data("fashion-mnist", tmp_path)
    _assert_one_line_naming(error, str(tmp_path))


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(DataError) as error:
        load_data("fashion-mnist", tmp_path)
    _assert_one_line_naming(error, str(tmp_path))
    assert "apt-get install dataset-fashion-mnist" in str(error.value)


def test_idx_writer_is_deterministic(tmp_path):
    tensor = torch.arange(2 * 28 * 28).remainder(256).to(torch.uint8).view(2, 28, 28)
    write_idx(tmp_path / "a.gz", tensor)
    write_idx(tmp_path / "b.gz", tensor)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_fashion_mnist_mini_is_embedded_and_balanced():
    data = load_data("fashion-mnist-mini", "/nonexistent/is/ignored")
    assert data.train.images.shape == (10000, 1, 28, 28) and data.eval.images.shape == (2000, 1, 28, 28)
    assert torch.bincount(data.train.labels).tolist() == [1000] * 10
    assert torch.bincount(data.eval.labels).tolist() == [200] * 10
    held = load_data("fashion-mnist-mini", holdout=True)
    assert (len(held.train), len(held.eval)) == (9000, 1000)
    assert (MINI_DIR / "LICENSE").read_text().count("Zalando SE") == 1


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="full Fashion-MNIST not installed")
@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_mnist_mini_is_a_real_subset(split):
    full, mini = read_idx_split(DEBIAN_FASHION_MNIST, split), read_idx_split(MINI_DIR, split)
    label_of = {}
    for image, label in zip(full.images.reshape(len(full), -1).numpy(), full.labels.tolist()):
        label_of.setdefault(image.tobytes(), set()).add(label)
    rows = mini.images.reshape(len(mini), -1).numpy()
    assert all(label in label_of.get(row.tobytes(), ()) for row, label in zip(rows, mini.labels.tolist()))
    assert len({row.tobytes() for row in rows}) > 0.99 * len(mini)  # not one image repeated


# --- normalisation and augmentation --------------------------------------------------------------

def test_normalize():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1)
    mean = torch.full((1, 1, 1), 0.2)
    out = normalize(images, mean)
    assert out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([-0.2, 0.0, 0.8]))
    assert images.tolist() == [[[[0]]], [[[51]]], [[[255]]]]  # input untouched


def _all_crops(image: torch.Tensor, pad: int = 4) -> tuple[torch.Tensor, list[tuple[int, int, bool]]]:
    """Every crop/flip the paper allows, built by slicing: an independent reference."""
    padded = F.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[-2:]
    crops, params = [], []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            for flip in (False, True):
                crops.append(crop.flip(-1) if flip else crop)
                params.append((dy - pad, dx - pad, flip))
    return torch.stack(crops), params


def test_augment_is_a_shift_with_zero_fill_and_optional_mirror():
    # Distinct non-zero values: any channel mix-up, wrong fill or non-rigid move shows up.
    image = torch.arange(1, 3 * 32 * 32 + 1, dtype=torch.float32).view(3, 32, 32)
    batch = image.expand(512, -1, -1, -1)
    out = augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    crops, params = _all_crops(image)
    matches = (out[:, None] == crops[None]).flatten(2).all(-1)        # (512, 162)
    assert (matches.sum(1) == 1).all(), "some output is not a padded shift/mirror of its input"
    drawn = [params[i] for i in matches.int().argmax(1).tolist()]
    assert {dy for dy, _, _ in drawn} == set(range(-4, 5))
    assert {dx for _, dx, _ in drawn} == set(range(-4, 5))
    flips = sum(flip for _, _, flip in drawn)
    assert 200 < flips < 312  # p = 0.5 over 512 draws
    assert len(set(drawn)) > 100  # images in one batch get their own transforms


def test_augment_is_reproducible_from_the_generator():
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    a = augment(images, torch.Generator().manual_seed(7))
    b = augment(images, torch.Generator().manual_seed(7))
    c = augment(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert augment(images[:, :1, :28, :28], torch.Generator().manual_seed(7)).shape == (16, 1, 28, 28)


# --- batches -------------------------------------------------------------------------------------

def _id_split(n: int) -> Split:
    ids = torch.arange(n)
    return Split(ids.to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(), ids)


def test_a_cifar_feed_covers_the_epoch_once():
    """An epoch of `CifarFeed` batches: every image once, in a shuffled order drawn from the run's
    generator (the same for the same state), the last batch partial, a new order each epoch."""
    from study.config import RunConfig
    from study.train.distributed import SINGLE
    from study.train.feeds import CifarFeed

    split = _id_split(103)
    data = Data(load_data("fashion-mnist-mini").info, split, split, "test", torch.zeros(1, 2, 2))
    feed = CifarFeed(RunConfig(arch="plain", depth=8, batch_size=10), data, torch.device("cpu"), SINGLE)

    def epoch(gen: torch.Generator) -> list[torch.Tensor]:
        feed.start_epoch(0, gen, None)
        return [y for _, y, _ in iter(lambda: feed.next_batch(gen), None)]

    batches = epoch(torch.Generator().manual_seed(0))
    assert [len(labels) for labels in batches] == [10] * 10 + [3]
    labels = torch.cat(batches)
    assert sorted(labels.tolist()) == list(range(103))
    assert labels.tolist() != list(range(103))  # shuffled

    def order(gen: torch.Generator) -> list[int]:
        return torch.cat(epoch(gen)).tolist()

    assert order(torch.Generator().manual_seed(5)) == order(torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    assert order(gen) != order(gen)  # the next epoch is a new permutation


def test_eval_batches_in_order():
    split = _id_split(25)
    batches = list(eval_batches(split, 10))
    assert [len(labels) for _, labels in batches] == [10, 10, 5]
    assert torch.cat([labels for _, labels in batches]).tolist() == list(range(25))
    assert torch.equal(torch.cat([images for images, _ in batches]), split.images)


def test_data_to_device_keeps_everything():
    data = load_data("fashion-mnist-mini")
    moved = data.to("cpu")
    assert moved.eval_split == data.eval_split and moved.info == data.info
    assert torch.equal(moved.train.images, data.train.images)
    assert torch.equal(moved.mean, data.mean)


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10"])
def test_a_failed_download_is_one_line_and_leaves_no_folder_it_made(tmp_path, monkeypatch, name):
    """--download with the network down (torchvision's own downloader, its URL lookup failing): one line
    naming the fix, and no folder left that the attempt made: not the data dir nor its parent, nor
    the FashionMNIST/raw folder torchvision makes before it fetches."""
    import urllib.error

    import torchvision.datasets.utils

    def offline(url, max_hops=3):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(torchvision.datasets.utils, "_get_redirect_url", offline)
    data_dir = tmp_path / "new" / "data"
    with pytest.raises(DataError) as error:
        load_data(name, data_dir, download=True)
    _assert_one_line_naming(error, str(data_dir))
    assert "retry" in str(error.value) and "network unreachable" in str(error.value)
    assert list(tmp_path.iterdir()) == []
    # A data dir that was there (with something in it) stays, as it was.
    data_dir.mkdir(parents=True)
    (data_dir / "kept.txt").write_text("mine")
    with pytest.raises(DataError):
        load_data(name, data_dir, download=True)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["new", "new/data", "new/data/kept.txt"]
