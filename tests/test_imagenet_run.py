"""ImageNet runs end to end: `study run` on a tiny ImageFolder of real JPEGs through the real loader,
then `study plot fig4` from their logs; the plateau schedule; mid-epoch resume of the loader."""

import contextlib
import gc
import json

import pandas as pd
import pytest
import torch

from study.cli import main
from study.config import ConfigError, RunConfig
from study.data import imagenet
from study.data.imagenet import loaders_for, open_imagenet, set_epoch
from study.train import Schedule

from helpers import TIMING_COLUMNS
from test_imagenet import write_image_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # 3 training images at batch 2: 2 steps per epoch, so 3 iterations log a full and a partial
    # epoch; 6 validation images. (ResNet-34 at 224x224 costs CPU seconds per image.)
    root = write_image_folder(tmp_path_factory.mktemp("imagenet"), per_class=(1, 2))
    runs = tmp_path_factory.mktemp("runs")
    args = ["run", "--grid", "degradation-imagenet", "--data-dir", str(root), "--iterations", "3",
            "--batch-size", "2", "--workers", "1", "--device", "cpu", "--runs-dir", str(runs), "--no-progress"]
    assert main(args) == 0
    return root, runs


def test_grid_trains_every_imagenet_net_and_logs_train_and_val(trained):
    root, runs = trained
    ids = sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert ids == sorted(f"imagenet-{a}{d}-A-s0-it3-b2" for a in ("plain", "resnet") for d in (18, 34))
    # Beside them, the training set's per-pixel mean, computed once for the whole grid.
    assert [p.name.startswith(".imagenet-pixel-mean-") for p in runs.iterdir() if not p.is_dir()] == [True]
    for run_id in ids:
        m = pd.read_parquet(runs / run_id / "metrics.parquet")
        assert list(m["split"]) == ["train", "val", "train", "val"]
        assert list(m["iteration"]) == [2, 2, 3, 3] and list(m["epoch"]) == [1, 1, 2, 2]
        val = m[m["split"] == "val"]
        # 3 classes: top-5 always contains the label; top-1 error is a share of the 6 val images.
        assert (val["top5_error_pct"] == 0).all()
        assert all(round(e * 6 / 100, 6).is_integer() for e in val["error_pct"])
        # Epoch 1 saw all 3 training images, the partial epoch 2 its first batch of 2.
        train = m.loc[m["split"] == "train", "error_pct"].tolist()
        assert round(train[0] * 3 / 100, 6).is_integer() and round(train[1] * 2 / 100, 6).is_integer()
        assert not (runs / run_id / "responses.parquet").exists()  # Figure 7 is a CIFAR figure
        # The class count (here 3 folders) is recorded: the report's chance level depends on it. So is
        # what decoded the training views (partial decoding, or PIL when _jpegcrop was not built).
        provenance = json.loads((runs / run_id / "config.json").read_text())["provenance"]
        assert provenance["classes"] == 3 and provenance["views"] == imagenet.views_decoder("cpu")
        assert ("libjpeg" in provenance["views"]) == (imagenet.partial_decoding() is not None)
        # What it read: the root, its classes and the images of each split (not hashed: 1.3 million files).
        assert provenance["data"] == {"dir": str(root.absolute()), "classes": 3, "images": {"train": 3, "val": 6}}


