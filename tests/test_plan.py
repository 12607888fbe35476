"""How runs execute is one checked `ExecutionPlan`: every refused combination of modes, through the
command line (one line, exit code 2, nothing written); the step the plan builds; what a run that
fails on a full disk records; errors that are not the user's keep their traceback."""

import errno
import pickle

import pytest
import torch

import study.launch
import study.runstore
import study.train
from helpers import run_all
from study.cli import main
from study.config import ConfigError, RunConfig
from study.runstore import Run
from study.train import ExecutionPlan
from study.train.step import CapturedStep, EagerStep, FusedMemberStep
from study.probes import GradientNorms

RUN = ["run", "--arch", "plain", "--depth", "8", "--iterations", "2"]
IMAGENET = ["run", "--grid", "degradation-imagenet"]

#: Every rule of `ExecutionPlan.check`, as a command line that breaks it: (argv, torchrun's WORLD_SIZE, needle).
REFUSED = [
    (RUN + ["--partition", "gpu"], 1, "--partition applies to --launcher slurm only"),
    (RUN + ["--sync-bn"], 1, "--sync-bn applies to runs launched by torchrun"),
    (RUN + ["--launcher", "slurm", "--device", "mps"], 1, "unknown device 'mps'; use --device auto, cpu or cuda"),
    (RUN + ["--launcher", "slurm", "--concurrency", "2"], 1, "--concurrency does not apply to --launcher slurm"),
    (RUN + ["--launcher", "slurm", "--streams", "2"], 1, "--streams does not apply to --launcher slurm"),
    (RUN + ["--launcher", "slurm", "--fuse", "2"], 1, "--fuse does not apply to --launcher slurm"),
    (RUN + ["--launcher", "slurm", "--gpus-per-run", "2", "--device", "cpu"], 1, "--gpus-per-run 2 trains on GPUs"),
    (RUN + ["--workers", "2"], 1, "--workers sets ImageNet's DataLoader workers"),
    (IMAGENET + ["--download"], 1, "ImageNet cannot be downloaded"),
    (RUN + ["--sync-bn", "--batch-split", "2"], 2, "--sync-bn computes BN over the whole batch"),
    (RUN + ["--batch-split", "1"], 2, "2 processes split each batch into at least 2 BN groups"),
    (RUN + ["--launcher", "slurm", "--gpus-per-run", "2", "--batch-split", "1"], 1, "pass --batch-split 2"),
    (RUN + ["--concurrency", "2"], 2, "--concurrency shares one device between runs"),
    (RUN + ["--streams", "2"], 2, "--streams interleaves runs in one process"),
    (RUN + ["--fuse", "2", "--streams", "2"], 1, "--fuse and --streams are two ways"),
    (RUN + ["--fuse", "2", "--compile"], 1, "--fuse with --compile is not supported"),
    (RUN + ["--fuse", "2"], 2, "--fuse trains a run in one process"),
    (IMAGENET + ["--fuse", "2"], 1, "--fuse is for the CIFAR-style data sets"),
    (RUN + ["--fuse", "2", "--batch-split", "2"], 1, "--fuse does not split BN over parts of a batch"),
    (RUN + ["--cuda-graph", "--launcher", "slurm", "--device", "cpu"], 1, "--cuda-graph captures CUDA graphs and needs a GPU (the device is cpu)"),
    (RUN + ["--cuda-graph", "--device", "cpu"], 1, "needs a GPU (the device is cpu)"),
    (RUN + ["--cuda-graph", "--compile"], 1, "--cuda-graph and --compile are two ways"),
    (IMAGENET + ["--cuda-graph"], 1, "--cuda-graph is for the CIFAR-style data sets"),
    (RUN + ["--decode", "gpu"], 1, "--decode applies only to ImageNet runs"),
    (IMAGENET + ["--decode", "gpu", "--device", "cpu"], 1, "--decode gpu decodes JPEGs with the GPU's decoder"),
    # Under --launcher slurm the --device given is the nodes': refused here, not by each job on its node.
    (IMAGENET + ["--decode", "gpu", "--device", "cpu", "--launcher", "slurm"], 1, "needs CUDA (the device is cpu)"),
    (RUN + ["--cpu-path", "eager", "--device", "cuda", "--launcher", "slurm"], 1, "(the device is cuda); drop it"),
    (RUN + ["--streams", "0"], 1, "--streams: must be a positive integer"),  # argparse's type, before the plan
    (RUN + ["--fuse", "0"], 1, "--fuse: must be a positive integer"),
    (RUN + ["--device", "mps"], 1, "--device mps cannot be used here"),
    (RUN + ["--cpu-path", "channels-last", "--compile"], 1, "--compile and --cpu-path channels-last (not compiled) disagree"),
    (RUN + ["--cpu-path", "eager", "--fuse", "2"], 1, "--fuse trains its group eagerly in NCHW on a CPU"),
    (RUN + ["--cpu-path", "compiled", "--device", "cuda"], 1, "--cpu-path chooses how a run trains on a CPU (the device is cuda)"),
    (RUN + ["--cpu-path", "nhwc"], 1, "--cpu-path: invalid choice"),  # argparse's choices
]


