"""Several runs trained as one grouped network (`study run --fuse K`).

The CIFAR nets are thin (16-64 channels): one run's step is hundreds of kernels too small to fill
a GPU. K runs of the same shape (the same depth, a plain net and its option-A residual twin, or
seeds) can instead be trained as one grouped network (`study.fast.grouped`), in which every
convolution is grouped (group k is run k's layer), every BN acts per channel, the shortcut pads
each group's channels, and the classifier is K classifiers side by side. One kernel then does a layer for all K
runs. Net k's input is run k's own batch: the K batches are stacked along the channels.

Each run stays its own run. `study.train.train_steps` still keeps each run's data order and
augmentation, schedule, warm-up, metrics, gradient norms, checkpoints and resume; only the step
itself (forward, loss, backward, gradient norms, SGD update) is done here, for all of a group's
runs at once. Run k's parameters, BN buffers and momentum buffers are views of the k-th slices of
the grouped ones, so its own model evaluates, checkpoints and resumes as usual.

What is the same as training alone: the arithmetic of each run, net by net (a grouped convolution
and a BN over K x C channels compute each group independently; a plain net fused with residual
ones gets a shortcut scaled by 0, which adds exactly 0); the loss is the sum of the runs' mean
losses, so each run's gradient is its own. What may differ: rounding, since the grouped kernels sum
in another order, and the update is torch's fused SGD (as with `--cuda-graph`). The CPU tests
bound the difference (tests/test_fused.py).

Runs are fused when their networks have the same parameters and buffers and their steps agree:
same data shape and batch size, learning rate, momentum, weight decay and precision. When a run
ends, or its batch size or learning rate parts from its group's (a warm-up that ends earlier, an
epoch's partial batch out of phase), the group is taken apart and the runs that agree are fused
anew. With `capture` (`--cuda-graph`) each group's step is replayed as a CUDA graph
(`study.fast.graphstep`).

Why not `torch.func.vmap` over stacked weights: under `torch.autocast` vmapped convolutions and
linear layers do not run in bf16 as the same layers do outside vmap (pytorch/pytorch#192617 and
related issues), so bf16 runs would compute differently fused and alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import onetime
from ..config import RunConfig
from ..models import CifarNet, memory_format
from ..stopflag import StopFlag
from .graphstep import GraphedStep
from .grouped import gate_shortcuts, grouped_cifar_net


@dataclass
class Join:
    """What a fused run's step yields once, before its first request (`study.train.step.FusedMemberStep`)."""

    model: CifarNet
    opt: torch.optim.SGD
    norm_names: list[str]  # the weights whose gradient norms the run records, in its order
    key: tuple  # runs with equal keys can be fused
    bf16: bool
    name: str = ""  # the run id, for the log
    fallback: str | None = None  # set by the Fuser if a capture of this run's group failed


@dataclass
class StepRequest:
    """What a fused run's `train_steps` yields for each step; it is sent back (loss, logits,
    gradient norms) for that step, or an exception thrown into it if the step failed."""

    x: torch.Tensor
    y: torch.Tensor
    lr: float
    norms: bool = True  # whether the run records this step's gradient norms


def fusion_key(cfg: RunConfig, model: nn.Module) -> tuple:
    """Runs with equal keys have networks of one shape and steps of one kind. A plain net has the
    parameters of its option-A residual twin, so they share a key; with projection shortcuts
    (B, C) a residual net fuses only with residual nets."""
    structure = "A" if not model.residual or model.shortcut == "A" else f"resnet-{model.shortcut}"
    return (model.depth, structure, model.conv1.in_channels, model.fc.out_features, cfg.precision,
            cfg.momentum, cfg.weight_decay)


def fusion_order(cfg: RunConfig) -> tuple:
    """A sort key that puts runs next to each other that `fusion_key` would fuse (from their
    configs), and among them those that end together."""
    structure = "A" if cfg.arch == "plain" or cfg.shortcut == "A" else f"resnet-{cfg.shortcut}"
    return (cfg.dataset, cfg.holdout, cfg.depth, structure, cfg.precision, cfg.batch_size, cfg.momentum,
            cfg.weight_decay, cfg.iterations)


def _set_tensor(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner, _, leaf = dotted.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, value)


