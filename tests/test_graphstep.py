"""`--cuda-graph`: the whole training step as one replayed CUDA graph (`study.fast.graphstep`).

There is no GPU here: on CPU `GraphedStep` runs the same step uncaptured (fused SGD, learning rate
in a tensor, gradient norms from the step), which is what these tests check. The capture itself
was measured on an H200 by `benchmarks/grid_throughput.py` (d).
"""

import json

import pandas as pd
import pytest
import torch

from study.cli import main
from study.config import RunConfig
from study.fast.graphstep import GraphedStep
from study.models import build_model
from study.runstore import Run
from helpers import TIMING_COLUMNS
from study.train import ExecutionPlan, StopFlag, StopRequested
from helpers import train_run

CPU = torch.device("cpu")


def cfg(**kw) -> RunConfig:
    # 320 training images at batch 48: 6 full batches and a partial one of 32 per epoch.
    return RunConfig(**{"arch": "resnet", "depth": 8, "iterations": 20, "batch_size": 48, **kw})


def metrics(run: Run) -> pd.DataFrame:
    return run.read_metrics().drop(columns=TIMING_COLUMNS)


def gradients(run: Run) -> pd.DataFrame:
    return pd.read_parquet(run.dir / "gradients.parquet")


def test_graph_step_trains_like_the_eager_step(tmp_path, small_data64, float64):
    """Same rows, the partial batches included, and the same numbers: in float64 the fused SGD
    kernel and the eager multi-tensor SGD agree to 1e-9 in metrics, gradient norms and weights
    over 20 steps. (In float32 they differ by rounding, about 1e-7 per step, which the odd ReLU
    that flips amplifies chaotically: torch 2.11 and 2.14 put the same float32 comparison 1% apart
    in a gradient norm. A bound there would test the chaos, not the step.)"""
    c = cfg(batch_size=24)  # 160 images: 6 full batches and a partial one of 16 per epoch
    eager, graphed = Run(tmp_path / "eager", c), Run(tmp_path / "graph", c)
    train_run(c, eager, small_data64, CPU, progress=False, gradient_every=3)
    train_run(c, graphed, small_data64, CPU, progress=False, gradient_every=3, cuda_graph=True)
    a, b = metrics(eager), metrics(graphed)
    assert list(a.iteration.unique()) == [7, 14, 20]  # 7 steps an epoch: the partial batch is trained on
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-9, rtol=0)
    ga, gb = gradients(eager), gradients(graphed)
    assert sorted(ga.iteration.unique()) == list(range(3, 21, 3))
    pd.testing.assert_frame_equal(ga, gb, check_exact=False, atol=1e-9, rtol=0)
    wa, wb = eager.load_checkpoint()["model"], graphed.load_checkpoint()["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-9, msg=k)
    assert json.loads(graphed.config_path.read_text())["provenance"]["step"] == "cuda-graph"
    assert json.loads(eager.config_path.read_text())["provenance"]["step"] == "eager"


def test_the_learning_rate_reaches_the_update_through_its_tensor(small_data):
    """The learning rate reaches the update through the tensor: a step at lr 0 leaves the weights
    as they were, and the step's tensor holds the rate the loop asked for."""
    torch.manual_seed(0)
    model = build_model("plain", 8, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    step = GraphedStep(model, opt, weights, bf16=False, device=CPU)
    x = small_data.train.images[:16].float().div(255).sub(small_data.mean)
    y = small_data.train.labels[:16]
    step.step(x, y, 0.1)  # the first step fills the momentum buffers
    before = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p]["momentum_buffer"].zero_()
    loss, out, norms = step.step(x, y, 0.0)
    assert float(step.lr) == 0.0 and opt.param_groups[0]["lr"] is step.lr
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert out.shape == (16, 10) and norms.shape == (len(weights),) and torch.isfinite(loss)
    step.step(x, y, 0.01)
    assert float(step.lr) == pytest.approx(0.01)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert step.captured == []  # nothing is captured without CUDA


def test_the_steps_rate_wins_over_a_float_a_schedule_put_in_the_group(small_data):
    """Older torch's plateau schedule writes a float into the group: the step puts its rate
    tensor back, so eager steps and the captured one (which reads the tensor) use the rate asked."""
    torch.manual_seed(0)
    model = build_model("plain", 8, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = GraphedStep(model, opt, [model.fc.weight], bf16=False, device=CPU)
    x, y = small_data.train.images[:16].float().div(255).sub(small_data.mean), small_data.train.labels[:16]
    before = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:
        group["lr"] = 0.5  # what ReduceLROnPlateau did before torch 2.6
    step.step(x, y, 0.0)
    assert opt.param_groups[0]["lr"] is step.lr
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # rate 0, not 0.5


def test_loaded_momentum_buffers_take_their_parameters_layout():
    """A checkpoint of contiguous weights resumed with channels-last ones (CPU to GPU): the loaded
    momentum buffers keep the saved layout unless `lay_out_like_params` re-lays them, which the
    fused SGD of a captured step needs (it refuses mismatched strides)."""
    from study.train import lay_out_like_params

    torch.manual_seed(0)
    model = build_model("resnet", 8, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    saved = opt.state_dict()
    resumed = build_model("resnet", 8, in_channels=1).to(memory_format=torch.channels_last)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved)
    convs = [p for p in resumed.parameters() if p.ndim == 4]
    assert any(opt2.state[p]["momentum_buffer"].stride() != p.stride() for p in convs)  # what it fixes
    lay_out_like_params(opt2)
    for p, q in zip(resumed.parameters(), model.parameters()):
        buf = opt2.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride() and torch.equal(buf, opt.state[q]["momentum_buffer"])


def test_interrupted_graph_run_resumes_exactly(tmp_path, small_data64, float64, monkeypatch):
    """A stop in the middle of an epoch checkpoints (with the fused SGD's tensor learning rate);
    resuming with --cuda-graph gives the uninterrupted run's metrics, gradients and weights
    exactly; resuming without it finishes the run equal to it to 1e-9 (float64)."""
    c = cfg(iterations=17, batch_size=24)
    whole = Run(tmp_path / "whole", c)
    train_run(c, whole, small_data64, CPU, progress=False, gradient_every=2, cuda_graph=True)

    stop = StopFlag()
    real_step = GraphedStep.step
    calls = []

    def step_then_signal(self, x, y, lr, **kwargs):
        calls.append(len(y))
        if len(calls) == 10:  # in the second epoch
            stop.signum = 15
        return real_step(self, x, y, lr, **kwargs)

    for name in ("cut", "eager"):
        calls.clear()
        stop.signum = None
        run = Run(tmp_path / name, c)
        monkeypatch.setattr(GraphedStep, "step", step_then_signal)
        with pytest.raises(StopRequested):
            train_run(c, run, small_data64, CPU, progress=False, gradient_every=2, stop=stop, cuda_graph=True)
        monkeypatch.setattr(GraphedStep, "step", real_step)
        assert run.status()["status"] == "interrupted" and run.status()["iteration"] == 10
        assert train_run(c, run, small_data64, CPU, progress=False, gradient_every=2, cuda_graph=name == "cut") == "done"

    cut, eager = Run(tmp_path / "cut", c), Run(tmp_path / "eager", c)
    pd.testing.assert_frame_equal(metrics(whole), metrics(cut))
    pd.testing.assert_frame_equal(gradients(whole), gradients(cut))
    for k, v in whole.load_checkpoint()["model"].items():
        assert torch.equal(v, cut.load_checkpoint()["model"][k]), k
    # Resumed eagerly: the same run, up to fused vs multi-tensor rounding after the stop.
    pd.testing.assert_frame_equal(metrics(whole), metrics(eager), check_exact=False, atol=1e-9, rtol=0)
    pd.testing.assert_frame_equal(gradients(whole), gradients(eager), check_exact=False, atol=1e-9, rtol=0)
    for k, v in whole.load_checkpoint()["model"].items():
        torch.testing.assert_close(eager.load_checkpoint()["model"][k], v, rtol=0, atol=1e-9, msg=k)
    assert eager.load_checkpoint()["optimizer"]["param_groups"][0]["fused"] is None


def test_cuda_graph_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = main(["run", "--arch", "resnet", "--depth", "8", "--iterations", "2", "--device", "cpu",
                 "--cuda-graph", "--runs-dir", str(runs)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--cuda-graph captures CUDA graphs and needs a GPU" in err and len(err.splitlines()) == 1
    assert not runs.exists()


def test_the_plan_refuses_what_the_graph_cannot_hold():
    """Split BN and --compile are refused by the plan's check (before anything is written)."""
    for c, kw, needle in ((cfg(batch_split=2), {}, "--cuda-graph does not split BN"),
                          (cfg(), {"compile": True}, "--cuda-graph and --compile are two ways")):
        with pytest.raises(ValueError, match=needle):
            ExecutionPlan(cuda_graph=True, **kw).check([c])


def eager_and_graphed(tmp_path, c: RunConfig, data, monkeypatch) -> tuple[Run, Run, list[GraphedStep]]:
    """`c` trained on the GPU eagerly and with --cuda-graph; the two runs and the graphed run's step."""
    gpu = torch.device("cuda")
    steps = []
    real_init = GraphedStep.__init__

    def keep(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        steps.append(self)

    monkeypatch.setattr(GraphedStep, "__init__", keep)
    eager, graphed = Run(tmp_path / "eager", c), Run(tmp_path / "graph", c)
    train_run(c, eager, data, gpu, progress=False, gradient_every=3)
    train_run(c, graphed, data, gpu, progress=False, gradient_every=3, cuda_graph=True)
    return eager, graphed, steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_session.sh)")
def test_captured_step_trains_like_the_eager_step_on_a_gpu(tmp_path, small_data64, float64, deterministic_cudnn,
                                                          monkeypatch):
    """On a GPU, in float64: both batch sizes get captured and replayed, and the run equals the
    eager run to 1e-9 in metrics, gradient norms and weights. (In float32, GPU rounding (cuDNN's
    algorithm choice, fused vs multi-tensor SGD) is amplified by the odd ReLU that flips, as on
    CPU for fused runs (tests/test_fused.py): a comparison there would test the chaos.)"""
    data = small_data64.to("cuda")
    c = cfg(iterations=30, batch_size=24)  # 7 steps an epoch: the partial batch is captured in the 4th
    eager, graphed, steps = eager_and_graphed(tmp_path, c, data, monkeypatch)
    assert steps[0].captured == [16, 24] and steps[0].fallback is None
    pd.testing.assert_frame_equal(metrics(eager), metrics(graphed), check_exact=False, atol=1e-9, rtol=0)
    pd.testing.assert_frame_equal(gradients(eager), gradients(graphed), check_exact=False, atol=1e-9, rtol=0)
    wa, wb = eager.load_checkpoint()["model"], graphed.load_checkpoint()["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-9, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_session.sh)")
def test_captured_bf16_step_trains_like_the_eager_step_on_a_gpu(tmp_path, small_data, deterministic_cudnn, monkeypatch):
    """On a GPU under bf16 autocast: both batch sizes are captured, and over 40 steps the run stays
    near the eager run: losses to 2e-2, errors within 2 points, gradient norms to 5%. (bf16
    rounding makes the two drift apart; these bounds separate drift from a wrong step.)"""
    data = small_data.to("cuda")
    c = cfg(iterations=40, precision="bf16")  # 6 epochs: the partial batch is captured in the 4th
    eager, graphed, steps = eager_and_graphed(tmp_path, c, data, monkeypatch)
    assert steps[0].captured == [32, 48] and steps[0].fallback is None
    a, b = metrics(eager), metrics(graphed)
    pd.testing.assert_frame_equal(a.drop(columns=["loss", "error_pct"]), b.drop(columns=["loss", "error_pct"]))
    assert (a.loss - b.loss).abs().max() < 2e-2
    assert (a.error_pct - b.error_pct).abs().max() <= 2.0
    ga, gb = gradients(eager), gradients(graphed)
    torch.testing.assert_close(torch.tensor(gb.grad_norm.values), torch.tensor(ga.grad_norm.values), rtol=5e-2, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_session.sh)")
def test_a_failed_capture_trains_on_eagerly_on_a_gpu(tmp_path, small_data64, float64, deterministic_cudnn, monkeypatch):
    """A capture that fails (here: a host read of the gradient norms, which a graph cannot hold)
    leaves the run on its own stream, training eagerly to the end: it equals the eager run to 1e-9,
    and its status says it fell back and why."""
    real_norms = GraphedStep._weight_norms

    def norms_read_on_the_host(self):
        norms = real_norms(self)
        if torch.cuda.is_current_stream_capturing():
            float(norms.sum())  # a device-to-host copy: illegal while capturing
        return norms

    monkeypatch.setattr(GraphedStep, "_weight_norms", norms_read_on_the_host)
    stream = torch.cuda.current_stream()
    c = cfg(iterations=12, batch_size=24)
    eager, graphed, steps = eager_and_graphed(tmp_path, c, small_data64.to("cuda"), monkeypatch)
    assert steps[0].captured == [] and steps[0].fallback.startswith("capture failed for batch size 24")
    # The cause (CUDA: "operation not permitted when stream is capturing"), not the capture's end
    # failing on top of it ("operation failed due to a previous error during capture").
    assert "capturing" in steps[0].fallback and "previous error" not in steps[0].fallback, steps[0].fallback
    assert torch.cuda.current_stream() == stream
    # The allocator was told the capture is over (or torch had told it): the call exists on this torch.
    assert steps[0].pool_end in ("ended", "not capturing"), steps[0].pool_end
    assert graphed.status()["status"] == "done" and graphed.status()["cuda_graph_fallback"] == steps[0].fallback
    pd.testing.assert_frame_equal(metrics(eager), metrics(graphed), check_exact=False, atol=1e-9, rtol=0)
    # Eager steps after the failure do not leak: were the allocator left believing a capture is
    # under way, every block another stream used would be kept (about 0.4 MB a step here).
    step, data = steps[0], small_data64.to("cuda")
    x, y = data.train.images[:24].double().div(255).sub(data.mean), data.train.labels[:24]
    for _ in range(10):
        step.step(x, y, 0.01)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    for _ in range(200):
        step.step(x, y, 0.01)
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() - reserved < 16 * 2**20, (reserved, torch.cuda.memory_reserved())


def test_plateau_schedule_survives_a_resume_with_and_without_graphs(tmp_path, small_data, monkeypatch):
    """The plateau schedule's lowered rate lives in the optimizer: a run stopped after it dropped
    resumes at the lowered rate (it used to be reset to the initial one), and --cuda-graph trains
    at the schedule's rates (it used to start from 0)."""
    c = cfg(iterations=35, lr_schedule="plateau", plateau_patience=1, plateau_threshold=100.0)
    lrs = {}
    for name, graph in (("eager", False), ("graph", True)):
        whole = Run(tmp_path / f"whole-{name}", c)
        train_run(c, whole, small_data, CPU, progress=False, cuda_graph=graph)
        lrs[name] = whole.read_metrics().query("split == 'train'").lr.tolist()

        stop = StopFlag()
        real = Run.write_metrics

        def write_then_stop(self, rows):
            real(self, rows)
            if rows and rows[-1]["epoch"] == 4:
                stop.signum = 15  # stop after the first step of epoch 5, past the drop

        cut = Run(tmp_path / f"cut-{name}", c)
        monkeypatch.setattr(Run, "write_metrics", write_then_stop)
        with pytest.raises(StopRequested):
            train_run(c, cut, small_data, CPU, progress=False, stop=stop, cuda_graph=graph)
        monkeypatch.setattr(Run, "write_metrics", real)
        assert train_run(c, cut, small_data, CPU, progress=False, cuda_graph=graph) == "done"
        pd.testing.assert_frame_equal(metrics(whole), metrics(cut))
    # Patience 1 and an impossible threshold: epochs 2 and 3 do not improve on epoch 1, so the rate
    # drops after epoch 3. (The graph's rate is a float32 tensor: 0.1 is 0.10000000149.)
    for name in ("eager", "graph"):
        assert lrs[name] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01], rel=1e-6), name


def test_slurm_refuses_what_the_graph_cannot_hold_at_submission(tmp_path, capsys):
    code = main(["run", "--grid", "quick", "--launcher", "slurm", "--cuda-graph", "--compile",
                 "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--cuda-graph and --compile" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()
