"""Rebuild the embedded Fashion-MNIST subset from the full data set.

    python -m study.data.fashion_mnist_mini.build [--source DIR] [--out DIR]

Draws 1,000 training images per class from the official training set and 200 test images per
class from the official test set with a fixed seed, keeps them in their original order, and
writes them as gzipped IDX files named like the originals. The gzip header carries no file name
and mtime 0, so a rebuild from the same source gives byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import struct
import sys
from pathlib import Path

import torch

from study.data.sources import (
    FASHION_MNIST_FILES,
    MINI_DIR,
    DataError,
    _find_fashion_mnist,
    read_idx_split,
    stratified_pick,
)

SEED = 20151210  # the paper's arXiv date; any fixed value would do
PER_CLASS = {"train": 1000, "test": 200}
NUM_CLASSES = 10

_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only type Fashion-MNIST uses


def write_idx(path: str | os.PathLike, data: torch.Tensor) -> None:
    """Write a uint8 tensor as a gzipped IDX file, deterministically (no name, mtime 0)."""
    if data.dtype != torch.uint8:
        raise TypeError(f"IDX ubyte files hold uint8, got {data.dtype}")
    # torchvision reads IDX but does not write it; the header is two zero bytes, the type code,
    # the number of dimensions, then each dimension as a big-endian 32-bit integer.
    header = bytes([0, 0, _IDX_UBYTE, data.dim()]) + struct.pack(f">{data.dim()}I", *data.shape)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                compresslevel=9, mtime=0) as gz:
        gz.write(header)
        gz.write(data.contiguous().numpy().tobytes())


def build(source: Path, out: Path) -> list[Path]:
    """Write the subset of the raw Fashion-MNIST in ``source`` into ``out``; return the files."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, per_class in PER_CLASS.items():
        full = read_idx_split(source, split)
        keep = stratified_pick(full.labels, torch.full((NUM_CLASSES,), per_class), SEED)
        images_stem, labels_stem = FASHION_MNIST_FILES[split]
        for stem, tensor in ((images_stem, full.images[keep, 0]),
                             (labels_stem, full.labels[keep].to(torch.uint8))):
            path = out / f"{stem}.gz"
            write_idx(path, tensor)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints each file written with its size and sha256."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None,
                        help="directory with the full raw Fashion-MNIST (default: ./data/"
                             "FashionMNIST/raw, ./data, /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--out", type=Path, default=MINI_DIR,
                        help="where to write the subset (default: the package's own copy)")
    args = parser.parse_args(argv)
    try:
        source = _find_fashion_mnist(args.source, download=False)
        for path in build(source, args.out):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            print(f"{path}  {path.stat().st_size:>9,d} bytes  sha256 {digest}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