class FusedNets:
    """The runs `members` (equal `fusion_key`s) trained as one grouped net on `device`, their
    tensors linked to it until `release`. `step(xs, ys, lr)` trains each net on its own batch and
    returns, per member, its mean loss, its logits and its gradient norms (in its `norm_names`
    order), as `GraphedStep` does for one run; all members train at the same `lr`."""

    def __init__(
        self,
        members: list[Join],
        device: torch.device,
        *,
        capture: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        self.members, self.k, self.device = members, len(members), device
        first = members[0].model
        residual = [m.model.residual for m in members]
        with torch.device("meta"):  # shapes only: `_link` gives every tensor its value
            net = grouped_cifar_net(first.depth, residual=any(residual), shortcut=first.shortcut,
                                    num_classes=first.fc.out_features, in_channels=first.conv1.in_channels,
                                    groups=self.k)
        self.net = net.to_empty(device=device)
        self.fmt = memory_format(device)
        try:
            self._link()
            if any(residual) and not all(residual):
                # Plain nets among residual ones: their shortcuts are scaled by 0, channel by
                # channel, in the activations' dtype (so the sum keeps its dtype of a run alone).
                gate_shortcuts(self.net, residual, torch.bfloat16 if members[0].bf16 else torch.float32, device)
            group = members[0].opt.param_groups[0]
            self.opt = torch.optim.SGD(self.net.parameters(), lr=float(group["lr"]), momentum=group["momentum"],
                                       weight_decay=group["weight_decay"])
            self._link_momentum()
            self._norm_weights = [self.net.get_parameter(name) for name in members[0].norm_names]
            self.graphed = GraphedStep(self.net, self.opt, [], bf16=members[0].bf16, device=device,
                                       capture=capture, log=log, loss=self._loss, norms=self._norms)
        except BaseException:
            self.release()  # each member gets its own tensors back, whatever was linked
            raise

    def _link(self) -> None:
        """The grouped net's parameters and buffers become the members' stacked; each member's
        become views of its slice."""
        k = self.k
        for name, grouped in self.net.named_parameters():
            parts = [m.model.get_parameter(name) for m in self.members]
            stacked = torch.stack([p.detach() for p in parts]).reshape(grouped.shape)
            grouped.data = stacked.contiguous(memory_format=self.fmt) if stacked.dim() == 4 else stacked
            slices = grouped.data.view(k, *parts[0].shape)
            for i, p in enumerate(parts):
                p.data = slices[i]
        for name, grouped in list(self.net.named_buffers()):
            parts = [m.model.get_buffer(name) for m in self.members]
            stacked = torch.stack(parts)  # (K, C), or (K,) for BN's batch counts: each counts its own
            _set_tensor(self.net, name, stacked.view(-1) if grouped.dim() else stacked)
            for i, m in enumerate(self.members):
                _set_tensor(m.model, name, stacked[i])

    def _link_momentum(self) -> None:
        """The grouped momentum buffers stack the members' (zeros where a run has none yet: SGD's
        first step then gives the same buffer as starting from none); each member's optimizer
        holds views, so that its checkpoint has its own."""
        for name, grouped in self.net.named_parameters():
            parts = [m.model.get_parameter(name) for m in self.members]
            buffers = [m.opt.state[p].get("momentum_buffer") for m, p in zip(self.members, parts)]
            stacked = torch.stack([torch.zeros_like(p) if b is None else b for p, b in zip(parts, buffers)])
            stacked = stacked.reshape(grouped.shape)
            stacked = stacked.contiguous(memory_format=self.fmt) if stacked.dim() == 4 else stacked.contiguous()
            self.opt.state[grouped]["momentum_buffer"] = stacked
            slices = stacked.view(self.k, *parts[0].shape)
            for i, (m, p) in enumerate(zip(self.members, parts)):
                m.opt.state[p]["momentum_buffer"] = slices[i]

    def release(self) -> None:
        """Give each member its own tensors again (copies of its slices)."""
        graphed = getattr(self, "graphed", None)
        if graphed is not None and graphed.captured:
            torch.cuda.current_stream(self.device).synchronize()  # no replay in flight when the graphs go
        # The step refers back to this group (its loss and norms are bound methods of it): drop it,
        # so that the graphs and their memory go with the group, not at the next garbage collection.
        self.graphed = None
        for m in self.members:
            for p in m.model.parameters():
                p.data = p.data.clone()
                state = m.opt.state.get(p)
                if state and state.get("momentum_buffer") is not None:
                    state["momentum_buffer"] = state["momentum_buffer"].clone()
            for name, b in list(m.model.named_buffers()):
                _set_tensor(m.model, name, b.clone())
        self.members = []

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sum of the nets' mean losses (each net's gradient is its own loss's), the nets'
        mean losses, and the logits (N, K, classes)."""
        out = self.net(x)
        logits = out.view(len(out), self.k, -1)
        losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(0)
        return losses.sum(), losses, logits

    def _norms(self) -> torch.Tensor:
        """(layers, K) gradient norms: each member's weights' norms in its column. (Splitting the
        first dimension is a view whatever the memory format: no copy of a channels-last grad.)"""
        norms = []
        for w in self._norm_weights:
            g = w.grad.unflatten(0, (self.k, -1))
            norms.append(torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim()))))
        return torch.stack(norms)

    def step(self, xs: list[torch.Tensor], ys: list[torch.Tensor], lr: float, norms: bool = True
             ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Each member's (loss, logits, gradient norms) for one step on its batch; the norms are
        None where `norms` is false and the step is not a replayed graph."""
        x = torch.cat(xs, 1)
        if self.fmt is torch.channels_last:
            x = x.contiguous(memory_format=self.fmt)
        losses, logits, grad_norms = self.graphed.step(x, torch.stack(ys, 1), lr, norms)
        return [(losses[i], logits[:, i], None if grad_norms is None else grad_norms[:, i]) for i in range(self.k)]


class Fuser:
    """Groups the fused runs that one process trains at once (`study.train.interleave`): each
    round, the runs whose requests agree (`fusion_key`, batch shape, learning rate) take one step
    together; groups form anew when that set changes.

    `stop_latch` is the stop flag to give the fused runs: `begin_round` copies `stop`'s signal
    into it, so that a signal arriving in the middle of a round stops every run after the same
    step (a run stopping a step later than its partners would stay out of phase with them)."""

    def __init__(self, device: torch.device, *, capture: bool = False, log: Callable[[str], None] = print,
                 stop: object | None = None) -> None:
        self.device, self.capture, self.log = device, capture, log
        self.stop, self.stop_latch = stop, StopFlag()  # set only by begin_round
        self.fallback: str | None = None  # why a capture failed: later groups are not captured
        self._members: dict[object, Join] = {}
        self._groups: dict[frozenset, tuple[list[object], FusedNets]] = {}
        self._group_of: dict[object, frozenset] = {}
        self._logged: set[frozenset] = set()  # groups announced in the log (each once)

    def join(self, member: object, join: Join) -> None:
        self._members[member] = join

    def begin_round(self) -> None:
        self.stop_latch.signum = getattr(self.stop, "signum", None)

    def leave(self, member: object) -> None:
        self._release(self._group_of.get(member))
        self._members.pop(member, None)

    def _release(self, group: frozenset | None) -> None:
        if group is None or group not in self._groups:
            return
        ids, nets = self._groups.pop(group)
        nets.release()
        for member in ids:
            self._group_of.pop(member, None)

    def close(self) -> None:
        for group in list(self._groups):
            self._release(group)

    def step(self, requests: dict[object, StepRequest]) -> dict[object, tuple | Exception]:
        """One step of every requesting member, group by group: each member's (loss, logits,
        norms), or the exception its group's step raised."""
        buckets: dict[tuple, list[object]] = {}
        for member, req in requests.items():
            key = (self._members[member].key, tuple(req.x.shape), req.x.dtype, req.lr)
            buckets.setdefault(key, []).append(member)
        results: dict[object, tuple | Exception] = {}
        for ids in buckets.values():
            group = frozenset(ids)
            if group not in self._groups:
                try:
                    with onetime.timed(self.device):  # a new group: one-time work, not training
                        for member in ids:
                            self._release(self._group_of.get(member))
                        nets = FusedNets([self._members[m] for m in ids], self.device,
                                         capture=self.capture and self.fallback is None, log=self.log)
                except Exception as e:  # noqa: BLE001 - each member's run records it
                    results.update(_failures(ids, "setting up", e))
                    continue
                self._groups[group] = (ids, nets)
                for member in ids:
                    self._group_of[member] = group
                if len(ids) > 1 and group not in self._logged:
                    self._logged.add(group)
                    self.log(f"fused group of {len(ids)}: {', '.join(self._members[m].name for m in ids)}")
            order, nets = self._groups[group]
            try:
                out = nets.step([requests[m].x for m in order], [requests[m].y for m in order], requests[order[0]].lr,
                                norms=any(requests[m].norms for m in order))
            except Exception as e:  # noqa: BLE001
                results.update(_failures(order, "the step", e))
                continue
            if nets.graphed.fallback and self.fallback is None:
                self.fallback = nets.graphed.fallback  # the members go on eagerly; say so in their status
            if nets.graphed.fallback:
                for member in order:
                    self._members[member].fallback = nets.graphed.fallback
            results.update(zip(order, out))
        return results


def _failures(members: list[object], what: str, error: Exception) -> dict[object, Exception]:
    """A fresh exception for each member of a group whose `what` failed (one exception object
    thrown into several runs would chain their tracebacks)."""
    failures = {}
    for m in members:
        failures[m] = RuntimeError(f"{what} of a fused group of {len(members)} runs failed: {type(error).__name__}: {error}")
        failures[m].__cause__ = error
    return failures
