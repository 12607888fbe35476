"""Looking inside a network without changing it: layer responses (Figure 7) and gradient norms.

`layer_responses` registers forward hooks on the BN that follows each 3x3 convolution and measures the
standard deviation of its output: after BN, before the ReLU or the residual addition, which is what
the paper's Figure 7 plots. `GradientNorms` records every conv/linear weight's gradient norm during
training, for the paper's argument (section 4.1) that plain nets do not suffer from vanishing
gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .data import Data, Split, eval_batches, normalize
from .runstore import Run, atomic_write

SPLITS = ("test", "val", "train")
BN_MODES = ("eval", "train")
REDUCTIONS = ("tensor", "channel")
RESPONSE_BATCH_SIZE = 500
GRADIENT_EVERY = 100


def conv3x3_bns(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, module) of each BN that follows a 3x3 convolution, in module (= forward) order.

    A module's `convK` is followed by its `bnK` (the naming of `study.models.cifar` and of
    torchvision's ResNets). Projection shortcuts (1x1 conv + BN in a Sequential) and 7x7 stems do
    not qualify: they are not 3x3 layers.
    """
    from .models.cifar import PreActBlock

    found = []
    for prefix, module in model.named_modules():
        if isinstance(module, PreActBlock):
            continue  # its BNs precede its convs: no 3x3 layer there has a BN response of its own
        for name, child in module.named_children():
            if not (name.startswith("bn") and isinstance(child, nn.BatchNorm2d)):
                continue
            conv = getattr(module, "conv" + name[2:], None)
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                found.append((f"{prefix}.{name}" if prefix else name, child))
    return found


class _Moments:
    """Running float64 sums of x and x^2 (per channel or over everything) of one layer's output.

    The sums stay on the device, so a batch costs no host sync; float64 keeps sum-of-squares
    cancellation far below the precision of a float32 activation for any realistic data set.
    """

    def __init__(self, per_channel: bool) -> None:
        self.per_channel = per_channel
        self.count = 0
        self.sum: torch.Tensor | float = 0.0
        self.sumsq: torch.Tensor | float = 0.0

    def add(self, out: torch.Tensor) -> None:
        x = out.detach().double()
        dims = (0, 2, 3) if self.per_channel else tuple(range(x.dim()))
        self.count += x.numel() // (x.shape[1] if self.per_channel else 1)
        self.sum = self.sum + x.sum(dims)
        self.sumsq = self.sumsq + (x * x).sum(dims)

    def std(self) -> float:
        """Sample std (n - 1, as `torch.std`), averaged over channels for the per-channel kind."""
        n = self.count
        var = (self.sumsq - self.sum * self.sum / n) / (n - 1)
        return float(var.clamp_min(0).sqrt().mean())