@pytest.mark.parametrize("argv,world,needle", REFUSED, ids=[needle for _, _, needle in REFUSED])
def test_every_refused_combination_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, argv, world,
                                                                      needle):
    monkeypatch.chdir(tmp_path)
    if world > 1:  # as under torchrun
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
    code = main([*argv, "--runs-dir", "runs"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("study: error: ") and err.count("\n") == 1 and needle in err, err
    assert len(err) < 400, err  # a line to read, not a backend dump
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("plan,device,needle", [
    (ExecutionPlan(streams=0), None, "--streams must be at least 1"),
    (ExecutionPlan(fuse=0), None, "--fuse must be at least 1"),
    (ExecutionPlan(streams=2, compile=True), "cuda:0", "--streams with --compile is not supported on a GPU"),
])
def test_the_rules_the_command_line_cannot_reach(plan, device, needle):
    """Rules for callers of the Python API (argparse refuses a 0 first) and for a GPU."""
    with pytest.raises(ConfigError, match=needle):
        plan.check([RunConfig(arch="plain", depth=8)], device)


def test_the_plan_builds_the_step_the_loop_calls(small_data):
    """Each plan's step is the one its modes ask for, and each is called the same way: the eager and
    captured ones return at once (the same step, on a CPU), a fused member yields its Join and its
    request, and returns the answer."""
    cfg, dev = RunConfig(arch="resnet", depth=8, iterations=2, batch_size=16), torch.device("cpu")
    x = small_data.train.images[:16].float().div(255).sub(small_data.mean)
    y = small_data.train.labels[:16]
    results = {}
    for plan, kind in ((ExecutionPlan(), EagerStep), (ExecutionPlan(cuda_graph=True), CapturedStep),
                       (ExecutionPlan(fuse=2), FusedMemberStep)):
        net = plan.trainee(cfg, 10, 1, dev, study.train.distributed.SINGLE)
        step = plan.step(cfg, net, GradientNorms(net.model), dev, study.train.distributed.SINGLE, print)
        assert type(step) is kind and step.fallback is None
        calls = step(x[:, :1], y, 0.1, 0, 16)
        if kind is FusedMemberStep:
            first = next(calls)
            assert isinstance(first, study.fast.fused.Join) and first.model is net.model
            request = calls.send(None)
            assert isinstance(request, study.fast.fused.StepRequest) and request.lr == 0.1
            with pytest.raises(StopIteration):
                calls.send((torch.tensor(1.0), torch.zeros(16, 10), None))
            assert net.opt.param_groups[0]["lr"] == 0.1  # what its checkpoint records
        else:
            with pytest.raises(StopIteration) as done:
                next(calls)
            results[kind] = done.value.value
    # The eager and the uncaptured graph step compute the same loss from the same start.
    torch.testing.assert_close(results[EagerStep][0], results[CapturedStep][0])


def test_a_run_that_fails_on_a_full_disk_says_so(tmp_path, monkeypatch, capsys):
    """A full disk in the middle of a run (no block for a new file): the run is marked failed with
    the error, written over the old status in place, and `study status` shows it and why."""
    cfg = RunConfig(arch="plain", depth=8, iterations=20, batch_size=64)
    full = []
    real_temporary, real_write = study.runstore._temporary, Run.write_metrics

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def temporary(*args, **kwargs):
        return no_space() if full else real_temporary(*args, **kwargs)

    def write_metrics(self, rows):
        if rows:  # the disk fills up during the first epoch
            full.append(True)
        return real_write(self, rows)

    monkeypatch.setattr(study.runstore, "_temporary", temporary)
    monkeypatch.setattr(Run, "write_metrics", write_metrics)
    lines = []
    assert run_all([cfg], tmp_path, device="cpu", progress=False, log=lines.append) == {cfg.run_id: "failed"}
    status = Run(tmp_path, cfg).status()
    assert status["status"] == "failed" and (status["epoch"], status["iteration"]) == (1, 20)
    assert status["error"] == "OSError: [Errno 28] No space left on device"
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["status", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{cfg.run_id} " in out and " failed " in out and "stopped" not in out
    assert f"{cfg.run_id}: failed at iteration {status['iteration']}: OSError: [Errno 28] No space left on device" in out


def test_an_error_that_is_not_the_users_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the library's user errors become one line and exit code 2: a ValueError from deep in
    training (a DDP run's, say) is raised as it is."""
    def broken(*args, **kwargs):
        raise ValueError("an internal error")

    monkeypatch.setattr(study.train, "run_all", broken)
    with pytest.raises(ValueError, match="an internal error"):
        main([*RUN, "--runs-dir", str(tmp_path), "--device", "cpu"])


def test_a_slurm_task_pickled_before_the_plan_trains_with_its_flags(tmp_path):
    """A task requeued across an upgrade (pickled with its flags as attributes) unpickles with them
    as its plan."""
    old = study.launch.SlurmTask.__new__(study.launch.SlurmTask)
    old.__dict__.update(cfg=RunConfig(arch="plain", depth=8), runs_dir=str(tmp_path), data_dir=None, device="cpu",
                        compile=True, cuda_graph=False, sync_bn=False, workers=3, decode="cpu")
    task = pickle.loads(pickle.dumps(old))
    assert task.plan == ExecutionPlan(device="cpu", compile=True, workers=3)
    assert task.tensorboard is None and not hasattr(task, "compile")


def test_a_device_torch_refuses_is_named_in_one_readable_line(monkeypatch):
    """torch's reason for refusing a device can run to many lines and thousands of characters (its backend
    lists): the error keeps its first line, cut to a readable length."""
    import torch

    from study.config import ConfigError
    from study.train import resolve_device

    def refuse(*args, **kwargs):
        raise RuntimeError("Could not run 'aten::empty.memory_format' with arguments from the 'XPU' backend. "
                           + "x" * 2000 + "\nsecond line")

    monkeypatch.setattr(torch, "empty", refuse)
    with pytest.raises(ConfigError) as e:
        resolve_device("xpu")
    message = str(e.value)
    assert "\n" not in message and len(message) < 250, message
    assert message.startswith("--device xpu cannot be used here (Could not run 'aten::empty.memory_format'")
    assert message.endswith("...); use --device auto, cpu or cuda"), message
