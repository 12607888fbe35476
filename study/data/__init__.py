"""Data: the paper's data sets as device-resident tensors, and its batched augmentation."""

from .augment import augment, eval_batches, normalize
from .sources import (
    DATASETS,
    DEFAULT_DATASET,
    Data,
    DataError,
    DatasetInfo,
    Split,
    dataset_info,
    load_data,
)

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "Data",
    "DataError",
    "DatasetInfo",
    "Split",
    "augment",
    "dataset_info",
    "eval_batches",
    "load_data",
    "normalize",
]