@contextmanager
def response_hooks(
    model: nn.Module, *, reduction: str = "tensor", include_first: bool = False
) -> Iterator[dict[str, _Moments]]:
    """Hook every 3x3-conv BN of `model` while the block runs; yields {layer name: moments} that
    fill as the model runs forward. The hooks return nothing, so outputs are untouched, and they
    are removed on leaving the block, also on an exception."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    layers = conv3x3_bns(model)
    if not include_first:
        # The net's first conv (the CIFAR nets' 3x3 stem; an ImageNet 7x7 stem is not hooked anyway).
        first = next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
        head, _, last = first.rpartition(".")
        stem_bn = (f"{head}." if head else "") + "bn" + last.removeprefix("conv")
        layers = [(name, bn) for name, bn in layers if name != stem_bn]
    moments = {name: _Moments(per_channel=reduction == "channel") for name, _ in layers}
    handles = []
    try:
        for name, bn in layers:
            handles.append(bn.register_forward_hook(lambda _m, _i, out, acc=moments[name]: acc.add(out)))
        yield moments
    finally:
        for h in handles:
            h.remove()


def _pick_split(data: Data, split: str, max_images: int | None) -> Split:
    if split == "train":
        chosen = data.train
    elif split == data.eval_split:
        chosen = data.eval
    else:
        raise ValueError(f"split {split!r} is not in this data (it has train and {data.eval_split})")
    if max_images is None:
        return chosen
    return Split(chosen.images[:max_images], chosen.labels[:max_images])


def layer_responses(
    model: nn.Module,
    data: Data,
    *,
    split: str = "test",
    bn_mode: str = "eval",
    reduction: str = "tensor",
    include_first: bool = False,
    max_images: int | None = None,
    batch_size: int = RESPONSE_BATCH_SIZE,
) -> pd.DataFrame:
    """Standard deviation of each 3x3 layer's response (BN output, before ReLU or addition) over
    the images of `split` (`test`/`val`: the evaluation split, `train`: training images without
    augmentation), mean-subtracted as in training.

    `bn_mode` `eval` uses BN's running statistics; `train` normalises with each batch's statistics.
    `reduction` `tensor` is the std over the whole response tensor of all images; `channel` the std
    of each channel over images and positions, averaged over channels. `include_first` adds the
    first conv. Returns columns `layer_index` (position among the net's 3x3 layers, first conv = 1),
    `layer_name`, `std`, and `bn_scale_rms`: the root mean square of that BN's learned scales γ (its
    `weight`; they start at 1), which a response's std follows in eval mode (NaN for a BN without
    them). The model is left as it was: parameters, BN buffers, train/eval flags.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}; choose one of {', '.join(BN_MODES)}")
    images = _pick_split(data, split, max_images)
    device = next(model.parameters()).device
    mean = data.mean.to(device)
    layers = conv3x3_bns(model)
    index = {name: i for i, (name, _) in enumerate(layers, start=1)}
    scale = {name: bn.weight.detach().double().square().mean().sqrt().item() if bn.weight is not None else float("nan")
             for name, bn in layers}
    # BN in train mode would update its running statistics; they are put back afterwards.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    model.train(bn_mode == "train")
    try:
        with torch.no_grad(), response_hooks(model, reduction=reduction, include_first=include_first) as moments:
            for x, _ in eval_batches(images, batch_size):
                model(normalize(x.to(device), mean))
            rows = [{"layer_index": index[name], "layer_name": name, "std": m.std(), "bn_scale_rms": scale[name]}
                    for name, m in moments.items()]
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for m, training in modes.items():
            m.training = training
    return pd.DataFrame(rows, columns=["layer_index", "layer_name", "std", "bn_scale_rms"])


#: `layer_responses`' options that `record_responses` records, with their defaults.
PROBE_DEFAULTS = {"split": "test", "bn_mode": "eval", "reduction": "tensor", "include_first": False, "max_images": None}


def record_responses(run: Run, model: nn.Module, data: Data, *, iteration: int | None = None,
                     **options: object) -> Path:
    """Measure `layer_responses(model, data, **options)` and write them atomically to
    `run.dir / "responses.parquet"` with columns `run_id, layer_index, layer_name, std, bn_scale_rms`, one
    column per option used (`split, bn_mode, reduction, include_first, max_images`), so a figure
    can state how they were measured, and `probed_iteration`, the training iteration of the
    weights measured (`iteration`). Returns the path."""
    df = layer_responses(model, data, **options)
    used = {**PROBE_DEFAULTS, **{k: v for k, v in options.items() if k in PROBE_DEFAULTS}}
    df = df.assign(run_id=run.cfg.run_id, **used, probed_iteration=iteration)[
        ["run_id", "layer_index", "layer_name", "std", "bn_scale_rms", *used, "probed_iteration"]]
    df["max_images"] = df["max_images"].astype("Int64")  # <NA>: all images of the split
    df["probed_iteration"] = df["probed_iteration"].astype("Int64")
    path = run.dir / "responses.parquet"
    atomic_write(path, lambda p: df.to_parquet(p, index=False))
    return path


def recorded_with(run: Run, iteration: int, **options: object) -> bool:
    """Whether `run`'s responses.parquet already holds what `record_responses` would write for the weights
    of `iteration` with `options` (those left out at PROBE_DEFAULTS'), its BN scales included: `study
    probe` then need not measure the run again. False for a missing or unreadable file."""
    import pandas as pd

    try:
        df = pd.read_parquet(run.dir / "responses.parquet")
    except Exception:  # missing, truncated, not Parquet: measured again (and the file replaced)
        return False
    wanted = {**PROBE_DEFAULTS, **{k: v for k, v in options.items() if k in PROBE_DEFAULTS}, "probed_iteration": iteration}
    if df.empty or any(c not in df for c in (*wanted, "run_id", "std", "bn_scale_rms")) or df["bn_scale_rms"].isna().any():
        return False
    if not (df["run_id"] == run.cfg.run_id).all():  # another run's file (a copied folder): not this run's
        return False
    for column, value in wanted.items():
        values = df[column]
        if not (values.isna().all() if value is None else (values.notna() & (values == value)).all()):
            return False
    return True


