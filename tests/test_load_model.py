"""`study.load_model`: a finished run's network with the normalisation it trained with."""

import json
import shutil

import pytest
import torch

import study
from study.config import ConfigError, RunConfig
from study.data import eval_batches, load_data
from study.runstore import Run
from helpers import run_all, write_small_fashion_mnist


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A ResNet-8 trained for 2 epochs (3 and 2 steps of 32) on real Fashion-MNIST files of 96 training and
    40 test images, its runs dir and its data dir."""
    runs = tmp_path_factory.mktemp("runs")
    data = write_small_fashion_mnist(tmp_path_factory.mktemp("data") / "fashion-mnist")
    cfg = RunConfig(arch="resnet", depth=8, dataset="fashion-mnist", iterations=5, batch_size=32, seed=2)
    assert run_all([cfg], runs, device="cpu", progress=False, log=lambda m: None, data_dir=str(data)) == {cfg.run_id: "done"}
    return runs, cfg, data


def test_the_loaded_model_gives_the_runs_logged_test_error(finished):
    runs, cfg, data = finished
    net = study.load_model(cfg.run_id, runs_dir=runs, data_dir=data)
    assert net.config == cfg and net.iteration == cfg.iterations and not net.model.training
    test = load_data(cfg.dataset, data).eval
    wrong = 0
    with torch.no_grad():
        for images, labels in eval_batches(test, 1000):
            wrong += (net.model(net.preprocess(images)).argmax(1) != labels).sum().item()
    logged = Run(runs, cfg).read_metrics().query("split == 'test'").error_pct.iloc[-1]
    assert 100.0 * wrong / len(test.labels) == logged
    with net.autocast():  # an fp32 run's: off
        assert not torch.is_autocast_enabled("cpu")
    # The same run named by its directory.
    again = study.load_model(runs / cfg.run_id, data_dir=data)
    for k, v in net.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_an_unfinished_run_is_an_error_unless_a_checkpoint_is_named(finished, tmp_path):
    runs, cfg, data = finished
    run = Run(runs, cfg)
    status = json.loads(run.status_path.read_text())
    run.set_status("interrupted", iteration=cfg.iterations)
    try:
        with pytest.raises(ConfigError, match="is interrupted, not done.*checkpoint="):
            study.load_model(cfg.run_id, runs_dir=runs, data_dir=data)
        earlier = study.load_model(cfg.run_id, runs_dir=runs, data_dir=data, checkpoint="checkpoint.prev.pt")
        assert earlier.iteration == 3  # the end of the first epoch (3 batches of 32 of 96 images)
    finally:
        run.status_path.write_text(json.dumps(status))


def test_a_missing_run_or_checkpoint_is_a_one_line_error(finished, tmp_path, capsys):
    runs, cfg, data = finished
    with pytest.raises(ConfigError, match="no run 'nope' in .*study status"):
        study.load_model("nope", runs_dir=runs)
    with pytest.raises(ConfigError, match="has no checkpoint"):
        study.load_model(cfg.run_id, runs_dir=runs, checkpoint="missing.pt")
    # A published copy (results/) holds no weights: the error says so and where to load from.
    from study.publish import publish

    publish(runs, tmp_path / "published", allow_dirty=True, log=lambda _: None)
    with pytest.raises(ConfigError, match="is a published copy, which carries no weights.*point runs_dir= at"):
        study.load_model(cfg.run_id, runs_dir=tmp_path / "published")
    from study.cli import main

    capsys.readouterr()
    assert main(["probe", "--runs-dir", str(tmp_path / "published")]) == 2  # `study probe` says the same
    err = capsys.readouterr().err
    assert "is a published copy, which carries no weights" in err and "point --runs-dir at" in err
    # A run of a runs dir whose checkpoint was deleted is not called a published copy.
    gone = tmp_path / "gone"
    shutil.copytree(runs, gone)
    (gone / cfg.run_id / "checkpoint.pt").unlink()
    with pytest.raises(ConfigError, match="is done but its checkpoint is gone .*move its folder out of the runs dir"):
        study.load_model(cfg.run_id, runs_dir=gone)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable study checkpoint"):
        study.load_model(cfg.run_id, runs_dir=runs, checkpoint=bad)
    # A damaged config.json is named as damaged, with the fix the commands give.
    (gone / cfg.run_id / "config.json").write_text('{"config": {"arch"')
    with pytest.raises(ConfigError, match=r"config.json is unreadable \(not JSON: .*so run .* cannot be read: copy it again"):
        study.load_model(cfg.run_id, runs_dir=gone)


def test_a_bf16_runs_model_under_its_autocast_gives_the_runs_logged_test_loss(tmp_path):
    """A `--precision bf16` run evaluated in bf16: `net.autocast()` puts the loaded model back in it, and the
    test loss, summed as the run summed it, is the logged one to the last bit (in fp32 it is not)."""
    from study.train.step import EVAL_BATCH_SIZE

    data = write_small_fashion_mnist(tmp_path / "data" / "fashion-mnist")
    cfg = RunConfig(arch="resnet", depth=8, dataset="fashion-mnist", iterations=5, batch_size=32, seed=2,
                    precision="bf16")
    assert run_all([cfg], tmp_path / "runs", device="cpu", progress=False, log=lambda m: None,
                   data_dir=str(data)) == {cfg.run_id: "done"}
    net = study.load_model(cfg.run_id, runs_dir=tmp_path / "runs", data_dir=data)
    test = load_data(cfg.dataset, data).eval

    def test_loss(autocast) -> float:
        total = torch.zeros(())
        with torch.no_grad(), autocast:
            for images, labels in eval_batches(test, EVAL_BATCH_SIZE):
                total += torch.nn.functional.cross_entropy(net.model(net.preprocess(images)), labels, reduction="sum")
        return total.item() / len(test.labels)

    logged = Run(tmp_path / "runs", cfg).read_metrics().query("split == 'test'").loss.iloc[-1]
    assert test_loss(net.autocast()) == logged
    assert test_loss(torch.autocast("cpu", enabled=False)) != logged
