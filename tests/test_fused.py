"""`--fuse K`: runs of one network shape trained as one grouped network (`study.fast.fused`).

Each fused run must stay its own run. The equality tests run in float64: there a grouped kernel's
other summation order changes results by about 1e-16, so fused and alone must agree to 1e-10. In
float32 the same rounding differences (about 1e-7) flip the odd ReLU whose input is within 1e-7 of
zero, and over a few steps at learning rate 0.1 the runs drift apart by up to 1e-3: the trajectory
is chaotic, not the arithmetic different (measured while writing this test).
"""

import gc
import json
import time
import weakref

import pandas as pd
import pytest
import torch

import study.fast.fused
import study.train
from study.cli import main
from study.config import RunConfig
from study.fast.fused import FusedNets, Join, fusion_key
from study.fast.graphstep import GraphedStep
from study.models import build_model
from study.runstore import Run
from helpers import TIMING_COLUMNS
from study.train import StopFlag, StopRequested
from helpers import run_all, train_run, train_steps_of
from study.train.interleave import interleave

CPU = torch.device("cpu")


def cfg(arch: str, seed: int, iterations: int, **kw) -> RunConfig:
    # 320 training images at batch 48: 6 full batches and a partial one of 32 per epoch.
    return RunConfig(**{"arch": arch, "depth": 8, "seed": seed, "iterations": iterations, "batch_size": 48, **kw})


def train_fused(configs, root, data, slots, device=CPU, stop=None, cuda_graph=False) -> dict:
    """Train `configs` through `interleave` with a Fuser (capturing on CUDA), `slots` at a time,
    as `run_all(fuse=slots)` does; their outcomes."""
    outcomes = {}
    fuser = study.fast.fused.Fuser(device, capture=device.type == "cuda", stop=stop)
    runs = [Run(root, c) for c in configs]
    source = iter([(r, train_steps_of(r.cfg, r, data, device, progress=False, gradient_every=2, fuse=True,
                                      stop=fuser.stop_latch, cuda_graph=cuda_graph)) for r in runs])
    interleave(source, slots, device, lambda run, outcome: outcomes.update({run.cfg.run_id: outcome}), fuser)
    return outcomes


def same_run(a: Run, b: Run, atol: float) -> None:
    """Metrics, gradient norms, weights, BN statistics and momentum buffers agree to `atol`."""
    ma, mb = a.read_metrics().drop(columns=TIMING_COLUMNS), b.read_metrics().drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(ma, mb, check_exact=False, atol=atol, rtol=0)
    ga, gb = (pd.read_parquet(r.dir / "gradients.parquet") for r in (a, b))
    pd.testing.assert_frame_equal(ga, gb, check_exact=False, atol=atol, rtol=0)
    ca, cb = a.load_checkpoint(), b.load_checkpoint()
    for k, v in ca["model"].items():
        torch.testing.assert_close(cb["model"][k], v, atol=atol, rtol=0, msg=f"{a.cfg.run_id} {k}")
    for k, state in ca["optimizer"]["state"].items():
        torch.testing.assert_close(cb["optimizer"]["state"][k]["momentum_buffer"], state["momentum_buffer"],
                                   atol=atol, rtol=0)
    assert cb["iteration"] == ca["iteration"] and ma.iteration.max() == a.cfg.iterations


def test_fused_runs_equal_runs_trained_alone(tmp_path, small_data64, float64, monkeypatch):
    """Four runs, three at a time: a plain net fused with residual twins (the 0-scaled
    shortcut), a run that ends early (its group re-forms without it), and a run that takes its
    place out of phase (its partial batch comes at another step, so groups split and merge).
    Every run equals the same run trained alone (float64, 1e-10)."""
    data = small_data64
    configs = [cfg(a, s, n, batch_size=24) for a, s, n in [("plain", 0, 8), ("resnet", 0, 8), ("resnet", 1, 3), ("plain", 1, 8)]]
    sizes = []
    real_init = FusedNets.__init__

    def record(self, members, *args, **kwargs):
        sizes.append(len(members))
        real_init(self, members, *args, **kwargs)

    monkeypatch.setattr(FusedNets, "__init__", record)
    outcomes = train_fused(configs, tmp_path / "fused", data, slots=3)
    assert set(outcomes.values()) == {"done"}
    assert sizes[0] == 3 and 2 in sizes and 1 in sizes, sizes  # fused, re-formed, split by phase
    for c in configs:
        alone = Run(tmp_path / "alone", c)
        train_run(c, alone, data, CPU, progress=False, gradient_every=2)
        same_run(alone, Run(tmp_path / "fused", c), atol=1e-10)


