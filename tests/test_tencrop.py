"""`study evaluate` (the paper's 10-crop test of ImageNet runs, into tencrop.json) and Tables 2/3
reading it: one tiny real ImageNet run trained on a generated ImageFolder, evaluated through the CLI."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_analysis import write_run
from test_imagenet import write_image_folder

import study.cli
from study.config import RunConfig
from study.data.imagenet import IMAGENET_MEAN, make_loaders, make_ten_crop_loader, open_imagenet, ten_crop_error
from study.data.imagenet import evaluate as evaluate_centre
from study.models import build_model
from study.analysis.tables import format_cell
from study.runstore import Run
from helpers import train_run

CFG = RunConfig(arch="resnet", depth=18, dataset="imagenet", iterations=2, batch_size=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(ImageNet root, runs dir, run): ResNet-18 trained 2 iterations on 3 classes x 2 images,
    validated on 3 images."""
    base = tmp_path_factory.mktemp("tencrop")
    root = write_image_folder(base / "imagenet", per_class=(2, 1))
    run = Run(base / "runs", CFG)
    assert train_run(CFG, run, open_imagenet(root), torch.device("cpu"), progress=False, workers=0) == "done"
    return root, base / "runs", run


def cli(capsys, *argv):
    code = study.cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def evaluate(capsys, runs, root, *extra):
    return cli(capsys, "evaluate", "--runs-dir", runs, "--data-dir", root, "--workers", 0, "--device", "cpu", *extra)


def direct_ten_crop(run, root):
    """The 10-crop test of the run's checkpoint, computed here without the command, with the
    per-pixel mean the run trained with (from the runs dir's cache)."""
    state = torch.load(run.checkpoint_path, map_location="cpu", weights_only=True)
    model = build_model("resnet", 18, shortcut="A", num_classes=3, dataset="imagenet")
    model.load_state_dict(state["model"])
    cache = torch.load(next(run.dir.parent.glob(".imagenet-pixel-mean-*.pt")), weights_only=True)
    mean = cache["mean"]
    assert cache["images"] == 6 and mean.shape == (3, 224, 224)
    return ten_crop_error(model, make_ten_crop_loader(root, 32, 0), "cpu", mean=mean), state["iteration"]


