"""Shared fixtures."""

import pytest

from study.data import Data, Split, load_data


def make_small_data(n_train: int = 320, n_test: int = 200) -> Data:
    """A slice of the embedded real data (every class present): a few steps per epoch at batch 64."""
    full = load_data("fashion-mnist-mini")
    train = Split(full.train.images[:n_train].clone(), full.train.labels[:n_train].clone())
    test = Split(full.eval.images[:n_test].clone(), full.eval.labels[:n_test].clone())
    return Data(info=full.info, train=train, eval=test, eval_split="test", mean=train.images.float().div(255).mean(0))


@pytest.fixture(scope="session")
def small_data() -> Data:
    return make_small_data()