def test_a_run_diverging_inside_a_group_leaves_its_partners_untouched(tmp_path, small_data64, float64, monkeypatch):
    """One run of a fused group goes NaN (its batch is poisoned at its third step): it is marked
    diverged at that iteration, while the runs fused with it (a plain net among them, whose
    0-scaled shortcut must not let NaN in) finish equal to the same runs trained alone."""
    data = small_data64
    configs = [cfg("plain", 0, 8, batch_size=24), cfg("resnet", 0, 8, batch_size=24), cfg("resnet", 1, 8, batch_size=24)]
    target = configs[1].run_id
    real_step = FusedNets.step
    steps = []

    def poison(self, xs, ys, lr, **kwargs):
        names = [m.name for m in self.members]
        steps.append(len(names))
        if len(steps) == 3:
            assert len(names) == 3
            xs = list(xs)
            xs[names.index(target)] = torch.full_like(xs[names.index(target)], float("nan"))
        return real_step(self, xs, ys, lr, **kwargs)

    monkeypatch.setattr(FusedNets, "step", poison)
    outcomes = train_fused(configs, tmp_path / "fused", data, slots=3)
    assert outcomes == {configs[0].run_id: "done", target: "diverged", configs[2].run_id: "done"}
    status = Run(tmp_path / "fused", configs[1]).status()
    assert status["status"] == "diverged" and status["iteration"] == 3
    assert steps[-1] == 2  # the partners went on as a group of two
    for c in (configs[0], configs[2]):
        alone = Run(tmp_path / "alone", c)
        train_run(c, alone, data, CPU, progress=False, gradient_every=2)
        same_run(alone, Run(tmp_path / "fused", c), atol=1e-10)


def test_a_stopped_fused_group_resumes_exactly(tmp_path, small_data, monkeypatch):
    """A SIGTERM landing between two fused runs' checks of the stop flag: all three stop after the
    same step (a run stopping later would stay out of phase with its partners for good), each with
    its own checkpoint (owning its tensors: no copy of the whole group's); fused again, they finish
    with exactly the metrics and weights of an uninterrupted fused run (float32, bitwise)."""
    configs = [cfg("plain", 0, 10), cfg("resnet", 0, 10), cfg("resnet", 1, 10)]
    train_fused(configs, tmp_path / "whole", small_data, slots=3)

    stop = StopFlag()
    real_check = study.train.signals.stop_requested
    checks = []

    def signal_between_checks(*args, **kwargs):
        checks.append(1)
        if len(checks) == 3 * 4 + 2:  # the fifth step: the first run has checked, two have not
            stop.signum = 15
        return real_check(*args, **kwargs)

    monkeypatch.setattr(study.train.signals, "stop_requested", signal_between_checks)
    outcomes = train_fused(configs, tmp_path / "cut", small_data, slots=3, stop=stop)
    monkeypatch.setattr(study.train.signals, "stop_requested", real_check)
    assert all(isinstance(o, StopRequested) for o in outcomes.values())
    for c in configs:
        run = Run(tmp_path / "cut", c)
        assert run.status()["status"] == "interrupted" and run.status()["iteration"] == 6
        for t in run.load_checkpoint()["model"].values():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert set(train_fused(configs, tmp_path / "cut", small_data, slots=3).values()) == {"done"}
    for c in configs:
        a, b = Run(tmp_path / "whole", c), Run(tmp_path / "cut", c)
        pd.testing.assert_frame_equal(a.read_metrics().drop(columns=TIMING_COLUMNS), b.read_metrics().drop(columns=TIMING_COLUMNS))
        ca, cb = a.load_checkpoint(), b.load_checkpoint()
        for k, v in ca["model"].items():
            assert torch.equal(v, cb["model"][k]), (c.run_id, k)