def files(path):
    """Every file under `path` with its size and modification time: to show nothing was written."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(path).rglob("*") if p.is_file()}


def test_evaluate_writes_the_checkpoints_ten_crop_error_then_skips_and_force_recomputes(trained, capsys, monkeypatch):
    import study.evaluate

    root, runs, run = trained
    path = run.dir / "tencrop.json"
    path.unlink(missing_ok=True)
    # In IEEE fp32 as the runs trained (TF32 off while it works), the caller's TF32 setting back after.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    seen, real = [], study.evaluate.evaluate_run
    monkeypatch.setattr(study.evaluate, "evaluate_run",
                        lambda *a, **k: (seen.append(torch.backends.cudnn.allow_tf32), real(*a, **k))[1])
    code, out, err = evaluate(capsys, runs, root)
    assert code == 0, err
    assert seen == [False] and torch.backends.cudnn.allow_tf32
    record = json.loads(path.read_text())
    expected, iteration = direct_ten_crop(run, root)
    assert (record["loss"], record["top1"], record["top5"]) == tuple(expected)  # equal, not approximately
    assert record["images"] == 3 and record["iteration"] == iteration == 2
    assert record["device"] == "cpu" and record["torch_version"] == torch.__version__ and record["date"]
    row = out.splitlines()[-1]  # the table's row (a log line per computed run comes before the table)
    assert row.startswith(CFG.run_id)
    assert f"{expected.top1:.2f}" in row and f"{expected.top5:.2f}" in row and "computed" in row

    # A current result is kept, not recomputed: planted numbers survive a second call...
    path.write_text(json.dumps({**record, "top1": 12.5, "top5": 1.5}))
    code, out, err = evaluate(capsys, runs, root)
    assert code == 0, err
    assert json.loads(path.read_text())["top1"] == 12.5 and "kept" in out and "12.50" in out
    assert "note:" not in err, err
    # Kept from a test on another folder: kept, with a note saying so and how to test it on this one.
    copy = shutil.copytree(root, root.parent / "imagenet-copy")
    code, out, err = evaluate(capsys, runs, copy)
    assert code == 0 and "kept" in out, err
    assert err == (f"note: {CFG.run_id}: its 10-crop result is kept from a test on {root.resolve()} (3 images), not on "
                   f"--data-dir {copy}; pass --force to test it on {copy}\n"), err
    shutil.rmtree(copy)
    # ... and --force recomputes them.
    code, out, err = evaluate(capsys, runs, root, "--force")
    assert code == 0, err
    assert json.loads(path.read_text())["top1"] == expected.top1 and "computed" in out
    # A result of an older checkpoint than the run's last is recomputed without --force.
    path.write_text(json.dumps({**record, "top1": 12.5, "iteration": 1}))
    code, out, err = evaluate(capsys, runs, root, "--run", CFG.run_id)
    assert code == 0, err
    assert json.loads(path.read_text()) | {"date": None} == record | {"date": None}


def test_the_run_trained_and_validated_with_the_per_pixel_mean(trained):
    """The run's logged centre-crop validation is that of its final weights with the cached mean
    image subtracted, not the per-channel mean."""
    root, runs, run = trained
    state = torch.load(run.checkpoint_path, map_location="cpu", weights_only=True)
    model = build_model("resnet", 18, shortcut="A", num_classes=3, dataset="imagenet")
    model.load_state_dict(state["model"])
    mean = torch.load(next(runs.glob(".imagenet-pixel-mean-*.pt")), weights_only=True)["mean"]
    val = make_loaders(root, 4, 0, pin_memory=False).val
    logged = pd.read_parquet(run.dir / "metrics.parquet").query("split == 'val'").iloc[-1]
    assert logged.loss == pytest.approx(evaluate_centre(model, val, "cpu", mean=mean).loss, rel=1e-6)
    assert logged.loss != pytest.approx(evaluate_centre(model, val, "cpu", mean=IMAGENET_MEAN).loss, rel=1e-6)


def test_table2_and_table3_use_ten_crop_only_once_every_run_has_it_and_say_which_runs(trained, capsys, tmp_path):
    """One seed tested and one not: the table shows both seeds' logged centre-crop `val`, not the
    one's 10-crop beside the other's centre-crop, and names the run to test; once both are tested, both
    10-crop numbers."""
    root, source, _ = trained
    runs = tmp_path / "runs"
    shutil.copytree(source, runs)
    code, out, err = evaluate(capsys, runs, root)
    assert code == 0, err
    tested = json.loads((runs / CFG.run_id / "tencrop.json").read_text())
    logged = pd.read_parquet(runs / CFG.run_id / "metrics.parquet").query("split == 'val'").error_pct.iloc[-1]
    # A second seed without a 10-crop result (same files, its logged val set apart at 50%).
    other = RunConfig(arch="resnet", depth=18, dataset="imagenet", iterations=2, batch_size=4, seed=1)
    shutil.copytree(runs / CFG.run_id, runs / other.run_id)
    (runs / other.run_id / "tencrop.json").unlink()
    cfg_path = runs / other.run_id / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "run_id": other.run_id, "config": other.to_dict()}))
    metrics = pd.read_parquet(runs / other.run_id / "metrics.parquet")
    metrics.loc[metrics.split == "val", "error_pct"] = 50.0
    metrics.assign(run_id=other.run_id, seed=1).to_parquet(runs / other.run_id / "metrics.parquet", index=False)
    (runs / CFG.run_id / "tencrop.json").write_text(json.dumps({**tested, "top1": 12.34, "top5": 1.23}))

    code, out, err = cli(capsys, "table", "table2", "--runs-dir", runs, "--format", "csv")
    assert code == 0, err
    row = pd.read_csv(io.StringIO(out)).set_index("net").loc["ResNet-18"]
    assert row.val_n == 2 and row.tencrop_n == 0
    assert (row.val_best, row.val_mean) == (min(logged, 50.0), (logged + 50.0) / 2)  # both logged, 12.34 unused
    assert f"(tested: {CFG.run_id}): run `study evaluate` for {other.run_id} to show 10-crop numbers" in err
    code, out, err = cli(capsys, "table", "table2", "--runs-dir", runs)
    assert code == 0, err
    resnet18 = next(line for line in out.splitlines() if line.startswith("| ResNet-18"))
    assert resnet18.split("|")[3].strip() == format_cell(2, min(logged, 50.0), (logged + 50.0) / 2,
                                                         pd.Series([logged, 50.0]).std())
    assert "yours are the centre-crop `val` every run logged" in out and "12.34" not in out

    # Both tested: both 10-crop numbers, and the logged 50% nowhere.
    (runs / other.run_id / "tencrop.json").write_text(json.dumps({**tested, "top1": 20.0, "top5": 2.0}))
    code, out, err = cli(capsys, "table", "table2", "--runs-dir", runs, "--format", "csv")
    assert code == 0, err
    row = pd.read_csv(io.StringIO(out)).set_index("net").loc["ResNet-18"]
    assert (row.val_n, row.tencrop_n, row.val_best, row.val_mean) == (2, 2, 12.34, (12.34 + 20.0) / 2)
    assert "10-crop testing, as the paper: every run's final checkpoint, tested by `study evaluate`" in err

    # The markdown table shows the 10-crop number of the tested run: a planted one proves where it comes from.
    shutil.rmtree(runs / other.run_id)
    (runs / CFG.run_id / "tencrop.json").write_text(json.dumps({**tested, "top1": 12.34, "top5": 1.23}))
    code, out, err = cli(capsys, "table", "table2", "--runs-dir", runs)
    assert code == 0, err
    resnet18 = next(line for line in out.splitlines() if line.startswith("| ResNet-18"))
    assert "12.34" in resnet18 and "every run's final checkpoint, tested by `study evaluate`" in out
    assert "yours are what the runs logged" not in out

    # A 10-crop result of an earlier checkpoint is not the final one: the logged val stands, and the note says why.
    (runs / CFG.run_id / "tencrop.json").write_text(json.dumps({**tested, "top1": 12.34, "iteration": 1}))
    code, out, err = cli(capsys, "table", "table2", "--runs-dir", runs)
    assert code == 0, err
    logged = pd.read_parquet(runs / CFG.run_id / "metrics.parquet").query("split == 'val'").error_pct.iloc[-1]
    resnet18 = next(line for line in out.splitlines() if line.startswith("| ResNet-18"))
    assert "12.34" not in resnet18 and f"{logged:.2f}" in resnet18
    assert "scores iteration 1, the run ended at 2" in out


def test_bad_input_is_one_line_exit_2_and_writes_nothing(trained, capsys, tmp_path):
    root, runs, _ = trained
    before = files(runs)
    for argv in (
        ("--data-dir", tmp_path / "nope", "--force"),  # missing data dir (with work to do)
        ("--data-dir", root, "--run", "no-such-run"),
        ("--data-dir", root, "--batch-size", "0"),
        ("--data-dir", root, "--device", "tpu", "--force"),
    ):
        code, out, err = cli(capsys, "evaluate", "--runs-dir", runs, "--workers", 0, *argv)
        assert code == 2 and err.startswith("study: error: ") and len(err.strip().splitlines()) == 1, (argv, err)
        assert out == ""
    assert "--data-dir" in cli(capsys, "evaluate", "--runs-dir", runs, "--data-dir", tmp_path / "nope", "--force")[2]
    # A folder with other classes than the run trained on.
    two = shutil.copytree(root, tmp_path / "two-classes")
    for split in ("train", "val"):
        shutil.rmtree(two / split / "cls_red")
    code, out, err = cli(capsys, "evaluate", "--runs-dir", runs, "--workers", 0, "--data-dir", two, "--force")
    # (named from what the run recorded it read, before any checkpoint is loaded; a run that recorded nothing
    # is refused when its checkpoint's classes do not fit: "trained with 3 classes")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "validated on 3 images of 3 classes" in err, err
    assert "two-classes/val has 2 of 2; pass --data-dir the ImageNet copy the run trained on" in err, err
    assert files(runs) == before
    older = shutil.copytree(runs, tmp_path / "older-runs")  # runs of a version that recorded no data
    for config in older.glob("*/config.json"):
        record = json.loads(config.read_text())
        del record["provenance"]["data"]
        config.write_text(json.dumps(record))
    code, out, err = cli(capsys, "evaluate", "--runs-dir", older, "--workers", 0, "--data-dir", two, "--force")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "trained with 3 classes" in err, err
    # Another copy with the same classes but another validation set (one image more): the run recorded the
    # one it validated on, and a 10-crop result on this one would stand in Tables 2 and 3 for it.
    more = shutil.copytree(root, tmp_path / "one-more")
    first = sorted((more / "val" / "cls_red").iterdir())[0]
    shutil.copy(first, first.with_name("extra.JPEG"))
    code, out, err = cli(capsys, "evaluate", "--runs-dir", runs, "--workers", 0, "--data-dir", more, "--force")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert f"validated on 3 images of 3 classes in {root.absolute()}/val, but {more / 'val'} has 4 of 3" in err, err
    assert files(runs) == before

    # No ImageNet runs: an empty runs dir, and one holding only a CIFAR-style run.
    cifar = tmp_path / "cifar"
    write_run(cifar, "resnet", 20)
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", cifar):
        before = files(tmp_path)
        code, out, err = cli(capsys, "evaluate", "--runs-dir", where, "--data-dir", root)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "no ImageNet runs" in err, err
        assert "study run --arch resnet --depth 18 --dataset imagenet" in err
        assert files(tmp_path) == before
    # A runs dir that is not there: said so, and not created.
    code, out, err = cli(capsys, "evaluate", "--runs-dir", tmp_path / "nothing", "--data-dir", root)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "runs dir" in err and "does not exist" in err, err
    assert not (tmp_path / "nothing").exists()


def test_a_folder_whose_val_classes_are_not_its_train_classes_is_refused_as_study_run_refuses_it(
        trained, capsys, tmp_path):
    from study.data import DataError

    source, runs, _ = trained
    root = shutil.copytree(source, tmp_path / "imagenet")
    # As many classes as the run trained on, so the checkpoint loads: val/ labels would be shifted.
    (root / "val" / "cls_red").rename(root / "val" / "cls_rouge")
    with pytest.raises(DataError) as refused:
        open_imagenet(root)  # what `study run` checks
    before = files(runs)
    code, out, err = evaluate(capsys, runs, root, "--force")
    assert code == 2 and out == "" and err.strip() == f"study: error: {refused.value}", err
    assert "differing in e.g. cls_red, cls_rouge" in err
    assert files(runs) == before  # no tencrop.json, and no per-pixel mean of this folder's train/ cached


def test_a_folder_of_val_alone_gives_the_ten_crop_batches_of_the_whole_folder(trained, tmp_path):
    """The 10-crop test reads val/ alone (a run with a channel mean, or a cached pixel mean, needs no
    train/); train/, where it is there, only checks val/'s class folders."""
    from study.data.imagenet import make_ten_crop_loader

    source, _, _ = trained
    alone = tmp_path / "val-only"
    shutil.copytree(source / "val", alone / "val")
    whole, val_only = (make_ten_crop_loader(root, 4, 0) for root in (source, alone))
    assert val_only.dataset.classes == whole.dataset.classes
    for (a, labels_a), (b, labels_b) in zip(whole, val_only, strict=True):
        assert torch.equal(a, b) and torch.equal(labels_a, labels_b)


