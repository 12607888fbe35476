"""Probes: hooked layer responses equal the ones computed by running the layers by hand, hooks change
nothing and are removed; gradient norms are the real ones, recorded without a host sync, and their
file survives resume (rows past the checkpoint are dropped)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from study.config import RunConfig
from study.data import Data, Split, dataset_info, normalize
from study.models import build_model
from study.probes import (
    GradientNorms,
    append_gradients,
    conv3x3_bns,
    layer_responses,
    record_responses,
    response_hooks,
    truncate_gradients,
)
from study.runstore import Run


@pytest.fixture(scope="module")
def data() -> Data:
    """37 random 1x12x12 images: with batches of 10 the last batch is partial."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 1, 12, 12), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (37,), generator=gen)
    split = Split(images, labels)
    mean = images.float().div(255).mean(0)
    return Data(dataset_info("fashion-mnist-mini"), split, Split(images.flip(0), labels.flip(0)), "test", mean)


def net(arch: str, depth: int = 14, shortcut: str = "A") -> torch.nn.Module:
    """A net with non-trivial BN statistics and affine parameters, so eval-mode BN is not ~identity."""
    torch.manual_seed(1)
    model = build_model(arch, depth, shortcut=shortcut, in_channels=1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def by_hand(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every 3x3 layer's BN output, computed by calling the layers one after another."""
    outs = {}
    h = model.bn1(model.conv1(x))
    outs["bn1"] = h
    h = F.relu(h)
    for stage in ("stage1", "stage2", "stage3"):
        for i, block in enumerate(getattr(model, stage)):
            a = block.bn1(block.conv1(h))
            b = block.bn2(block.conv2(F.relu(a)))
            outs[f"{stage}.{i}.bn1"], outs[f"{stage}.{i}.bn2"] = a, b
            h = F.relu(b + block.shortcut(h) if block.shortcut is not None else b)
    return outs


@pytest.mark.parametrize("arch,shortcut", [("plain", "A"), ("resnet", "A"), ("resnet", "B")])
@pytest.mark.parametrize("reduction", ["tensor", "channel"])
def test_hooked_std_equals_std_of_layers_run_by_hand(data, arch, shortcut, reduction):
    model = net(arch, shortcut=shortcut)
    got = layer_responses(model, data, reduction=reduction, include_first=True, batch_size=10)
    with torch.no_grad():
        outs = by_hand(model, normalize(data.eval.images, data.mean))
    if reduction == "tensor":
        expected = {k: v.double().std().item() for k, v in outs.items()}
    else:
        expected = {k: v.double().transpose(0, 1).flatten(1).std(1).mean().item() for k, v in outs.items()}
    # 14 layers: the first conv and 2 x 3 x 2 block convs; a projection shortcut's BN is not one.
    assert list(got.layer_name) == list(expected) and len(got) == 13
    assert list(got.layer_index) == list(range(1, 14))
    assert got["std"].tolist() == pytest.approx(list(expected.values()), rel=1e-5)
    # The stds differ from layer to layer: the test would notice a mix-up.
    assert got["std"].nunique() == len(got)
    # Each row's γ rms is that layer's BN's: sqrt(mean(weight^2)), computed here from the modules by name.
    bns = dict(model.named_modules())
    scales = [bns[name].weight.double().square().mean().sqrt().item() for name in expected]
    assert got["bn_scale_rms"].tolist() == pytest.approx(scales, rel=1e-12) and got["bn_scale_rms"].nunique() == len(got)


def test_defaults_exclude_the_first_conv_and_use_the_eval_split(data):
    model = net("resnet")
    got = layer_responses(model, data)
    full = layer_responses(model, data, include_first=True)
    assert list(got.layer_index) == list(range(2, 14))
    pd.testing.assert_frame_equal(got.reset_index(drop=True), full.iloc[1:].reset_index(drop=True))
    on_train = layer_responses(model, data, split="train")
    assert not on_train["std"].equals(got["std"])  # the eval split is the flipped copy: other numbers
    few = layer_responses(model, data, max_images=5)
    with torch.no_grad():
        outs = by_hand(model, normalize(data.eval.images[:5], data.mean))
    assert few["std"].iloc[0] == pytest.approx(outs["stage1.0.bn1"].double().std().item(), rel=1e-5)
    with pytest.raises(ValueError, match="split"):
        layer_responses(model, data, split="val")


def test_only_bns_after_3x3_convs_are_hooked():
    names = [name for name, _ in conv3x3_bns(build_model("resnet", 20, shortcut="C"))]
    assert len(names) == 19 and names[0] == "bn1" and all("shortcut" not in n for n in names)


def test_hooks_leave_outputs_bit_identical_and_are_removed(data):
    model = net("resnet")
    x = normalize(data.eval.images, data.mean)
    with torch.no_grad():
        before = model(x)
        with response_hooks(model, reduction="channel") as moments:
            assert sum(len(m._forward_hooks) for m in model.modules()) == 12
            during = model(x)
        after = model(x)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert all(m.count > 0 for m in moments.values())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    # Removed on an exception too.
    with pytest.raises(RuntimeError, match="boom"), response_hooks(model):
        raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_probe_leaves_model_state_and_mode_as_they_were(data, bn_mode):
    model = net("plain")
    model.train()
    model.stage2.eval()  # a mixed state must come back exactly
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    layer_responses(model, data, bn_mode=bn_mode, batch_size=10)
    assert {n: m.training for n, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_train_mode_bn_normalises_each_batch(data):
    """With batch statistics a BN output has std ~ its scale: different from eval mode's."""
    model = net("plain")
    eval_std = layer_responses(model, data, batch_size=37)
    train_std = layer_responses(model, data, bn_mode="train", batch_size=37)
    first = model.stage1[0].bn1
    assert train_std["std"].iloc[0] == pytest.approx(first.weight.abs().mean().item(), rel=0.2)
    assert not eval_std["std"].equals(train_std["std"])


def test_record_responses_writes_parquet_with_options(tmp_path, data):
    cfg = RunConfig(arch="resnet", depth=14, iterations=10)
    run = Run(tmp_path, cfg)
    run.prepare("cpu")
    path = record_responses(run, net("resnet"), data, iteration=7, reduction="channel", max_images=20)
    df = pd.read_parquet(path)
    assert path == run.dir / "responses.parquet"
    assert list(df.columns[:5]) == ["run_id", "layer_index", "layer_name", "std", "bn_scale_rms"]
    assert set(df.run_id) == {cfg.run_id} and len(df) == 12
    assert df[["split", "bn_mode", "reduction", "include_first"]].drop_duplicates().values.tolist() == [
        ["test", "eval", "channel", False]
    ]
    assert df.max_images.tolist() == [20] * 12 and df.probed_iteration.tolist() == [7] * 12
    assert not list(run.dir.glob(".*tmp"))  # written atomically: no temporary left over


def _step(model, data, gen):
    x = normalize(data.train.images[:8], data.mean)
    loss = F.cross_entropy(model(x), data.train.labels[:8])
    model.zero_grad(set_to_none=True)
    loss.backward()


def test_gradient_norms_are_the_real_ones_every_n_iterations(data):
    model = net("plain", depth=8).train()
    grads = GradientNorms(model, every=3)
    expected = {}
    for iteration in range(1, 8):
        _step(model, data, None)
        grads.maybe_record(iteration)
        if iteration % 3 == 0:
            expected[iteration] = [
                torch.linalg.vector_norm(m.weight.grad).item()
                for m in model.modules()
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
            ]
    rows = pd.DataFrame(grads.rows("r"))
    assert sorted(set(rows.iteration)) == [3, 6]
    assert list(rows.columns) == ["run_id", "iteration", "layer_index", "layer_name", "grad_norm"]
    # depth 8: 7 convs and the fc layer, in module order, named by parameter
    first = rows[rows.iteration == 3]
    assert first.layer_name.tolist()[0] == "conv1.weight" and first.layer_name.tolist()[-1] == "fc.weight"
    assert first.layer_index.tolist() == list(range(1, 9))
    for it, norms in expected.items():
        assert rows[rows.iteration == it].grad_norm.tolist() == pytest.approx(norms, rel=1e-6)
    assert grads.rows("r") == []  # the buffer was emptied


def test_recording_does_not_sync_with_the_host(data, monkeypatch):
    model = net("resnet", depth=8).train()
    grads = GradientNorms(model, every=1)
    _step(model, data, None)

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync during maybe_record")

    for name in ("item", "tolist", "cpu", "numpy", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    grads.maybe_record(1)
    monkeypatch.undo()
    assert len(grads.rows("r")) == 8


def test_gradients_file_appends_and_truncates_on_resume(tmp_path):
    run = Run(tmp_path, RunConfig(arch="plain", depth=8, iterations=10))
    run.prepare("cpu")

    def rows(its):
        return [
            {"run_id": "r", "iteration": i, "layer_index": 1, "layer_name": "w", "grad_norm": float(i)} for i in its
        ]

    append_gradients(run, rows([2, 4]))
    append_gradients(run, rows([6, 8]))
    append_gradients(run, [])
    df = pd.read_parquet(run.dir / "gradients.parquet")
    assert df.iteration.tolist() == [2, 4, 6, 8]
    truncate_gradients(run, 5)  # resumed from a checkpoint at iteration 5: rows 6 and 8 are redone
    append_gradients(run, rows([6, 8]))
    df = pd.read_parquet(run.dir / "gradients.parquet")
    assert df.iteration.tolist() == [2, 4, 6, 8]
    truncate_gradients(Run(tmp_path / "none", run.cfg), 3)  # no file yet: nothing to do


def test_an_unreadable_gradients_file_is_set_aside_not_fatal(tmp_path):
    run = Run(tmp_path, RunConfig(arch="plain", depth=8, iterations=10))
    run.prepare("cpu")
    (run.dir / "gradients.parquet").write_bytes(b"not parquet")
    with pytest.warns(UserWarning, match="unreadable"):
        truncate_gradients(run, 5)  # what a resuming run does first
    assert (run.dir / "gradients.parquet.bad").read_bytes() == b"not parquet"
    append_gradients(run, [{"run_id": "r", "iteration": 6, "layer_index": 1, "layer_name": "w", "grad_norm": 1.0}])
    assert pd.read_parquet(run.dir / "gradients.parquet").iteration.tolist() == [6]


def test_probe_checks_every_run_and_the_data_before_writing_any(tmp_path, small_data, capsys):
    """`study probe` over several runs: a run without its checkpoint, or a data set whose files are not there,
    stops the command in one line (exit 2) before any run's responses.parquet is written, not after the runs
    before it were overwritten."""
    import shutil

    from helpers import train_run

    from study.cli import main
    from study.runstore import no_checkpoint

    runs = tmp_path / "runs"
    trained = [Run(runs, RunConfig(arch=arch, depth=8, iterations=3, batch_size=32)) for arch in ("plain", "resnet")]
    for run in trained:
        assert train_run(run.cfg, run, small_data, torch.device("cpu"), progress=False) == "done"
    files = [run.dir / "responses.parquet" for run in trained]
    before = [f.read_bytes() for f in files]  # measured as each run finished (eval mode)
    probe = ["probe", "--runs-dir", str(runs), "--device", "cpu", "--bn-mode", "train", "--max-images", "50"]

    trained[1].checkpoint_path.rename(tmp_path / "aside.pt")  # the last run probed
    capsys.readouterr()
    assert main(probe) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"study: error: {no_checkpoint(trained[1], 'probe it')}\n", err
    assert [f.read_bytes() for f in files] == before
    # A damaged checkpoint is named as damaged, not as gone.
    trained[1].checkpoint_path.write_bytes(b"garbage")
    assert main(probe) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "is done but its checkpoint is unreadable (damaged: checkpoint.pt)" in err, err
    assert [f.read_bytes() for f in files] == before
    (tmp_path / "aside.pt").rename(trained[1].checkpoint_path)

    # A run of the full Fashion-MNIST, probed after the two above, whose files are not in --data-dir.
    full = Run(runs, RunConfig(arch="plain", depth=8, iterations=3, batch_size=32, dataset="fashion-mnist"))
    full.prepare("cpu")
    shutil.copy(trained[0].checkpoint_path, full.checkpoint_path)
    full.set_status("done", iteration=3)
    (tmp_path / "no-data").mkdir()
    assert main([*probe, "--data-dir", str(tmp_path / "no-data")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("study: error: ") and err.count("\n") == 1 and "Fashion-MNIST" in err, err
    assert [f.read_bytes() for f in files] == before and not (full.dir / "responses.parquet").exists()

    full.checkpoint_path.unlink()  # by name, the runs that can be probed are
    assert main([*probe[:1], trained[0].cfg.run_id, *probe[1:]]) == 0
    assert files[0].read_bytes() != before[0] and files[1].read_bytes() == before[1]


def test_probe_skips_runs_whose_responses_with_these_options_are_recorded_unless_forced(tmp_path, small_data, capsys):
    """A finished run records its responses (defaults, on its evaluation split): `study probe` with the same
    options leaves them as they are and says so; --force, other options, or a file without the BN scales
    (an older file) measure again."""
    from helpers import train_run

    from study.cli import main

    runs = tmp_path / "runs"
    run = Run(runs, RunConfig(arch="resnet", depth=8, iterations=3, batch_size=32))
    assert train_run(run.cfg, run, small_data, torch.device("cpu"), progress=False) == "done"
    path = run.dir / "responses.parquet"
    recorded = pd.read_parquet(path)
    probe = ["probe", "--runs-dir", str(runs), "--device", "cpu"]

    def probed(*argv):
        path.touch()
        stamp = path.stat().st_mtime_ns
        capsys.readouterr()
        assert main([*probe, *argv]) == 0
        out = capsys.readouterr().out
        return path.stat().st_mtime_ns != stamp or path.stat().st_ino != inode, out

    inode = path.stat().st_ino
    measured, out = probed()
    assert not measured and out == (f"{run.cfg.run_id}: layer responses of its checkpoint with these options already "
                                    "recorded, skipped (--force measures them again)\n")
    measured, out = probed(run.cfg.run_id)  # by name too
    assert not measured and "skipped" in out
    measured, out = probed("--force")
    assert measured and out == f"{run.cfg.run_id}: layer responses at iteration 3 -> {path}\n"
    assert len(pd.read_parquet(path)) == len(recorded)  # (on the whole embedded test split: the run saw a subset)
    inode = path.stat().st_ino
    measured, _ = probed("--max-images", "50")  # other options: measured, and the file now holds those
    assert measured and set(pd.read_parquet(path)["max_images"]) == {50}
    inode = path.stat().st_ino
    measured, _ = probed()  # the defaults again: what the file holds is not theirs
    assert measured
    pd.read_parquet(path).drop(columns="bn_scale_rms").to_parquet(path)  # a file from before the column
    inode = path.stat().st_ino
    measured, _ = probed()
    assert measured and pd.read_parquet(path)["bn_scale_rms"].notna().all()


def test_a_bare_probe_of_a_holdout_run_measures_its_validation_split_as_the_run_did(tmp_path, capsys):
    """A --holdout run records its responses on `val` when it finishes; `study probe` without --split takes each
    run's own evaluation split, so it skips that run rather than replace them with the test set's."""
    from helpers import train_run

    from study.cli import main
    from study.data import load_data

    runs = tmp_path / "runs"
    run = Run(runs, RunConfig(arch="plain", depth=8, iterations=2, batch_size=32, holdout=True))
    assert train_run(run.cfg, run, load_data(run.cfg.dataset, holdout=True), torch.device("cpu"), progress=False) == "done"
    path = run.dir / "responses.parquet"
    assert set(pd.read_parquet(path)["split"]) == {"val"}
    capsys.readouterr()
    assert main(["probe", "--runs-dir", str(runs), "--device", "cpu"]) == 0
    assert "already recorded, skipped" in capsys.readouterr().out and set(pd.read_parquet(path)["split"]) == {"val"}
    assert main(["probe", "--runs-dir", str(runs), "--device", "cpu", "--split", "test", "--max-images", "100"]) == 0
    assert "layer responses at iteration 2" in capsys.readouterr().out and set(pd.read_parquet(path)["split"]) == {"test"}


def test_probe_says_when_it_falls_back_to_the_previous_checkpoint_and_keeps_a_finished_runs_responses(
        tmp_path, small_data, capsys):
    from helpers import train_run

    from study.cli import main

    runs = tmp_path / "runs"
    run = Run(runs, RunConfig(arch="plain", depth=8, iterations=12, batch_size=32))  # checkpoints at 10 and 12
    assert train_run(run.cfg, run, small_data, torch.device("cpu"), progress=False) == "done"
    kept = (run.dir / "responses.parquet").read_bytes()  # of the final weights, iteration 12
    run.checkpoint_path.write_bytes(run.checkpoint_path.read_bytes()[:1000])
    capsys.readouterr()
    assert main(["probe", "--runs-dir", str(runs), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "checkpoint.pt is unreadable" in err and "using the previous good state, checkpoint.prev.pt" in err, err
    assert "skipped" in out and (run.dir / "responses.parquet").read_bytes() == kept  # not replaced by older weights'
    assert main(["probe", "--runs-dir", str(runs), "--device", "cpu", "--force"]) == 0
    out, err = capsys.readouterr()
    assert "layer responses at iteration 10 ->" in out and err.count("checkpoint.pt is unreadable") == 1, err