def test_bf16_fused_step_computes_in_the_dtypes_of_a_run_alone(small_data):
    """Under bf16 autocast a fused plain and residual pair gives each net the logits (dtype and,
    to bf16 rounding, values) and loss of the same net stepped alone."""
    torch.manual_seed(0)
    nets = [build_model(a, 8, in_channels=1) for a in ("plain", "resnet")]
    copies = [build_model(a, 8, in_channels=1) for a in ("plain", "resnet")]
    for src, dst in zip(nets, copies):
        dst.load_state_dict(src.state_dict())
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    names = [n + ".weight" for n, m in nets[0].named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    c = cfg("plain", 0, 1, precision="bf16")
    joins = [Join(m, torch.optim.SGD(m.parameters(), **sgd), names, fusion_key(c, m), bf16=True) for m in nets]
    fused = FusedNets(joins, CPU)
    x = small_data.train.images[:32].double().div(255).sub(small_data.mean).float()
    xs, ys = [x[:16], x[16:]], [small_data.train.labels[:16], small_data.train.labels[16:32]]
    results = fused.step(xs, ys, 0.1)
    for m, xi, yi, (loss, out, norms) in zip(copies, xs, ys, results):
        alone = GraphedStep(m, torch.optim.SGD(m.parameters(), **sgd), [m.get_parameter(n) for n in names],
                            bf16=True, device=CPU)
        loss_a, out_a, norms_a = alone.step(xi, yi, 0.1)
        assert out.dtype == out_a.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), out_a.float(), atol=0.05, rtol=0.02)
        torch.testing.assert_close(loss, loss_a, atol=0.02, rtol=0)
        torch.testing.assert_close(norms, norms_a, atol=0.02, rtol=0.05)


def test_runs_at_different_learning_rates_step_apart_and_fuse_again(small_data, float64):
    """A warm-up that ends for one run before the other (the 110-layer nets): while their rates
    differ they step in separate groups, then fuse again; each run's weights and momentum stay those
    of the same run stepped alone (float64, 1e-12)."""
    names = [n + ".weight" for n, m in build_model("plain", 8, in_channels=1).named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    fused, alone, slots = [], [], ["plain", "resnet"]
    for arch in slots:
        for nets in (fused, alone):
            torch.manual_seed(0)
            nets.append(build_model(arch, 8, in_channels=1))
    fuser = study.fast.fused.Fuser(CPU)
    for slot, m in zip(slots, fused):
        fuser.join(slot, Join(m, torch.optim.SGD(m.parameters(), **sgd), names, fusion_key(cfg(slot, 0, 1), m), False))
    steps = [GraphedStep(m, torch.optim.SGD(m.parameters(), **sgd), [m.get_parameter(n) for n in names],
                         bf16=False, device=CPU) for m in alone]
    x = small_data.train.images[:16].double().div(255).sub(small_data.mean.double())
    y = small_data.train.labels[:16]
    sizes = []
    for rates in [(0.01, 0.01), (0.1, 0.01), (0.1, 0.01), (0.1, 0.1)]:
        requests = {slot: study.fast.fused.StepRequest(x, y, lr) for slot, lr in zip(slots, rates)}
        results = fuser.step(requests)
        sizes.append(sorted(nets.k for _, nets in fuser._groups.values()))
        for slot, step, lr in zip(slots, steps, rates):
            loss, _, _ = step.step(x, y, lr)
            torch.testing.assert_close(results[slot][0], loss, atol=1e-12, rtol=0)
    assert sizes == [[2], [1, 1], [1, 1], [2]]
    fuser.close()
    for a, b in zip(fused, alone):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, atol=1e-12, rtol=0, msg=name)