def test_an_unreadable_image_met_by_the_ten_crop_test_is_one_line_exit_2(trained, capsys, tmp_path):
    from test_imagenet_run import no_worker_left_behind

    source, runs, run = trained
    root = tmp_path / "imagenet"
    shutil.copytree(source, root)
    # Not the first file: the up-front check decodes each split's first file.
    bad = sorted((root / "val").glob("*/*.JPEG"))[-1]
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    (run.dir / "tencrop.json").unlink(missing_ok=True)
    with no_worker_left_behind():
        code, out, err = cli(capsys, "evaluate", "--runs-dir", runs, "--data-dir", root, "--workers", 1,
                             "--device", "cpu", "--no-progress")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "cannot decode image" in err and bad.name in err, err
    assert not (run.dir / "tencrop.json").exists()


def test_evaluate_subtracts_the_mean_the_run_trained_with_from_another_copy_or_a_folder_of_val_alone(
        trained, capsys, tmp_path):
    """The run recorded the folder it trained on, whose per-pixel mean the runs dir caches: tested from a copy at
    another path whose train/ differs (darkened), or from a folder holding val/ alone, it is tested with that
    mean, so the same checkpoint scores the same; nothing of the copy's train/ is read or cached."""
    from PIL import Image

    source, src_runs, _ = trained
    runs = shutil.copytree(src_runs, tmp_path / "runs")
    code, _, err = evaluate(capsys, runs, source, "--force")
    assert code == 0, err
    reference = json.loads((runs / CFG.run_id / "tencrop.json").read_text())
    darker = shutil.copytree(source, tmp_path / "darker")
    for path in (darker / "train").rglob("*.JPEG"):
        Image.eval(Image.open(path).convert("RGB"), lambda v: v // 3).save(path, "JPEG")
    alone = tmp_path / "val-only"
    shutil.copytree(source / "val", alone / "val")
    caches = sorted(p.name for p in runs.glob(".imagenet-pixel-mean-*.pt"))
    for root in (darker, alone):
        code, _, err = evaluate(capsys, runs, root, "--force")
        assert code == 0, err
        record = json.loads((runs / CFG.run_id / "tencrop.json").read_text())
        assert (record["loss"], record["top1"], record["top5"]) == (reference["loss"], reference["top1"], reference["top5"])
        assert sorted(p.name for p in runs.glob(".imagenet-pixel-mean-*.pt")) == caches  # no pass over its train/


def test_load_model_normalises_with_the_mean_the_run_trained_with_whichever_copy_data_dir_names(trained, tmp_path):
    from PIL import Image

    import study

    source, runs, _ = trained
    darker = shutil.copytree(source, tmp_path / "darker")
    for path in (darker / "train").rglob("*.JPEG"):
        Image.eval(Image.open(path).convert("RGB"), lambda v: v // 3).save(path, "JPEG")
    images = torch.full((1, 3, 224, 224), 128, dtype=torch.uint8)
    expected = study.load_model(CFG.run_id, runs, data_dir=source).preprocess(images)
    caches = sorted(runs.glob(".imagenet-pixel-mean-*.pt"))
    assert torch.equal(study.load_model(CFG.run_id, runs, data_dir=darker).preprocess(images), expected)
    assert torch.equal(study.load_model(CFG.run_id, runs).preprocess(images), expected)  # its recorded folder
    assert sorted(runs.glob(".imagenet-pixel-mean-*.pt")) == caches
