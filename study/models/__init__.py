"""Model builders and the architecture table (`study models`)."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ..config import CIFAR_DEPTHS, IMAGENET_DATASETS, IMAGENET_DEPTHS, SHORTCUTS, blocks_per_stage
from .cifar import BasicBlock, CifarNet, PreActBlock, PreActCifarNet, cifar_net
from .imagenet import ImageNetNet, from_torchvision, imagenet_net

__all__ = [
    "SHORTCUTS",
    "BasicBlock",
    "CifarNet",
    "PreActBlock",
    "PreActCifarNet",
    "model_for",
    "blocks_per_stage",
    "build_model",
    "count_params",
    "net_params",
    "memory_format",
    "count_macs",
    "architecture_table",
    "CIFAR_DEPTHS",
    "IMAGENET_DATASETS",
    "IMAGENET_DEPTHS",
    "ImageNetNet",
    "imagenet_net",
    "from_torchvision",
]


def build_model(
    arch: str,
    depth: int,
    *,
    shortcut: str = "A",
    num_classes: int | None = None,
    in_channels: int = 3,
    dataset: str = "cifar10",
    init: str = "he",
) -> nn.Module:
    """Build a network by its paper name: `arch` is `plain` or `resnet` (or, beyond the paper,
    `preact`: the pre-activation ResNet; with `init`, a follow-up's initialisation: `cifar_net`).

    The data set picks the family: ImageNet-sized data (`IMAGENET_DATASETS`) gets the Table-1 nets
    (depth 18 or 34, 1000 classes by default), any other data set the 6n+2 CIFAR nets (10 classes
    by default).
    """
    imagenet = dataset in IMAGENET_DATASETS
    if num_classes is None:
        num_classes = 1000 if imagenet else 10
    if imagenet:
        if init != "he":
            raise ValueError(f"init {init!r} is for the CIFAR-style nets")
        return imagenet_net(arch, depth, shortcut=shortcut, num_classes=num_classes, in_channels=in_channels)
    return cifar_net(arch, depth, shortcut=shortcut, num_classes=num_classes, in_channels=in_channels, init=init)


def model_for(cfg, num_classes: int | None = None, in_channels: int = 3) -> nn.Module:
    """The network a run config (`study.config.RunConfig`) trains, freshly initialised from the global RNG."""
    return build_model(cfg.arch, cfg.depth, shortcut=cfg.shortcut, num_classes=num_classes, in_channels=in_channels,
                       dataset=cfg.dataset, init=cfg.init)


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout a network's weights and inputs take on `device`: channels-last on CUDA, where it
    lets cuDNN pick its fastest (tensor-core) kernels; on a CPU it buys nothing in fp32."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def count_params(model: nn.Module) -> int:
    """Number of parameters, BN affine parameters included (the paper's counts include them)."""
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def net_params(
    arch: str, depth: int, shortcut: str = "A", *, dataset: str = "cifar10", num_classes: int | None = None,
    in_channels: int = 3,
) -> int:
    """`count_params` of the net `build_model` makes of these, as `study models` counts it (Table 6 shows it
    per net), remembered: a table names a net again and again. As `architecture_table` builds them: an
    ImageNet net on the meta device (shapes, no storage, no initial values drawn), a CIFAR-style one on the
    CPU with one thread (the table builds it there for its MACs; its count is the same on either)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the initialisation draws from torch's global generator: leave it as the caller had it
        with torch.random.fork_rng(devices=[]), (
                torch.device("meta") if dataset in IMAGENET_DATASETS else contextlib.nullcontext()):
            model = build_model(arch, depth, shortcut=shortcut, num_classes=num_classes, in_channels=in_channels,
                                dataset=dataset)
    finally:
        torch.set_num_threads(threads)
    return count_params(model)


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward multiply-accumulates for one input of `input_shape` (C, H, W), counting convolutions
    and fully connected layers as the paper does (BN, ReLU, pooling and additions are not counted).

    Measured by forward hooks during one eval-mode forward pass of a single zero image.
    """
    macs = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return macs


#: The CIFAR-style depths `study models` lists: the paper's, and the 8 layers of the CPU studies (quick, laptop).
TABLE_DEPTHS = (8, *CIFAR_DEPTHS)


def architecture_table(
    depths: tuple[int, ...] = TABLE_DEPTHS, imagenet_depths: tuple[int, ...] = IMAGENET_DEPTHS
) -> list[dict]:
    """One row per architecture: plain, and residual with each shortcut option, for the CIFAR-10
    nets (MACs per 32x32 image) and the ImageNet nets (MACs per 224x224 image); beyond the paper,
    the pre-activation ResNet (`preact`, option A) of each CIFAR depth. (The follow-ups'
    initialisations change no count.)"""
    # Thousands of tiny ops: one thread does them in seconds, where torch's threads on cores busy with
    # training spin-wait for one another for minutes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the initialisations draw from torch's global generator: leave it as the caller had it
        with torch.random.fork_rng(devices=[]):
            return _architecture_rows(depths, imagenet_depths)
    finally:
        torch.set_num_threads(threads)


def _architecture_rows(depths: tuple[int, ...], imagenet_depths: tuple[int, ...]) -> list[dict]:
    families = [("cifar10", d, (3, 32, 32)) for d in depths]
    families += [("imagenet", d, (3, 224, 224)) for d in imagenet_depths]
    rows = []
    for dataset, depth, input_shape in families:
        # The ImageNet nets are counted on the meta device, where a net has shapes but no storage
        # and a forward pass does no arithmetic. Each op there costs milliseconds of Python, which
        # the CIFAR nets' thousands of small layers would add up to half a minute: one 32x32 image
        # through them on the CPU is faster (ResNet-1202: about 1 s with its initialisation).
        # (No `torch.device("cpu")` context for those: its hook on every tensor op costs seconds.)
        archs = (("plain", "A"), *(("resnet", s) for s in SHORTCUTS))
        if dataset != "imagenet":  # beyond the paper: the pre-activation ResNet (CIFAR-style nets only)
            archs += (("preact", "A"),)
        for arch, shortcut in archs:
            with torch.device("meta") if dataset == "imagenet" else contextlib.nullcontext():
                model = build_model(arch, depth, shortcut=shortcut, dataset=dataset)
            rows.append(
                {
                    "arch": arch,
                    "depth": depth,
                    # A plain net has no shortcuts; it is listed under "A" because its parameters
                    # and MACs equal the option-A residual twin's (run ids use the same convention).
                    "shortcut": shortcut,
                    "dataset": dataset,
                    "params": count_params(model),
                    "macs": count_macs(model, input_shape),
                }
            )
    return rows