def test_fig4_and_table2_from_the_imagenet_logs(trained, tmp_path, capsys):
    _, runs = trained
    assert main(["status", "--runs-dir", str(runs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:-1]  # between the header and the footer
    assert len(lines) == 4 and all(line.split()[4] != "-" for line in lines)  # the validation error
    assert main(["plot", "fig4", "--runs-dir", str(runs), "--out", str(tmp_path)]) == 0
    assert any(p.name.startswith("fig4") and p.stat().st_size > 0 for p in tmp_path.iterdir())
    assert main(["table", "table2", "--runs-dir", str(runs)]) == 0
    assert "ResNet-34" in capsys.readouterr().out


def test_a_finished_imagenet_run_is_skipped_and_bad_data_is_one_line(trained, tmp_path, capsys):
    root, runs = trained
    args = ["run", "--arch", "plain", "--depth", "18", "--dataset", "imagenet", "--iterations", "3",
            "--batch-size", "2", "--workers", "1", "--device", "cpu", "--runs-dir", str(runs), "--no-progress"]
    assert main([*args, "--data-dir", str(root)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert main([*args, "--data-dir", str(tmp_path / "nowhere"), "--runs-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data-dir" in err
    assert not (tmp_path / "r").exists()
    # A batch larger than train/'s 3 images: every step would be the whole split, not a batch of 4.
    big = ["run", "--arch", "plain", "--depth", "18", "--dataset", "imagenet", "--iterations", "3", "--batch-size", "4",
           "--workers", "1", "--device", "cpu", "--data-dir", str(root), "--runs-dir", str(tmp_path / "r"), "--no-progress"]
    assert main(big) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(
        "--batch-size 4 is larger than imagenet's training split of 3 images; use at most 3"), err
    assert not (tmp_path / "r").exists()


def test_plateau_schedule_divides_by_ten_after_patience_and_restores():
    cfg = RunConfig("resnet", 18, dataset="imagenet", plateau_patience=2)
    assert cfg.lr_schedule == "plateau" and cfg.iterations == 600_000 and cfg.batch_size == 256
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = Schedule(cfg, opt)
    lrs = []
    for err in [50.0, 40.0, 39.95, 39.97, 39.99, 39.85, 39.9, 39.9]:  # improving means by > 0.1 points
        schedule.end_epoch(err)
        lrs.append(round(schedule.lr(0, False), 6))
    # No improvement after 40.0: the third such epoch (more than patience 2) divides by 10; 39.85
    # then improves on 39.99 and restarts the count.
    assert lrs == [0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01]
    copy = Schedule(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr))
    copy.opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"]  # the optimizer's own state holds it
    copy.load_state_dict(schedule.state_dict())
    for s in (schedule, copy):
        for err in [39.9, 39.9, 39.9]:
            s.end_epoch(err)
    assert schedule.lr(0, False) == copy.lr(0, False) == pytest.approx(0.001)


def test_imagenet_config_validation():
    with pytest.raises(ConfigError, match="depth 18 or 34"):
        RunConfig("resnet", 20, dataset="imagenet")
    with pytest.raises(ConfigError, match="ImageNet only"):
        RunConfig("resnet", 20, dataset="cifar10", lighting=0.1)
    assert RunConfig("resnet", 34, dataset="imagenet", shortcut="B", lighting=0.0).run_id == "imagenet-resnet34-B-s0-light0"
    assert RunConfig("resnet", 20, dataset="cifar10", lr_schedule="plateau").run_id == "cifar10-resnet20-A-s0-plateau"
    assert RunConfig("resnet", 34, dataset="imagenet", mean="channel").run_id == "imagenet-resnet34-A-s0-channelmean"
    with pytest.raises(ConfigError, match="--mean applies to ImageNet only"):
        RunConfig("resnet", 20, dataset="cifar10", mean="channel")


def test_a_resumed_epoch_continues_with_the_images_not_yet_seen(tmp_path):
    data = open_imagenet(write_image_folder(tmp_path))
    loader = loaders_for(data, batch_size=4, workers=0, seed=3).train
    set_epoch(loader, 2)
    whole = list(loader.sampler)
    set_epoch(loader, 2, skip_batches=2)
    assert list(loader.sampler) == whole[8:] and len(loader) == 3  # 10 of 18 images left: 3 batches
    set_epoch(loader, 3)
    assert len(list(loader.sampler)) == 18 and list(loader.sampler) != whole


@contextlib.contextmanager
def no_worker_left_behind():
    """Fails if a DataLoader worker started inside the block is still alive after it, with the
    garbage collector off: stopping the workers of a failed iteration must not wait for a collection
    (an error's traceback cycle keeps its iterator alive; at exit that hung the process)."""
    def alive() -> set[int]:
        return {id(it) for it in list(imagenet._LIVE_ITERATORS) if any(w.is_alive() for w in it._workers)}

    before = alive()
    gc.disable()
    try:
        yield
        assert alive() - before == set(), "a loader's workers outlived the error that ended its iteration"
    finally:
        gc.enable()


def test_an_unreadable_image_met_during_training_is_one_line_exit_2(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", per_class=(1, 1))
    # Not the first file: the up-front check decodes each split's first file.
    bad = sorted((root / "train").glob("*/*.JPEG"))[-1]
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")  # found only when a worker decodes it
    runs = tmp_path / "runs"
    args = ["run", "--arch", "resnet", "--depth", "18", "--dataset", "imagenet", "--iterations", "3",
            "--batch-size", "3", "--workers", "1", "--device", "cpu", "--runs-dir", str(runs), "--no-progress",
            "--data-dir", str(root)]
    # The per-pixel mean's pass over train/ meets it first, before any run has started.
    with no_worker_left_behind():
        assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot decode image" in err and bad.name in err
    assert not runs.exists()  # nothing half-written: the runs dir this command made goes again
    # A runs dir that was there (with another grid's runs, say) stays, as it was.
    runs.mkdir()
    (runs / "other").mkdir()
    with no_worker_left_behind():
        assert main(args) == 2
    assert [p.name for p in runs.iterdir()] == ["other"] and "cannot decode image" in capsys.readouterr().err
    (runs / "other").rmdir()
    # With the per-channel mean there is no such pass: the run meets it and is marked failed.
    with no_worker_left_behind():
        assert main([*args, "--mean", "channel"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot decode image" in err and bad.name in err
    (run_dir,) = runs.iterdir()
    status = __import__("json").loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "\n" not in status["error"]


def test_an_unreadable_val_image_is_one_line_exit_2_up_front_or_when_the_run_validates(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", per_class=(1, 1))
    first, *_, last = sorted((root / "val").glob("*/*.JPEG"))
    runs = tmp_path / "runs"
    args = ["run", "--arch", "resnet", "--depth", "18", "--dataset", "imagenet", "--iterations", "1",
            "--batch-size", "3", "--workers", "1", "--device", "cpu", "--runs-dir", str(runs), "--no-progress",
            "--data-dir", str(root)]
    # val/'s first file is decoded up front, as train/'s is: before any run (or the runs dir) exists.
    good = first.read_bytes()
    first.write_bytes(b"\xff\xd8 this is not a JPEG")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot decode image" in err and first.name in err, err
    assert not runs.exists()
    first.write_bytes(good)
    # Any other is met by a worker when the run validates (after its one training step): the same
    # one line as in training, and the failed run's status holds that line, not the worker's traceback.
    last.write_bytes(b"\xff\xd8 this is not a JPEG")
    with no_worker_left_behind():
        assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"study: error: cannot decode image {last}"), err
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == "DataError: " + err.removeprefix("study: error: ")
    assert main(["status", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "worker process" not in out and "Traceback" not in out
    assert [line for line in out.splitlines() if last.name in line] == [f"{run_dir.name}: failed at iteration 1: {status['error']}"]


def test_a_run_whose_validation_meets_an_unreadable_image_keeps_the_epoch_and_resumes_exactly(tmp_path, capsys,
                                                                                             monkeypatch):
    """The epoch's training before a failed validation is checkpointed: fixed, the same command
    validates that epoch and goes on, to the metrics and gradients of a run that never failed."""
    from study.train import loop

    monkeypatch.setitem(loop.train_steps.__kwdefaults__, "gradient_every", 1)  # every step's gradients
    root = write_image_folder(tmp_path / "data", per_class=(1, 1))  # 3 training images: 2 steps an epoch at batch 2
    last = sorted((root / "val").glob("*/*.JPEG"))[-1]
    args = ["run", "--arch", "resnet", "--depth", "18", "--dataset", "imagenet", "--iterations", "3",
            "--batch-size", "2", "--workers", "1", "--device", "cpu", "--no-progress", "--data-dir", str(root)]
    assert main([*args, "--runs-dir", str(tmp_path / "whole")]) == 0
    good = last.read_bytes()
    last.write_bytes(b"\xff\xd8 this is not a JPEG")
    runs = tmp_path / "runs"
    with no_worker_left_behind():
        assert main([*args, "--runs-dir", str(runs)]) == 2
    assert f"cannot decode image {last}" in capsys.readouterr().err
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["iteration"], status["epoch"]) == ("failed", 2, 0)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["iteration"] == 2
    last.write_bytes(good)
    assert main([*args, "--runs-dir", str(runs)]) == 0
    assert "resuming from its checkpoint at iteration 2 of 3" in capsys.readouterr().err
    whole = tmp_path / "whole" / run_dir.name
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"
    resumed, uninterrupted = (pd.read_parquet(d / "metrics.parquet").drop(columns=TIMING_COLUMNS) for d in (run_dir, whole))
    assert len(resumed) == 4  # epoch 1 and the partial epoch 2, training and val rows
    pd.testing.assert_frame_equal(resumed, uninterrupted)
    resumed, uninterrupted = (pd.read_parquet(d / "gradients.parquet") for d in (run_dir, whole))
    assert sorted(set(resumed["iteration"])) == [1, 2, 3]
    pd.testing.assert_frame_equal(resumed, uninterrupted)


def test_a_signal_during_the_per_pixel_mean_pass_ends_it_and_keeps_nothing(tmp_path):
    """The pass over train/ takes an hour on ImageNet: a signal (SIGTERM, Ctrl-C) ends it after the current
    batch, as it ends a training step, instead of after the whole pass; nothing is cached and the runs dir
    this command made goes again. (Under DDP the ranks end the pass together, so it is left to finish.)"""
    import signal

    from helpers import run_all

    from study.stopflag import StopFlag
    from study.train import StopRequested
    from study.train.distributed import SINGLE, Distributed
    from study.train.feeds import pixel_mean_options

    root = write_image_folder(tmp_path / "data", per_class=(1, 1))
    runs = tmp_path / "runs"
    stop = StopFlag()
    stop.signum = signal.SIGTERM  # as graceful_stop's handler sets it
    cfg = RunConfig(arch="resnet", depth=18, dataset="imagenet", iterations=1, batch_size=3)
    with pytest.raises(StopRequested) as stopped:
        run_all([cfg], runs, data_dir=str(root), device="cpu", workers=0, stop=stop, progress=False)
    assert stopped.value.signum == signal.SIGTERM and not stopped.value.checkpointed
    assert not runs.exists()  # no cache of a mean made from a part of train/, and no runs dir
    # Wired for one process; a DDP rank gets no stop (the others would wait for it in all_reduce).
    assert pixel_mean_options(0, torch.device("cpu"), SINGLE, False, print, stop)["stop"] is not None
    ddp = Distributed(world=2, rank=0, local_rank=0)
    assert pixel_mean_options(0, torch.device("cpu"), ddp, False, print, stop)["stop"] is None
