"""A finished run's trained network, ready to use: `study.load_model`.

    net = study.load_model("fashion-mnist-mini-resnet20-A-s0-it300", runs_dir="runs")
    logits = net.model(net.preprocess(images_uint8))   # (B, C, H, W) uint8, as the data set stores them

The network is built from the run's `config.json`, given its checkpoint's weights and put in eval
mode (BN uses its running averages, as the run's own evaluation did). `preprocess` is the
normalisation the run trained with: [0, 1] scaling minus the training set's per-pixel mean image
(CIFAR-style data sets; the mean is recomputed from the same training split, so the data set must be
where `study run` found it) or ImageNet's mean (per channel, or the per-pixel mean image from the runs
dir's cache). For ImageNet, `preprocess` takes the 224x224 uint8 crops the evaluation loaders make.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .config import ConfigError, RunConfig
from .runstore import Run, damaged_config, no_checkpoint, read_config


class TrainedModel(NamedTuple):
    """A run's network in eval mode, the normalisation it trained with, its config, and the
    iteration its weights are from."""

    model: nn.Module
    preprocess: Callable[[torch.Tensor], torch.Tensor]
    config: RunConfig
    iteration: int

    def autocast(self) -> torch.autocast:
        """The precision the run evaluated in, as a context for the forward pass: bf16 autocast for a
        `--precision bf16` run, off (fp32) for any other, on the model's device. Under it a bf16 run trained
        on the CPU's eager NCHW path gives the test loss and error it logged; one trained channels-last or
        compiled rounds differently from the NCHW net `load_model` builds."""
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.config.bf16)


def _run_of(run: str | os.PathLike, runs_dir: str | os.PathLike) -> Run:
    """The run named by a run directory or a run id under `runs_dir`."""
    candidates = [Path(run), Path(runs_dir) / str(run)]
    for path in candidates:
        config = path / "config.json"
        if config.is_file():
            record, why = read_config(config)
            if record is None:  # the line the commands give for a run asked for whose config.json is damaged
                raise ConfigError(damaged_config(config, str(why)))
            try:
                cfg = RunConfig.from_dict(record["config"])
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{config} is not a study run's config ({type(e).__name__}); "
                                  "pass a run directory that `study run` wrote") from None
            return Run(path.parent, cfg)
    raise ConfigError(f"no run {str(run)!r} in {runs_dir} (no config.json there); `study status --runs-dir "
                      f"{runs_dir}` lists the runs")


def load_model(run: str | os.PathLike, runs_dir: str | os.PathLike = "runs", *, checkpoint: str | os.PathLike | None = None,
               data_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> TrainedModel:
    """Run `run` (a run id under `runs_dir`, or a run directory) as a trained network.

    The weights are the run's final checkpoint; the run must be `done` (an unfinished or diverged run
    is an error naming its status). `checkpoint` names another checkpoint file to load instead (a
    path, or a file name in the run's directory such as `checkpoint.prev.pt`); it may be from any
    point of training. `data_dir` is where the data set is (as for `study run`), needed to recompute
    a CIFAR-style training set's mean, or ImageNet's per-pixel mean if the runs dir has no cache."""
    from .models import model_for

    r = _run_of(run, runs_dir)
    cfg = r.cfg
    if checkpoint is None:
        status = r.status().get("status")
        if status != "done":
            raise ConfigError(f"{cfg.run_id} is {status}, not done: finish it with `study run` (the same command "
                              "resumes it), or pass checkpoint= to load a checkpoint from mid-training")
        path = r.checkpoint_path
    else:
        path = Path(checkpoint) if Path(checkpoint).is_file() else r.dir / checkpoint
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights, iteration = state["model"], int(state["iteration"])
    except FileNotFoundError:
        if checkpoint is None:  # a finished run without its weights: a published copy, or deleted
            raise ConfigError(no_checkpoint(r, "load it", "runs_dir=")) from None
        raise ConfigError(f"{cfg.run_id} has no checkpoint at {path}; `study run` writes one at every epoch's end "
                          "(was it deleted?)") from None
    except Exception as e:  # unreadable: torch raises several types
        raise ConfigError(f"{path} is not a readable study checkpoint ({type(e).__name__})") from None
    classes, in_channels, preprocess = _normalisation(r, data_dir, torch.device(device))
    model = model_for(cfg, classes, in_channels)
    model.load_state_dict(weights)
    return TrainedModel(model.to(device).eval(), preprocess, cfg, iteration)


def _normalisation(run: Run, data_dir: str | os.PathLike | None, device: torch.device
                   ) -> tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]:
    """(classes, input channels, preprocess) of the run's training data."""
    cfg = run.cfg
    if cfg.imagenet:
        from .data import imagenet

        from .evaluate import recorded_root

        data = imagenet.open_imagenet(data_dir or recorded_root(run) or os.path.join("data", "imagenet"))
        # The mean it trained with: its recorded folder's, cached in the runs dir, whichever copy data_dir names.
        own = recorded_root(run) if cfg.mean == "pixel" else None
        mean = imagenet.cached_pixel_mean(own, run.dir.parent) if own is not None else None
        if mean is None:
            mean = data.mean_for(cfg.mean, run.dir.parent)
        return data.num_classes, 3, lambda images: imagenet.normalize(images.to(device), mean=mean)
    from .data import load_data, normalize

    data = load_data(cfg.dataset, data_dir, holdout=cfg.holdout)
    mean = data.mean.to(device)
    return data.info.num_classes, data.info.in_channels, lambda images: normalize(images.to(device), mean)