def test_a_released_group_and_a_dropped_step_are_freed_at_once(small_data):
    """A group's graphs hold their own device memory, so a group that re-forms or ends must free
    it at once, not whenever the garbage collector next runs: nothing keeps a released group or a
    dropped `GraphedStep` alive in a reference cycle."""
    names = [n + ".weight" for n, m in build_model("plain", 8, in_channels=1).named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    x = small_data.train.images[:16].float().div(255).sub(small_data.mean)
    y = small_data.train.labels[:16]
    fuser = study.fast.fused.Fuser(CPU)
    for slot in ("plain", "resnet"):
        m = build_model(slot, 8, in_channels=1)
        fuser.join(slot, Join(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), names,
                              fusion_key(cfg(slot, 0, 1), m), False))
    fuser.step({slot: study.fast.fused.StepRequest(x, y, 0.1) for slot in ("plain", "resnet")})
    (_, nets), = fuser._groups.values()
    group, step = weakref.ref(nets), weakref.ref(nets.graphed)
    del nets
    model = build_model("plain", 8, in_channels=1)
    alone = GraphedStep(model, torch.optim.SGD(model.parameters(), lr=0.1), [], bf16=False, device=CPU)
    alone.step(x, y, 0.1, norms=False)
    alone_ref = weakref.ref(alone)
    gc.disable()
    try:
        fuser.close()
        del alone
        assert group() is None and step() is None and alone_ref() is None
    finally:
        gc.enable()


def test_fusion_keys():
    """A plain net shares its option-A twin's key; projection shortcuts (B) fuse only with their
    own kind; precision and depth part runs."""
    def key(arch, depth=8, shortcut="A", **kw):
        return fusion_key(cfg(arch, 0, 1, depth=depth, **kw), build_model(arch, depth, shortcut=shortcut))

    assert key("plain") == key("resnet") != key("resnet", 14)
    assert key("resnet", shortcut="B") == key("resnet", shortcut="B") != key("plain")
    assert key("resnet", precision="bf16") != key("resnet")


