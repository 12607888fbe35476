"""The whole training step replayed as one CUDA graph (`study run --cuda-graph`).

The CIFAR nets are thin (16-64 channels), so a step is hundreds of small kernels, and launching
them costs more than running them: on an H200 the common-reproduction pipeline and our eager fast
path both train the grid at about 4,800 images/s, while a hand-written capture of the step as one
CUDA graph (full batches, no gradient norms) ran at 25,500 (`benchmarks/results/`, 2026-11-27).
`GraphedStep` captures forward, loss, backward, the per-layer gradient norms and the SGD update,
and the training loop replays it with one launch. It has not yet run on a GPU.

What stays the same as the eager step (`study.train.sgd_step`):
- The protocol: every batch, the partial last batch of an epoch included, is trained on, with the
  learning rate the schedule gives for that step (warm-up included). The learning rate lives in a
  device tensor that is set before each replay.
- The update is SGD with momentum and weight decay. It uses torch's fused SGD kernel, because the
  default multi-tensor SGD reads a tensor learning rate on the host, which a graph cannot do. The
  fused kernel's rounding differs from the multi-tensor one in the last bits: in float64, at rates
  float32 can hold (as the rate tensor does), the two runs agree to 1e-9 (tests/test_graphstep.py);
  in float32 the odd flipped ReLU makes them drift.
- The gradient norms are the ones `GradientNorms` records: the raw gradients after backward,
  before the update, computed in the graph at every step and kept on the recording steps.

How it runs: each batch size (the full batch, and the epoch's last partial one) gets its own graph.
It first takes `EAGER_STEPS_BEFORE_CAPTURE` eager steps on a side stream, as torch asks before a capture. These
are real steps of the run: they let cuDNN pick its algorithms. The eager and graphed steps do the
same arithmetic. If a capture fails, the run logs one line, goes on eagerly and says so in its
final status (`cuda_graph_fallback`). Without CUDA (the
tests on CPU), every step runs eagerly through the same code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import onetime

EAGER_STEPS_BEFORE_CAPTURE = 3  # eager steps per batch size before it is captured


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    x: torch.Tensor  # static inputs: each replay reads them
    y: torch.Tensor
    loss: torch.Tensor  # static outputs: each replay overwrites them
    out: torch.Tensor
    norms: torch.Tensor


class GraphedStep:
    """One SGD step of `model` on a batch, as a replayed CUDA graph where `capture` (default: on
    CUDA). It takes over `opt`'s parameter groups: fused SGD, learning rate in a device tensor.

    `step(x, y, lr, norms)` trains on one batch at learning rate `lr` and returns the batch's mean
    loss, the logits, and the L2 norms of the gradients of `norm_weights` (in that order), or None
    for the norms where `norms` is false and the step is not a replay (a graph computes them every
    step; an eager step only when asked). All are detached. After a replay they are the graph's
    static outputs, which the next step overwrites, so use them (or clone them) before the next
    step.

    `loss(x, y)` and `norms()` replace how the loss and the norms are computed (for K nets fused
    into one, `study.fast.fused`): `loss` returns what to differentiate, the loss to report and the
    logits; `norms` reads the gradients after backward.
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.SGD,
        norm_weights: Sequence[torch.Tensor],
        *,
        bf16: bool,
        device: torch.device,
        capture: bool | None = None,
        log: Callable[[str], None] = print,
        loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
        norms: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.model, self.opt, self.norm_weights, self.log = model, opt, list(norm_weights), log
        # The replacements, or None for this class's own (not bound methods kept on self: such a
        # cycle would keep the graphs' memory until the garbage collector ran).
        self._loss, self._norms = loss, norms
        self.capture = device.type == "cuda" if capture is None else capture  # the plan refuses it off CUDA
        # Autocast's cache of cast weights must be off when capturing; off in eager steps too,
        # so that both compute the same.
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
        # The group's current rate (a plateau schedule's, after a resume) until `step` sets it.
        # float32 whatever the default dtype: the CUDA fused kernel reads the rate as a float (a
        # float64 tensor fails there), and float32 weights are updated at a float32 rate anyway.
        self.lr = torch.tensor(float(opt.param_groups[0]["lr"]), dtype=torch.float32, device=device)
        for group in opt.param_groups:  # after any load_state_dict, which replaces these
            group.update(lr=self.lr, fused=True, foreach=None)
        self.device = device
        self.fallback: str | None = None  # why captures failed, if they did
        self.pool_end: str | None = None  # after a failed capture: `_end_allocating_to_pool`'s answer
        self._graphs: dict[int, _Graph] = {}
        self._eager_steps: Counter[int] = Counter()
        self._side = torch.cuda.Stream(device) if self.capture else None
        self._capture_stream = torch.cuda.Stream(device) if self.capture else None

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, norms: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self.lr.fill_(lr)
        for group in self.opt.param_groups:  # a plateau schedule of older torch puts a float there
            group["lr"] = self.lr
        size = len(y)
        graph = self._graphs.get(size)
        # One-time work (`study.onetime`): the first step at a batch size, and every step until its
        # graph is captured (the eager warm-up steps and the capture itself).
        one_time = graph is None and (self._eager_steps[size] == 0 or self.capture)
        with onetime.timed(self.device, one_time):
            if graph is None and self.capture and self._eager_steps[size] >= EAGER_STEPS_BEFORE_CAPTURE:
                graph = self._capture(x, y)
            if graph is None:
                self._eager_steps[size] += 1
                # Before a capture the warm-up steps run everything the graph will hold.
                return self._eager(x, y, norms or self.capture)
            graph.x.copy_(x)
            graph.y.copy_(y)
            graph.graph.replay()
        return graph.loss, graph.out, graph.norms

    @property
    def captured(self) -> list[int]:
        """The batch sizes replayed as graphs so far."""
        return sorted(self._graphs)

    def _body(self, x: torch.Tensor, y: torch.Tensor, norms: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Forward, loss, backward, gradient norms (if `norms`), update; the gradients must be None
        before it (backward then writes them rather than adding to them, which a replayed graph
        needs)."""
        with self.autocast:
            differentiated, loss, out = (self._loss or self._mean_loss)(x, y)
        differentiated.backward()
        grad_norms = (self._norms or self._weight_norms)() if norms else None
        self.opt.step()
        return loss.detach(), out.detach(), grad_norms

    def _mean_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        return loss, loss, out

    def _weight_norms(self) -> torch.Tensor:
        return torch.stack(torch._foreach_norm([w.grad for w in self.norm_weights]))

    def _eager(self, x: torch.Tensor, y: torch.Tensor, norms: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self.opt.zero_grad(set_to_none=True)
        if self._side is None:
            return self._body(x, y, norms)
        current = torch.cuda.current_stream(x.device)
        self._side.wait_stream(current)
        for t in (x, y):  # made on the current stream, read on the side one
            t.record_stream(self._side)
        with torch.cuda.stream(self._side):
            result = self._body(x, y, norms)
        current.wait_stream(self._side)
        for t in result:  # made on the side stream, read on the current one
            if t is not None:
                t.record_stream(current)
        return result

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> _Graph | None:
        """Capture the step for `x`'s batch size, or None (with one logged line) if the capture
        fails: the run then goes on with eager steps."""
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        current = torch.cuda.current_stream(self.device)
        failed_step: BaseException | None = None
        try:
            # On `device` (not the current device), with a capture stream of that device.
            with torch.cuda.device(self.device), torch.cuda.graph(graph, stream=self._capture_stream):
                try:
                    loss, out, norms = self._body(static_x, static_y)
                except BaseException as e:
                    failed_step = e
                    raise
        except RuntimeError as e:
            # When the capture's end fails, torch.cuda.graph leaves the capture stream current:
            # put the run's stream back. An error in the step is the cause; the capture's end then
            # fails on top of it ("operation failed due to a previous error during capture").
            torch.cuda.set_stream(current)
            if failed_step is not None and not isinstance(failed_step, Exception):
                raise failed_step from None  # Ctrl-C or an exit during the capture: not a failed capture
            cause = failed_step or e
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            self.fallback = f"capture failed for batch size {len(y)}: {reason}"
            self.log(f"CUDA graph {self.fallback}; training on without graphs")
            self.capture = False
            self.pool_end = _end_allocating_to_pool(self.device, graph)
            if self.pool_end == "unavailable":
                self.log("CUDA graph: this torch has no call to end the failed capture's memory pool; "
                         "memory another stream used may not be freed")
            # Eager steps on the run's own stream from now on: no record_stream, whose blocks the
            # allocator would keep for ever if the failed capture's end left it capturing.
            self._side = self._capture_stream = None
            self.opt.zero_grad(set_to_none=True)
            return None
        captured = _Graph(graph, static_x, static_y, loss, out, norms)
        self._graphs[len(y)] = captured
        return captured


def _end_allocating_to_pool(device: torch.device, graph: "torch.cuda.CUDAGraph") -> str:
    """After a failed capture: tell the caching allocator the capture is over. When the capture's
    end fails, torch raises before doing so, and an allocator that believes a capture is under way
    never frees a block another stream has used. Private API, whose name changed (2.4:
    ...CurrentStreamToPool). Returns "ended", "not capturing" (the call raised: torch had ended it,
    or the call is not what this torch expects) or "unavailable" (no such call)."""
    end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
        torch._C, "_cuda_endAllocateCurrentStreamToPool", None)
    if end is None:
        return "unavailable"
    try:
        with torch.cuda.device(device):
            end(torch.cuda.current_device(), graph.pool())
    except Exception:  # noqa: BLE001 - not capturing any more, or an API of another version
        return "not capturing"
    return "ended"
