"""Shared fixtures."""

import dataclasses

import pytest
import torch

import study.train
from study.data import Data, Split, load_data


def make_small_data(n_train: int = 320, n_test: int = 200) -> Data:
    """A slice of the embedded real data (every class present): a few steps per epoch at batch 64."""
    full = load_data("fashion-mnist-mini")
    train = Split(full.train.images[:n_train].clone(), full.train.labels[:n_train].clone())
    test = Split(full.eval.images[:n_test].clone(), full.eval.labels[:n_test].clone())
    return Data(info=full.info, train=train, eval=test, eval_split="test", mean=train.images.float().div(255).mean(0))


@pytest.fixture(scope="session", autouse=True)
def precision_notes_said():
    """The once-per-process note on this CPU's bf16 units (`cpupath.precision_note`), said before any test:
    otherwise the first fp32 run of the session on a CPU with bf16 units (bf16 run, on one without) adds
    it to its output, and a test's one-line output would hold on some machines and test orders only.
    tests/test_cpupath.py tests the note itself, with the record of notes said emptied."""
    from study.config import RunConfig
    from study.train import cpupath

    for precision in ("fp32", "bf16"):
        cpupath.precision_note(RunConfig("plain", 20, iterations=1, precision=precision), lambda line: None)


@pytest.fixture(scope="session")
def small_data() -> Data:
    return make_small_data()


@pytest.fixture
def float64(monkeypatch):
    """float64 as the default dtype (models built in the test compute in float64), and the step
    schedule's learning rates (`study.train.schedule.lr_at`) rounded to float32. `--cuda-graph` and `--fuse`
    hold the rate in a float32 tensor (the CUDA fused SGD kernel reads a float), so a float64 run at
    the Python double 0.1 would differ from one at 0.1f by 1.5e-8 relative in every update, which
    training amplifies past any tight bound. (float32 runs update at a float32 rate either way.)
    The plateau schedule's rates are not rounded: no float64 test uses it."""
    real = study.train.schedule.lr_at
    monkeypatch.setattr(study.train.schedule, "lr_at", lambda *args: float(torch.tensor(real(*args), dtype=torch.float32)))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture
def deterministic_cudnn(monkeypatch):
    """cuDNN restricted to deterministic algorithms (no atomics), for GPU comparisons."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)


@pytest.fixture
def small_data64(small_data) -> Data:
    """Half of `small_data` (160 training images: at batch 24, 6 full batches and a partial one of
    16 per epoch; 100 test images), with a float64 mean so that the runs compute in float64."""
    data = small_data
    train = dataclasses.replace(data.train, images=data.train.images[:160], labels=data.train.labels[:160])
    test = dataclasses.replace(data.eval, images=data.eval.images[:100], labels=data.eval.labels[:100])
    return dataclasses.replace(data, train=train, eval=test, mean=train.images.double().div(255).mean(0))


# A one-node SLURM (munged, slurmctld, slurmd) for tests/test_slurm_real.py; skips without SLURM or root.
from slurm_cluster import slurm_cluster  # noqa: E402,F401