class GradientNorms:
    """Per-layer L2 norms of the gradients of every conv and linear weight, every `every` iterations.

    Call `maybe_record(iteration)` right after `loss.backward()` with the 1-based iteration number.
    A recording is one fused `torch._foreach_norm` over the gradients, kept on the device: no host
    sync until `rows()` converts the whole buffer at once (e.g. at the end of an epoch).
    """

    def __init__(self, model: nn.Module, every: int = GRADIENT_EVERY) -> None:
        if every <= 0:
            raise ValueError(f"every must be a positive number of iterations; got {every}")
        self.every = every
        self.params = [
            (f"{name}.weight" if name else "weight", module.weight)
            for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))
        ]
        self._iterations: list[int] = []
        self._norms: list[torch.Tensor] = []

    def due(self, iteration: int) -> bool:
        """Whether `iteration`'s gradient norms are recorded (a multiple of `every`)."""
        return iteration % self.every == 0

    def maybe_record(self, iteration: int) -> None:
        """Record the current gradients' norms if `iteration` is a multiple of `every`."""
        if not self.due(iteration):
            return
        # A weight without a gradient (unused in this forward) is recorded as NaN, not as 0.
        grads = [p.grad if p.grad is not None else p.new_full((1,), float("nan")) for _, p in self.params]
        self.record(iteration, torch.stack(torch._foreach_norm(grads)))

    def record(self, iteration: int, norms: torch.Tensor) -> None:
        """Keep `norms` (one per weight of `params`, computed elsewhere: a replayed CUDA graph's
        output) if `iteration` is a multiple of `every`. A copy is kept: the caller may overwrite
        `norms` at the next step."""
        if not self.due(iteration):
            return
        self._norms.append(norms.clone())
        self._iterations.append(iteration)

    def rows(self, run_id: str) -> list[dict]:
        """The buffered recordings as rows `run_id, iteration, layer_index, layer_name, grad_norm`
        (layer_index 1-based in module order), and an empty buffer."""
        if not self._norms:
            return []
        norms = torch.stack(self._norms).double().cpu().tolist()  # the one host sync
        rows = [
            {"run_id": run_id, "iteration": it, "layer_index": i, "layer_name": name, "grad_norm": norm}
            for it, layer_norms in zip(self._iterations, norms)
            for i, ((name, _), norm) in enumerate(zip(self.params, layer_norms), start=1)
        ]
        self._iterations, self._norms = [], []
        return rows


GRADIENT_COLUMNS = ["run_id", "iteration", "layer_index", "layer_name", "grad_norm"]


def _gradients_path(run: Run) -> Path:
    return run.dir / "gradients.parquet"


def _read_gradients(run: Run) -> pd.DataFrame:
    """The run's gradient rows so far. An unreadable file (damage from outside: writes are atomic)
    is moved aside to `gradients.parquet.bad` and recording starts afresh, rather than failing the
    run over a diagnostic."""
    path = _gradients_path(run)
    if not path.exists():
        return pd.DataFrame(columns=GRADIENT_COLUMNS)
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's errors are ValueErrors
        path.replace(path.with_name(path.name + ".bad"))
        warnings.warn(f"{path} is unreadable ({type(e).__name__}); moved it to {path.name}.bad and "
                      "started the gradient record afresh", stacklevel=2)
        return pd.DataFrame(columns=GRADIENT_COLUMNS)


def append_gradients(run: Run, rows: list[dict]) -> None:
    """Append rows to `run.dir / "gradients.parquet"` (rewritten atomically, like the metrics)."""
    if not rows:
        return
    new = pd.DataFrame(rows, columns=GRADIENT_COLUMNS)
    old = _read_gradients(run)
    df = new if old.empty else pd.concat([old, new], ignore_index=True)
    atomic_write(_gradients_path(run), lambda p: df.to_parquet(p, index=False))


def truncate_gradients(run: Run, last_iteration: int) -> None:
    """Drop rows recorded after `last_iteration` (past the checkpoint a resumed run restarts from),
    so that they are recorded again rather than twice."""
    df = _read_gradients(run)
    if not df.empty and (df["iteration"] > last_iteration).any():
        kept = df[df["iteration"] <= last_iteration].reset_index(drop=True)
        atomic_write(_gradients_path(run), lambda p: kept.to_parquet(p, index=False))