@pytest.mark.parametrize("extra, message", [
    (["--streams", "2"], "--fuse and --streams"),
    (["--compile"], "--fuse with --compile"),
    (["--batch-split", "2"], "does not split BN"),
])
def test_fuse_refuses_what_it_cannot_do(tmp_path, capsys, extra, message):
    code = main(["run", "--arch", "resnet", "--depth", "8", "--iterations", "2", "--device", "cpu", "--no-progress",
                 "--runs-dir", str(tmp_path / "runs"), "--fuse", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_run_all_takes_the_runs_that_fuse_together(tmp_path, small_data, monkeypatch):
    """`run_all(fuse=2)` trains the runs that can fuse together (here the two depth-8 nets), not
    in the list's order; the runs record their fused step."""
    monkeypatch.setattr(study.train.runner, "load_data", lambda *args, **kwargs: small_data)
    configs = [RunConfig(arch=a, depth=d, iterations=1, batch_size=64) for a, d in
               [("plain", 8), ("resnet", 14), ("resnet", 8)]]
    lines = []
    assert set(run_all(configs, tmp_path, device="cpu", fuse=2, progress=False,
                       log=lines.append).values()) == {"done"}
    started = [line.split()[1].rstrip(":") for line in lines if "training on" in line]
    assert started == [configs[0].run_id, configs[2].run_id, configs[1].run_id]
    assert all("to be fused with runs of its shape (up to 2 at once)" in line for line in lines if "training on" in line)
    assert f"fused group of 2: {configs[0].run_id}, {configs[2].run_id}" in lines
    for c in configs:
        assert json.loads(Run(tmp_path, c).config_path.read_text())["provenance"]["step"] == "fused-eager"


def test_a_failed_capture_is_in_each_fused_runs_status(tmp_path, small_data, monkeypatch):
    """A group whose CUDA-graph capture failed trains on eagerly, and each member's status says so."""
    real_step = FusedNets.step

    def capture_fails(self, *args, **kwargs):
        self.graphed.fallback = "capture failed for batch size 48: simulated"
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(FusedNets, "step", capture_fails)
    configs = [cfg("plain", 0, 2), cfg("resnet", 0, 2)]
    assert set(train_fused(configs, tmp_path, small_data, slots=2, cuda_graph=True).values()) == {"done"}
    for c in configs:
        assert Run(tmp_path, c).status()["cuda_graph_fallback"].endswith("simulated")


def test_gradient_norms_are_computed_only_on_the_steps_that_record_them(tmp_path, small_data, monkeypatch):
    """An uncaptured step (a run alone with --cuda-graph on CPU, or a fused group) computes the
    gradient norms only at the iterations that record them: every 3rd alone, every 2nd fused."""
    calls = []
    real_alone, real_fused = GraphedStep._weight_norms, FusedNets._norms
    monkeypatch.setattr(GraphedStep, "_weight_norms", lambda self: calls.append("alone") or real_alone(self))
    monkeypatch.setattr(FusedNets, "_norms", lambda self: calls.append("fused") or real_fused(self))
    alone = cfg("resnet", 0, 7)
    train_run(alone, Run(tmp_path / "alone", alone), small_data, CPU, progress=False, gradient_every=3, cuda_graph=True)
    assert calls == ["alone"] * 2
    train_fused([alone, cfg("plain", 0, 7)], tmp_path / "fused", small_data, slots=2)
    assert calls == ["alone"] * 2 + ["fused"] * 3
    assert sorted(set(pd.read_parquet(tmp_path / "alone" / alone.run_id / "gradients.parquet").iteration)) == [3, 6]
    assert sorted(set(pd.read_parquet(tmp_path / "fused" / alone.run_id / "gradients.parquet").iteration)) == [2, 4, 6]


def test_fused_runs_count_forming_a_group_and_its_first_steps_as_warm_up(tmp_path, small_data, monkeypatch):
    """Each member's `warmup_s` holds the one-time work its group did: forming (here 0.2 s) and the
    first step at each batch size (0.3 s each; where a captured group would capture), not its
    other steps (0.05 s each)."""
    real_init, real_eager = FusedNets.__init__, GraphedStep._eager
    seen = set()

    def slow_init(self, *args, **kwargs):
        time.sleep(0.2)
        real_init(self, *args, **kwargs)

    def slow_first_step(self, x, y, *args):
        time.sleep(0.05 if len(y) in seen else 0.3)
        seen.add(len(y))
        return real_eager(self, x, y, *args)

    monkeypatch.setattr(FusedNets, "__init__", slow_init)
    monkeypatch.setattr(GraphedStep, "_eager", slow_first_step)
    configs = [cfg("plain", 0, 8), cfg("resnet", 0, 8)]  # 7 steps of 48, 32 then 48 again: one group
    assert set(train_fused(configs, tmp_path, small_data, slots=2).values()) == {"done"}
    for c in configs:
        df = Run(tmp_path, c).read_metrics()
        warm, elapsed = df.warmup_s.iloc[-1], df.elapsed_s.iloc[-1]
        assert warm >= 0.2 + 2 * 0.3 and elapsed - warm >= 0.05 * 6 * 0.9, (warm, elapsed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_session.sh)")
def test_captured_fused_runs_equal_runs_trained_alone_on_a_gpu(tmp_path, small_data64, float64, deterministic_cudnn,
                                                               monkeypatch):
    """On a GPU, float64: three runs fused and their step captured as a CUDA graph (full and
    partial batches) equal the same runs trained alone, eagerly, to 1e-9."""
    gpu = torch.device("cuda")
    data = small_data64.to(gpu)
    configs = [cfg(a, s, 30, batch_size=24) for a, s in [("plain", 0), ("resnet", 0), ("resnet", 1)]]
    captured = []  # each group's captured batch sizes, when it is released
    real_release = FusedNets.release

    def note(self):
        captured.append(self.graphed.captured)
        real_release(self)

    monkeypatch.setattr(FusedNets, "release", note)
    assert set(train_fused(configs, tmp_path / "fused", data, slots=3, device=gpu).values()) == {"done"}
    assert captured == [[16, 24]], captured  # one group, both batch sizes captured
    for c in configs:
        alone = Run(tmp_path / "alone", c)
        train_run(c, alone, data, gpu, progress=False, gradient_every=2)
        same_run(alone, Run(tmp_path / "fused", c), atol=1e-9)
