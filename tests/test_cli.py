"""The `study` command: every sub-command end to end, and one-line errors with exit code 2 on bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import study.runstore
from study.cli import main
from study.config import RunConfig
from study.runstore import METRIC_COLUMNS, Run


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_run_records_the_data_it_read_and_the_report_warns_when_a_studys_runs_read_different_data(tmp_path, capsys):
    import gzip
    import shutil

    from study.analysis.load import RunData
    from study.analysis.report import mixed_data_notes, run_table, summary_text
    from study.data import load_data
    from study.data.sources import fingerprint
    from study.data.fashion_mnist_mini.build import write_idx

    from helpers import write_small_fashion_mnist

    gz = write_small_fashion_mnist(tmp_path / "gz")
    plain = tmp_path / "plain"  # the same release, unpacked: the same data
    plain.mkdir()
    for f in gz.iterdir():
        with gzip.open(f) as src, open(plain / f.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    other = tmp_path / "other"  # readable, the right shape, but one label changed
    shutil.copytree(gz, other)
    labels = load_data("fashion-mnist", other).train.labels.clone()
    labels[0] = (labels[0] + 1) % 10
    write_idx(other / "train-labels-idx1-ubyte.gz", labels.to(torch.uint8))

    runs = tmp_path / "runs"
    for seed, folder in ((0, gz), (1, plain), (2, other)):
        code, _, err = run_cli(capsys, "run", "--arch", "plain", "--depth", "8", "--dataset", "fashion-mnist",
                               "--iterations", "2", "--batch-size", "32", "--seeds", str(seed), "--data-dir", str(folder),
                               "--runs-dir", str(runs), "--device", "cpu", "--no-progress")
        assert code == 0, err
    source = {seed: json.loads((runs / f"fashion-mnist-plain8-A-s{seed}-it2-b32" / "config.json").read_text())["provenance"]["data"]
              for seed in range(3)}
    # The sha256 of the images and labels as read: the same for gzipped and unpacked files of one release.
    assert source[0]["sha256"] == source[1]["sha256"] == fingerprint(*(lambda d: (d.train, d.eval))(load_data("fashion-mnist", plain)))
    assert source[2]["sha256"] != source[0]["sha256"]
    assert source[0]["dir"] == str(gz.absolute()) and source[1]["dir"] == str(plain.absolute())
    assert source[0]["images"] == {"train": 96, "test": 40}

    data = RunData.load(runs)
    table = run_table(data).set_index("run")
    assert table["data"].to_dict() == {f"fashion-mnist-plain8-A-s{seed}-it2-b32": f"sha256 {source[seed]['sha256'][:12]}"
                                       for seed in range(3)}
    [note] = mixed_data_notes(data)  # one study, two data sets: named, with the runs on each and the fix
    assert summary_text(data).endswith(f" Warning: {note}.")  # the report's first paragraph says so
    assert f"sha256 {source[2]['sha256'][:12]}: fashion-mnist-plain8-A-s2-it2-b32" in note
    assert f"sha256 {source[0]['sha256'][:12]}: fashion-mnist-plain8-A-s0-it2-b32, fashion-mnist-plain8-A-s1-it2-b32" in note
    assert "--data-dir" in note
    shutil.rmtree(runs / "fashion-mnist-plain8-A-s2-it2-b32")
    assert mixed_data_notes(RunData.load(runs)) == []


def test_run_single_net_writes_run_directory_and_status(tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["run", "--arch", "resnet", "--depth", "8", "--iterations", "6", "--batch-size", "32", "--seeds", "0,1"]
    code, out, err = run_cli(capsys, *args, "--runs-dir", str(runs), "--device", "cpu")
    assert code == 0, err
    ids = sorted(p.name for p in runs.iterdir())
    assert ids == ["fashion-mnist-mini-resnet8-A-s0-it6-b32", "fashion-mnist-mini-resnet8-A-s1-it6-b32"]
    run_dir = runs / ids[0]
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "metrics.parquet", "checkpoint.pt", "status.json", "lock", "responses.parquet"}
    umask = os.umask(0)
    os.umask(umask)
    # Written atomically through temporary files, yet with the modes of plainly created files (a
    # runs dir shared by a group stays readable to it).
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in run_dir.iterdir()} == {
        p.name: oct(0o666 & ~umask) for p in run_dir.iterdir()}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["depth"] == 8 and config["config"]["iterations"] == 6
    assert {"package_version", "git_commit", "git_dirty", "torch_version", "device"} <= set(config["provenance"])
    assert config["provenance"]["device"] == "cpu" and config["provenance"]["classes"] == 10
    # What else CPU results depend on: the CPU (its model, and the instruction sets that tell two CPUs
    # of one model name apart) and the thread count.
    prov = config["provenance"]
    assert prov["cpu"] and prov["threads"] == torch.get_num_threads()
    assert prov["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    flags = study.runstore.cpu_flags()  # None where they cannot be read (no /proc/cpuinfo)
    assert prov["cpu_flags"] == ([f for f, on in flags.items() if on] if flags else None)
    assert "hours per run" not in out + err  # short runs: no warning of a long CPU schedule
    df = pd.read_parquet(run_dir / "metrics.parquet")
    assert list(df.columns) == METRIC_COLUMNS and list(df.split) == ["train", "test"]  # 6 iterations < 1 epoch
    # No progress bar (not a terminal): each run's epochs are logged, here its only one; the final
    # line gives the run's last errors.
    train_err, test_err = df.error_pct
    assert f"{ids[0]}: epoch 1, iteration 6 of 6: train error {train_err:.2f}%, test error {test_err:.2f}%" in err
    assert f"{ids[0]}: done (final error: train {train_err:.2f}%, test {test_err:.2f}%)" in out
    assert re.fullmatch(rf"study: 2 runs in {re.escape(str(runs))}: 2 done, after 0:0\d:\d\d; "
                        rf"judge them: study report --runs-dir {re.escape(str(runs))}", out.splitlines()[-1])

    code, out, err = run_cli(capsys, "status", "--runs-dir", str(runs))
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 4 and "also those not started" in lines[-1]  # header, a line per run, the hint
    assert all(line.split()[1] == "done" and "6/6" in line for line in lines[1:3])
    assert f"{df.error_pct.iloc[0]:.2f}" in lines[1]
    # With the run's command line (`run` replaced by `status`; how it trains is ignored): the runs
    # that command trains, those not started yet as `new`.
    code, out, err = run_cli(capsys, "status", *args[1:-1], "0-2", "--runs-dir", str(runs), "--device", "cpu",
                             "--concurrency", "2", "--no-progress")
    lines = out.strip().splitlines()[1:]
    assert code == 0 and [line.split()[:2] for line in lines[:3]] == [
        [f"fashion-mnist-mini-resnet8-A-s{s}-it6-b32", "done" if s < 2 else "new"] for s in range(3)]
    assert lines[2].split()[-1].startswith("~") and lines[3].startswith("(left: about")  # at seeds 0-1's speed
    code, out, err = run_cli(capsys, "status", "--seeds", "0-2", "--runs-dir", str(runs))
    assert code == 2 and "--seeds selects runs of a --grid or an --arch" in err and err.count("\n") == 1
    # Options that change the run ids change the list too: per-device BN over 2 SLURM GPUs is a
    # batch split of 2 (`-bn2`), unless --sync-bn.
    for extra, suffix in (([], "-bn2"), (["--sync-bn"], "")):
        code, out, err = run_cli(capsys, "status", *args[1:], "--runs-dir", str(runs), "--launcher", "slurm",
                                 "--gpus-per-run", "2", *extra)
        assert code == 0, err
        assert [line.split()[0] for line in out.strip().splitlines()[1:3]] == [
            f"fashion-mnist-mini-resnet8-A-s{s}-it6-b32{suffix}" for s in (0, 1)]
        # Runs of another BN split cost as much per step, but none has trained: not guessed at, and said so.
        assert out.strip().splitlines()[3:] == (
            ["(2 runs not estimated (no run of the same depth and settings has trained yet))"] if suffix else []), out
    # An option no command has: one line that points at the command's own help.
    code, out, err = run_cli(capsys, "status", "--runs-dir", str(runs), "--bogus", "1")
    assert code == 2 and err == "study: error: unrecognized arguments: --bogus 1; see `study status --help`\n"

    # Same command again: both runs skipped, exit 0.
    code, out, err = run_cli(capsys, *args, "--runs-dir", str(runs), "--device", "cpu")
    assert code == 0 and out.count("skipped") == 2


def test_status_tells_a_run_whose_process_is_gone_from_one_still_training(tmp_path, capsys):
    """A run left `running` by a killed process (or a failed node) reads `stopped`, with how to
    resume it; one whose process holds its lock still reads `running`."""
    from study.config import RunConfig
    from study.runstore import Run

    run = Run(tmp_path, RunConfig("plain", 8, iterations=6))
    run.prepare("cpu")
    run.set_status("running", iteration=3)
    with run.lock() as held:
        assert held
        code, out, err = run_cli(capsys, "status", "--runs-dir", str(tmp_path))
    assert code == 0 and out.splitlines()[1].split()[1] == "running" and "resumes it" not in out
    code, out, err = run_cli(capsys, "status", "--runs-dir", str(tmp_path))
    lines = out.strip().splitlines()
    assert code == 0 and lines[1].split()[1] == "stopped" and "3/6" in lines[1]
    assert "no process is training it" in lines[2] and "resumes it from its last checkpoint" in lines[2]
    assert run.status()["status"] == "running"  # status only reads


def test_status_says_how_long_each_run_trained_and_has_left(tmp_path, capsys):
    """A run stopped at 100 of 400 iterations after 130 s, 10 of them one-time (compiling): 1.2 s a
    step, so 300 x 1.2 = 6 minutes left. Its seed-1 twin, not started, is estimated at the speed of
    its twins (marked ~): 8 minutes. A finished run has nothing left; the total adds the rest up."""
    import pandas as pd

    from study.config import RunConfig
    from study.runstore import METRIC_COLUMNS, Run

    def ran(seed, iterations, status, at, elapsed, onetime):
        cfg = RunConfig("plain", 8, seed=seed, iterations=iterations, dataset="fashion-mnist-mini")
        run = Run(tmp_path, cfg)
        run.prepare("cpu")
        row = dict.fromkeys(METRIC_COLUMNS)
        row.update(run_id=cfg.run_id, dataset=cfg.dataset, arch="plain", depth=8, shortcut="A", seed=seed, epoch=1,
                   iteration=at, split="train", loss=1.0, error_pct=30.0, lr=0.1, elapsed_s=elapsed, warmup_s=onetime)
        pd.DataFrame([row], columns=METRIC_COLUMNS).to_parquet(run.metrics_path, index=False)
        run.set_status(status, iteration=at)

    ran(0, 400, "interrupted", 100, 130.0, 10.0)
    ran(2, 400, "done", 400, 490.0, 10.0)
    code, out, err = run_cli(capsys, "status", "--arch", "plain", "--depth", "8", "--seeds", "0-2", "--iterations", "400",
                             "--dataset", "fashion-mnist-mini", "--runs-dir", str(tmp_path))
    assert code == 0, err
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:4]}
    s0, s1, s2 = (lines[f"fashion-mnist-mini-plain8-A-s{k}-it400"] for k in range(3))
    assert (s0[1], s0[-2], s0[-1]) == ("interrupted", "2m", "6m")
    assert (s1[1], s1[-2], s1[-1]) == ("new", "-", "~8m")
    assert (s2[1], s2[-2], s2[-1]) == ("done", "8m", "-")
    assert "(left: about 14m in all" in out and "~: at the speed of other runs of the same net" in out

    # A net none of whose runs has trained (the pre-activation ResNet of the same depth and settings)
    # is estimated at the speed of that depth's runs: the plain-8 runs' mean, (1.2 + 1.2) / 2 a step.
    code, out, err = run_cli(capsys, "status", "--arch", "preact", "--depth", "8", "--iterations", "400",
                             "--dataset", "fashion-mnist-mini", "--runs-dir", str(tmp_path))
    assert code == 0, err
    row = out.splitlines()[1].split()
    assert (row[0], row[1], row[-1]) == ("fashion-mnist-mini-preact8-A-s0-it400", "new", "~8m"), out
    assert "of the same depth and settings" in out and "not estimated" not in out
    # A depth no run has trained is not guessed at.
    code, out, err = run_cli(capsys, "status", "--arch", "preact", "--depth", "14", "--iterations", "400",
                             "--dataset", "fashion-mnist-mini", "--runs-dir", str(tmp_path))
    assert code == 0 and out.splitlines()[1].split()[-1] == "-", out
    assert out.splitlines()[-1] == "(1 run not estimated (no run of the same depth and settings has trained yet))", out

    # The speed of a net's runs is pooled over their iterations: a finished run of 1,600 iterations at
    # 3 s a step counts for its length, (120 + 480 + 4,800) s / 2,100 iterations = 2.57 s a step, so the
    # seed-1 run's 400 iterations: about 17 minutes (a plain mean of the three speeds would say 12).
    ran(5, 1600, "done", 1600, 4810.0, 10.0)
    code, out, err = run_cli(capsys, "status", "--arch", "plain", "--depth", "8", "--seeds", "1", "--iterations", "400",
                             "--dataset", "fashion-mnist-mini", "--runs-dir", str(tmp_path))
    assert code == 0 and out.splitlines()[1].split()[-1] == "~17m", out


def test_status_times_a_run_by_its_last_epochs_not_a_busier_session_before(tmp_path, capsys):
    """A run of 1,000 iterations logged every 100: its first three epochs at 3 s a step (an earlier session
    on busy cores), its last five at 1 s a step, with a resume's 20 s of compiling among them. Its 200
    iterations left take 200 s at its speed now (its whole-run average, 1.75 s a step, would say 350 s)."""
    import pandas as pd

    from study.config import RunConfig
    from study.runstore import METRIC_COLUMNS, Run

    cfg = RunConfig("plain", 8, iterations=1000, dataset="fashion-mnist-mini")
    run = Run(tmp_path, cfg)
    run.prepare("cpu")
    rows, elapsed, onetime = [], 10.0, 10.0  # 10 s of compiling before the first step
    for epoch in range(1, 9):
        elapsed += 300.0 if epoch <= 3 else 100.0
        if epoch == 6:  # resumed here: 20 s more of compiling
            elapsed, onetime = elapsed + 20.0, onetime + 20.0
        for split in ("train", "test"):
            row = dict.fromkeys(METRIC_COLUMNS)
            row.update(run_id=cfg.run_id, dataset=cfg.dataset, arch="plain", depth=8, shortcut="A", seed=0, epoch=epoch,
                       iteration=100 * epoch, split=split, loss=1.0, error_pct=30.0, lr=0.1,
                       elapsed_s=elapsed + (2.0 if split == "test" else 0.0), warmup_s=onetime)  # test: after evaluating
            rows.append(row)
    pd.DataFrame(rows, columns=METRIC_COLUMNS).to_parquet(run.metrics_path, index=False)
    run.set_status("interrupted", iteration=800)
    code, out, err = run_cli(capsys, "status", "--runs-dir", str(tmp_path))
    assert code == 0, err
    assert out.splitlines()[1].split()[-1] == "3m", out  # 200 x 1.0 s (the average: 6m)
    assert "at its own speed over its last 5 epochs" in out, out


def test_recent_speed_times_the_last_clocked_epochs():
    """`recent_speed`: fewer than 5 epochs, from the start (one-time cost left out); an epoch without a clock
    does not count in the window (its start is the clocked epoch before); metrics without `warmup_s`; a last
    epoch without a clock: unknown."""
    import pandas as pd

    from study.runstore import recent_speed

    def metrics(clocks, onetime=10.0):
        rows = [{"iteration": 100 * (k + 1), "split": split, "elapsed_s": clock + (1.0 if split == "test" else 0.0),
                 "warmup_s": onetime} for k, clock in enumerate(clocks) for split in ("train", "test")]
        return pd.DataFrame(rows)

    assert recent_speed(metrics([110.0, 210.0, 310.0])) == (310.0 + 1.0 - 10.0, 300)  # 3 epochs: all (to the end of the last evaluation), less compiling
    nan = float("nan")
    # 8 epochs, the 3rd without a clock: the window is the last 5 clocked (from epoch 2's end at 220 s).
    got = recent_speed(metrics([120.0, 220.0, nan, 420.0, 520.0, 620.0, 720.0, 820.0]))
    assert got == (820.0 - 220.0, 800 - 200)
    assert recent_speed(metrics([110.0, 210.0]).drop(columns="warmup_s")) == (211.0, 200)
    assert recent_speed(metrics([110.0, nan])) is None
    assert recent_speed(pd.DataFrame(columns=["iteration", "split", "elapsed_s"])) is None


def test_status_pools_speeds_over_runs_weighted_by_how_long_each_trained(tmp_path, capsys):
    """A finished run of 100 epochs at 1 s a step and a 3-epoch run at 3 s a step (trained beside more
    others): a new run of the net is estimated at (100 x 1 x 100 + 3 x 3 x 100) / 10,300 = about 1.06 s a step
    (each run's speed over its last epochs, weighted by its length), not at 1.75 (their last epochs alone)."""
    import pandas as pd

    from study.config import RunConfig
    from study.runstore import METRIC_COLUMNS, Run

    def ran(seed, epochs, per_step, status):
        cfg = RunConfig("plain", 8, seed=seed, iterations=100 * epochs, dataset="fashion-mnist-mini")
        run = Run(tmp_path, cfg)
        run.prepare("cpu")
        rows = []
        for epoch in range(1, epochs + 1):
            row = dict.fromkeys(METRIC_COLUMNS)
            row.update(run_id=cfg.run_id, dataset=cfg.dataset, arch="plain", depth=8, shortcut="A", seed=seed,
                       epoch=epoch, iteration=100 * epoch, split="train", loss=1.0, error_pct=30.0, lr=0.1,
                       elapsed_s=per_step * 100 * epoch, warmup_s=0.0)
            rows.append(row)
        pd.DataFrame(rows, columns=METRIC_COLUMNS).to_parquet(run.metrics_path, index=False)
        run.set_status(status, iteration=100 * epochs)

    ran(0, 100, 1.0, "done")
    ran(1, 3, 3.0, "done")
    code, out, err = run_cli(capsys, "status", "--arch", "plain", "--depth", "8", "--seeds", "2", "--iterations", "6000",
                             "--dataset", "fashion-mnist-mini", "--runs-dir", str(tmp_path))
    assert code == 0, err
    assert out.splitlines()[1].split()[-1] == "~1h46m", out  # 6,000 x 1.0602 s = 6,361 s


def test_status_estimates_the_wall_time_of_runs_trained_side_by_side(tmp_path, capsys):
    """Two runs training now (their processes hold their locks), 6 and 4 minutes left at 1.2 s a step, and
    one waiting, 8 minutes at their speed: side by side the waiting run starts when the 4-minute one ends,
    so 12 minutes of wall time, against 18 in all."""
    import pandas as pd

    from study.config import RunConfig
    from study.runstore import METRIC_COLUMNS, Run

    def ran(seed, at, elapsed):
        cfg = RunConfig("plain", 8, seed=seed, iterations=400, dataset="fashion-mnist-mini")
        run = Run(tmp_path, cfg)
        run.prepare("cpu")
        row = dict.fromkeys(METRIC_COLUMNS)
        row.update(run_id=cfg.run_id, dataset=cfg.dataset, arch="plain", depth=8, shortcut="A", seed=seed, epoch=1,
                   iteration=at, split="train", loss=1.0, error_pct=30.0, lr=0.1, elapsed_s=elapsed, warmup_s=10.0)
        pd.DataFrame([row], columns=METRIC_COLUMNS).to_parquet(run.metrics_path, index=False)
        run.set_status("running", iteration=at)
        return run

    first, second = ran(0, 100, 130.0), ran(1, 200, 250.0)
    argv = ("status", "--arch", "plain", "--depth", "8", "--seeds", "0-2", "--iterations", "400",
            "--dataset", "fashion-mnist-mini", "--runs-dir", str(tmp_path))
    with first.lock() as a, second.lock() as b:
        assert a and b
        code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "(left: about 18m in all" in out and "with 2 trained side by side as now, about 12m of wall time" in out, out
    code, out, err = run_cli(capsys, *argv)  # no process trains them: no side-by-side estimate
    assert code == 0 and "(left: about 18m in all" in out and "side by side as now" not in out, out

    # A failed run is left out of both estimates (a process training now may or may not take it up again;
    # a waiting seed-3 run would have made them 26m in all and 20m of wall time), and the line says so.
    failed = ran(3, 0, 0.0)
    failed.set_status("failed", iteration=0, error="RuntimeError: boom")
    argv = (*argv[:6], "0-3", *argv[7:])
    with first.lock() as a, second.lock() as b:
        assert a and b
        code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "(left: about 18m in all" in out and "side by side as now, about 12m of wall time" in out, out
    assert "1 failed run not counted" in out and "fashion-mnist-mini-plain8-A-s3-it400: failed at iteration 0" in out, out
    # With nothing else left to train, the failed run is still counted out loud.
    code, out, err = run_cli(capsys, "status", "--arch", "plain", "--depth", "8", "--seeds", "3", "--iterations", "400",
                             "--dataset", "fashion-mnist-mini", "--runs-dir", str(tmp_path))
    assert code == 0 and "left: about" not in out and "(1 failed run not counted: `study run` with the same" in out, out


def test_status_names_the_machines_behind_its_estimates_and_this_cpu_where_it_differs(tmp_path, capsys, monkeypatch):
    """A bf16 run finished on a CPU with AMX (its config.json says so) estimates its twin's time; on a CPU
    that is not that one, the line says what this CPU is, and, where it has no bf16 units, that bf16 is
    emulated here. On the CPU the run trained on, the line names it and says no more; a GPU's speed is
    named but not set against this CPU."""
    from study.cli import listing
    from study.config import RunConfig
    from study.runstore import Run

    def ran(seed, status, at, where):
        cfg = RunConfig("resnet", 8, seed=seed, iterations=400, dataset="fashion-mnist-mini", precision="bf16")
        run = Run(tmp_path, cfg)
        run.prepare("cpu")
        record = json.loads(run.config_path.read_text())
        record["provenance"].update(where)
        run.config_path.write_text(json.dumps(record))
        row = dict.fromkeys(METRIC_COLUMNS)
        row.update(run_id=cfg.run_id, dataset=cfg.dataset, arch="resnet", depth=8, shortcut="A", seed=seed, epoch=1,
                   iteration=at, split="train", loss=1.0, error_pct=30.0, lr=0.1, elapsed_s=1.2 * at, warmup_s=0.0)
        pd.DataFrame([row], columns=METRIC_COLUMNS).to_parquet(run.metrics_path, index=False)
        run.set_status(status, iteration=at)

    xeon = {"device": "cpu", "cpu": "Intel Xeon", "cpu_flags": ["avx2", "avx512f", "amx_bf16"], "cpu_capability": "AVX512"}
    ran(0, "done", 400, xeon)
    argv = ("status", "--arch", "resnet", "--depth", "8", "--seeds", "0-1", "--iterations", "400", "--precision", "bf16",
            "--dataset", "fashion-mnist-mini", "--runs-dir", str(tmp_path))

    monkeypatch.setattr(listing, "this_cpu_label", lambda: "AMD EPYC (AVX2)")
    monkeypatch.setattr(listing, "cpu_flags", lambda: {"avx2": True, "avx512f": False, "amx_bf16": False})
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and out.splitlines()[2].split()[-1] == "~8m", out
    assert ("speeds measured on Intel Xeon (AVX512, AMX-BF16); this CPU is AMD EPYC (AVX2), where they may train at "
            "another speed (it has no bf16 units: bf16 is emulated here, many times slower than on a CPU with them))"
            ) in out, out
    monkeypatch.setattr(listing, "cpu_flags", lambda: {"avx2": True, "avx512f": True, "amx_bf16": True})
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "this CPU is AMD EPYC (AVX2), where they may train at another speed)" in out, out
    monkeypatch.setattr(listing, "this_cpu_label", lambda: "Intel Xeon (AVX512, AMX-BF16)")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and out.rstrip().endswith("speeds measured on Intel Xeon (AVX512, AMX-BF16))"), out

    # Measured on another CPU without bf16 units, where bf16 was emulated too: the estimate already counts that.
    record = json.loads((tmp_path / "fashion-mnist-mini-resnet8-A-s0-it400-bf16" / "config.json").read_text())
    record["provenance"].update(cpu="Intel Core", cpu_flags=["avx2"], cpu_capability="AVX2")
    (tmp_path / "fashion-mnist-mini-resnet8-A-s0-it400-bf16" / "config.json").write_text(json.dumps(record))
    monkeypatch.setattr(listing, "cpu_flags", lambda: {"avx2": True, "avx512f": False, "amx_bf16": False})
    monkeypatch.setattr(listing, "this_cpu_label", lambda: "AMD EPYC (AVX2)")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and out.rstrip().endswith(
        "speeds measured on Intel Core (AVX2); this CPU is AMD EPYC (AVX2), where they may train at another speed)"), out

    # A run half-trained on a GPU (its own speed, then) beside the CPU's: both named, this CPU not set against them.
    ran(1, "interrupted", 200, {"device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3"})
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and out.rstrip().endswith("speeds measured on NVIDIA H100 80GB HBM3)"), out


def test_a_damaged_metrics_file_is_named_left_out_and_rewritten_from_the_checkpoint(tmp_path, capsys, monkeypatch):
    """A finished run's metrics.parquet cut short from outside: `status` names it, `plot` and `report` leave
    the run out in one note (no Python warning) and say why it is not drawn, `publish` leaves it out, and
    the run's `study run` command rewrites the file from the run's checkpoint, equal to what it was; a
    copy without a checkpoint says it cannot."""
    import warnings

    import study.runstore

    monkeypatch.setattr(study.runstore, "tree_is_dirty", lambda: False)  # publishable whatever this checkout's state
    runs = tmp_path / "runs"
    train = ["run", "--arch", "plain", "--depth", "8", "--seeds", "0,1", "--iterations", "10", "--batch-size", "64",
             "--runs-dir", str(runs), "--device", "cpu", "--no-progress"]
    code, out, err = run_cli(capsys, *train)
    assert code == 0, err
    damaged = runs / "fashion-mnist-mini-plain8-A-s0-it10-b64" / "metrics.parquet"
    whole = pd.read_parquet(damaged)
    damaged.write_bytes(damaged.read_bytes()[:200])
    why = "its metrics.parquet is unreadable (Parquet magic bytes not found in footer)"

    code, out, err = run_cli(capsys, "status", "--runs-dir", str(runs))
    assert code == 0 and f"fashion-mnist-mini-plain8-A-s0-it10-b64: {why}: run the run's `study run` command" in out, out
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Python warning reaches the user
        code, out, err = run_cli(capsys, "plot", "fig6", "--runs-dir", str(runs), "--out", str(tmp_path / "fig"))
        assert code == 0, err
        assert err.splitlines() == [f"note: {damaged} is unreadable (Parquet magic bytes not found in footer), so its "
                                    "rows are left out: run the run's `study run` command again, which rewrites its "
                                    "metrics from its checkpoint"], err
        assert "fig6: metrics.parquet unreadable, so not drawn: plain-8 s0 (done)" in out, out
        code, out, err = run_cli(capsys, "report", "--runs-dir", str(runs), "--out", str(tmp_path / "rep" / "report.md"))
        assert code == 0 and err.startswith(f"note: {damaged} is unreadable"), err
        assert f"{damaged} is unreadable (Parquet magic bytes not found in footer)" in (tmp_path / "rep" / "report.md").read_text()
    code, out, err = run_cli(capsys, "publish", "--runs-dir", str(runs), "--out", str(tmp_path / "pub"))
    assert code == 0 and f"fashion-mnist-mini-plain8-A-s0-it10-b64: left out: {why}" in out, out
    assert sorted(p.name for p in (tmp_path / "pub").iterdir()) == ["fashion-mnist-mini-plain8-A-s1-it10-b64"]

    # A published copy keeps no checkpoint: its metrics cannot be rebuilt there, and the line says what to do.
    copy = tmp_path / "pub" / "fashion-mnist-mini-plain8-A-s1-it10-b64" / "metrics.parquet"
    copy.write_bytes(b"garbage")
    code, out, err = run_cli(capsys, *train[:11], "--seeds", "1", "--runs-dir", str(tmp_path / "pub"), "--device", "cpu",
                             "--no-progress")
    assert code == 0 and ("its metrics.parquet is unreadable (Parquet file size is 7 bytes, smaller than the minimum "
                          "file footer (8 bytes)), and no checkpoint of its last iteration holds its rows") in out, out

    code, out, err = run_cli(capsys, *train)
    assert code == 0 and f"fashion-mnist-mini-plain8-A-s0-it10-b64: {why}: rewritten from its checkpoint" in out, out
    pd.testing.assert_frame_equal(pd.read_parquet(damaged), whole)
    code, out, err = run_cli(capsys, *train)  # nothing left to mend
    assert code == 0 and "rewritten" not in out and out.count("done, skipped") == 2, out

    # A diverged run's last rows were never checkpointed: nothing is rewritten, and every line says what to do.
    other = study.runstore.Run(runs, study.runstore.RunConfig.from_dict(
        json.loads((damaged.parent.parent / "fashion-mnist-mini-plain8-A-s1-it10-b64" / "config.json").read_text())["config"]))
    other.set_status("diverged", iteration=7)
    other.metrics_path.write_bytes(b"garbage")
    fix = "a diverged run's last rows are in no checkpoint: copy the file again if the run trained elsewhere, or move"
    code, out, err = run_cli(capsys, *train)
    assert code == 1 and f"{other.cfg.run_id}: its metrics.parquet is unreadable (Parquet file size is 7 bytes" in out, out
    assert fix in out and other.metrics_path.read_bytes() == b"garbage", out
    code, out, err = run_cli(capsys, "status", "--runs-dir", str(runs))
    assert fix in out, out


def test_the_summary_names_the_study_to_judge_where_the_runs_dir_holds_others(tmp_path):
    """`study run`'s last line names the `study report` that judges its runs: with their study's choosers where
    the runs dir holds another study too (the report would judge the one closest to the paper), and those
    choosers parse."""
    from study.cli import build_parser
    from study.cli.run import report_command

    paper = RunConfig("resnet", 8, iterations=6, batch_size=32)
    other = RunConfig("resnet", 8, iterations=6, batch_size=32, holdout=True, precision="bf16")
    Run(tmp_path, paper).prepare("cpu")
    assert report_command([paper], str(tmp_path)) == f"study report --runs-dir {tmp_path}"
    Run(tmp_path, other).prepare("cpu")
    assert report_command([paper, other], str(tmp_path)) == f"study report --runs-dir {tmp_path}"  # two studies: the report's
    for cfg, tail in ((paper, "--no-holdout --variant paper"), (other, "--holdout --variant bf16")):
        command = report_command([cfg], str(tmp_path))
        assert command == f"study report --runs-dir {tmp_path} --dataset fashion-mnist-mini --iterations 6 --batch-size 32 {tail}"
        args = build_parser().parse_args(command.split()[1:])
        assert (args.dataset, args.iterations, args.batch_size, args.holdout) == ("fashion-mnist-mini", 6, 32, cfg.holdout)
    assert report_command([paper], "runs") == "study report"  # the default runs dir (none here)


def test_no_wait_leaves_a_held_run_to_its_process_and_returns(tmp_path, capsys):
    """With --no-wait, a runner trains the runs it can lock and returns, leaving the one another
    process holds (here: this test) to it, untouched; exit 0 for what it did."""
    from study.config import RunConfig
    from study.runstore import Run

    held_run, free_run = (Run(tmp_path, RunConfig("resnet", 8, seed=s, iterations=6, batch_size=32)) for s in (0, 1))
    with held_run.lock() as held:
        assert held
        code, out, err = run_cli(capsys, "run", "--arch", "resnet", "--depth", "8", "--seeds", "0,1", "--iterations", "6",
                                 "--batch-size", "32", "--runs-dir", str(tmp_path), "--device", "cpu", "--no-wait")
    assert code == 0, err
    assert f"{held_run.cfg.run_id}: held by another process; left to it (--no-wait)" in out
    assert f"1 run(s) held by another process, left to it (--no-wait): {held_run.cfg.run_id}" in out
    assert free_run.status()["status"] == "done" and not held_run.config_path.exists()
    # The last line: how the runs ended, the one left to its process counted, and what judges them.
    assert re.fullmatch(rf"study: 2 runs in {re.escape(str(tmp_path))}: 1 done, 1 left to another process, after 0:0\d:\d\d; "
                        rf"judge them: study report --runs-dir {re.escape(str(tmp_path))}", out.splitlines()[-1])


def test_the_papers_schedule_on_a_cpu_is_announced_before_it_starts(tmp_path, capsys, monkeypatch):
    """64k iterations on a CPU are hours per run: one line says so (and how to shorten them) before
    training starts. Runs already done are not counted."""
    import study.train

    started = []
    monkeypatch.setattr(study.train.runner._ListRunner, "run", lambda self: started.extend(self.runs) or {})
    code, out, err = run_cli(capsys, "run", "--arch", "plain", "--depth", "20", "--seeds", "0-2",
                             "--runs-dir", str(tmp_path), "--device", "cpu")
    assert code == 0 and len(started) == 3, err
    assert "note: 3 run(s) with up to 64,000 iterations to train on the CPU: hours per run" in out
    assert "--iterations N" in out
    # Finished runs (done or diverged) are not counted, nor one that has less than 10k to go.
    for run, status, iteration in zip(started, ("done", "diverged", "interrupted"), (64_000, 100, 60_000)):
        run.prepare("cpu")
        run.set_status(status, iteration=iteration)
    code, out, err = run_cli(capsys, "run", "--arch", "plain", "--depth", "20", "--seeds", "0-2",
                             "--runs-dir", str(tmp_path), "--device", "cpu")
    # (exit 1: a run of the command is diverged, which its status says though this stub of the runner trained nothing)
    assert code == 1 and "hours per run" not in out, out
    started[2].set_status("interrupted", iteration=50_000)
    code, out, err = run_cli(capsys, "run", "--arch", "plain", "--depth", "20", "--seeds", "0-2",
                             "--runs-dir", str(tmp_path), "--device", "cpu")
    assert "note: 1 run(s) with up to 14,000 iterations to train" in out
    # `--concurrency`'s worker processes (children of the runner) leave the note to their parent.
    said = []
    study.train.runner._warn_of_long_cpu_runs(started[:3], torch.device("cpu"), said.append)
    assert len(said) == 1
    monkeypatch.setattr(study.train.runner.multiprocessing, "parent_process", lambda: object())
    study.train.runner._warn_of_long_cpu_runs(started[:3], torch.device("cpu"), said.append)
    assert len(said) == 1


def test_grid_overrides(tmp_path, capsys, monkeypatch):
    import study.train

    seen = []
    monkeypatch.setattr(study.train, "run_all", lambda configs, runs_dir, plan, **kw: seen.extend(configs) or {})
    code, out, err = run_cli(
        capsys, "run", "--grid", "quick", "--iterations", "2", "--batch-size", "16", "--seeds", "0-1",
        "--batch-split", "2", "--runs-dir", str(tmp_path),
    )
    assert code == 0, err
    assert [c.run_id for c in seen] == [
        f"fashion-mnist-mini-{a}{d}-A-s{s}-it2-b16-bn2" for s in (0, 1) for d in (8, 20) for a in ("plain", "resnet")
    ]
    assert all(c.iterations == 2 and c.batch_size == 16 and c.batch_split == 2 for c in seen)


def test_a_grid_trains_its_own_seeds_unless_told(tmp_path, capsys, monkeypatch):
    # `quick` is a 3-seed study: `study run --grid quick` alone trains seeds 0-2, --seeds overrides.
    import study.train

    seen = []
    monkeypatch.setattr(study.train, "run_all", lambda configs, runs_dir, plan, **kw: seen.append(configs) or {})
    assert run_cli(capsys, "run", "--grid", "quick", "--runs-dir", str(tmp_path))[0] == 0
    assert run_cli(capsys, "run", "--grid", "quick", "--seeds", "4", "--runs-dir", str(tmp_path))[0] == 0
    assert run_cli(capsys, "run", "--grid", "degradation", "--runs-dir", str(tmp_path))[0] == 0
    assert sorted({c.seed for c in seen[0]}) == [0, 1, 2] and len(seen[0]) == 12
    assert {c.seed for c in seen[1]} == {4} and {c.seed for c in seen[2]} == {0}
    code, out, _ = run_cli(capsys, "grids")
    assert "fashion-mnist-mini-resnet20-A-s2-it250" in out


def test_holdout_logs_val_split(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "run", "--arch", "plain", "--depth", "8", "--iterations", "2", "--holdout", "--runs-dir", str(tmp_path)
    )
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.endswith("-val")
    assert list(pd.read_parquet(run_dir / "metrics.parquet").split) == ["train", "val"]


def test_models_json(capsys, monkeypatch):
    import study.models as models

    real = models.architecture_table
    monkeypatch.setattr(models, "architecture_table", lambda: real(depths=(20, 56)))
    code, out, _ = run_cli(capsys, "models", "--format", "json")
    rows = json.loads(out)
    assert code == 0 and all(set(r) == {"arch", "depth", "shortcut", "dataset", "params", "macs"} for r in rows)
    assert {"arch": "plain", "depth": 56, "shortcut": "A", "dataset": "cifar10", "params": 853_018, "macs": 125_485_696} in rows
    code, out, _ = run_cli(capsys, "models")
    assert "853,018" in out and "plain-56" in out


def test_grids_lists_runs(capsys):
    code, out, _ = run_cli(capsys, "grids")
    assert code == 0
    assert "cifar10-plain110-A-s0" in out and "cifar10-resnet1202-A-s0" in out and "quick" in out


BAD_INPUT = [
    (["run", "--grid", "nope"], "unknown grid"),
    (["run", "--arch", "plain", "--depth", "21"], "6n+2"),
    (["run", "--arch", "plain"], "needs --depth"),
    (["run", "--arch", "wide", "--depth", "20"], "invalid choice"),
    (["run", "--arch", "plain", "--depth", "20", "--dataset", "mnist"], "invalid choice"),
    (["run", "--arch", "plain", "--depth", "20", "--shortcut", "B"], "plain nets have no shortcuts"),
    (["run", "--arch", "plain", "--depth", "20", "--seeds", "1,x"], "malformed seeds"),
    (["run", "--arch", "plain", "--depth", "20", "--seed", "-1"], "--seed must be a whole number from 0 to"),
    (["run", "--arch", "plain", "--depth", "20", "--iterations", "0"], "positive integer"),
    (["run", "--arch", "plain", "--depth", "20", "--iterations", "-5"], "positive integer"),
    (["run", "--arch", "plain", "--depth", "20", "--dataset", "cifar10"], "CIFAR-10 not found"),
    (["run", "--arch", "plain", "--depth", "20", "--device", "tpu"], "unknown device"),
    (["run", "--grid", "quick", "--depth", "20"], "does not apply to --grid"),
    (["frobnicate"], "invalid choice"),
    (["run", "--arch", "plain", "--depth", "8", "--dataset", "fashion-mnist-mini", "--batch-size", "10001"],
     "--batch-size 10001 is larger than fashion-mnist-mini's training split of 10,000 images; use at most 10000"),
    (["run", "--arch", "plain", "--depth", "8", "--dataset", "fashion-mnist-mini", "--holdout", "--batch-size", "9500"],
     "larger than fashion-mnist-mini's training split (less the held-out part)"),
    (["run", "--arch", "plain", "--depth", "20", "--seed", "99999999999999999999"], "--seed must be a whole number from 0 to"),
    (["run", "--arch", "plain", "--depth", "20", "--seeds", "0,9223372036854775808"], "is too large; seeds run from 0"),
    (["run", "--arch", "plain", "--depth", "20", "--seeds", "0-99999999999"], "names 100,000,000,000 seeds, more than"),
    (["run", "--arch", "plain", "--depth", "20", "--seeds", "0-9999,10000-10001"], "names 10,002 seeds, more than 10,000"),
    (["run", "--arch", "resnet", "--depth", "18", "--dataset", "imagenet", "--lighting", "inf"],
     "--lighting must be a finite number >= 0"),
    (["run", "--arch", "plain", "--depth", "8", "--data-dir", "data"], "--data-dir reads no data for fashion-mnist-mini"),
    (["run", "--grid", "quick", "--download"], "--download reads no data for fashion-mnist-mini"),
]
# A real process for an argparse error and for missing data (one of our checks, an unknown grid, runs in a
# process in test_console_script_in_a_pipe_is_quiet_and_fails_cleanly).
IN_A_PROCESS = {10, 13}


def _with_runs_dir(argv: list[str]) -> list[str]:
    return [*argv, *(["--runs-dir", "runs"] if argv[0] == "run" else [])]


@pytest.mark.parametrize("argv,needle", [case for i, case in enumerate(BAD_INPUT) if i in IN_A_PROCESS])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, argv, needle):
    """A real `python -m study` process: one line on stderr, exit code 2, no traceback, nothing
    written (the default ./runs and ./data resolve in an empty directory)."""
    proc = subprocess.run(
        [sys.executable, "-m", "study", *_with_runs_dir(argv)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 2
    err = proc.stderr
    assert err.startswith("study: error: ") and err.count("\n") == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,needle", [case for i, case in enumerate(BAD_INPUT) if i not in IN_A_PROCESS])
def test_every_bad_input_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, argv, needle):
    """The other cases, through `main` in this process (the same code path, without a process start
    per case)."""
    monkeypatch.chdir(tmp_path)
    try:
        code = main(_with_runs_dir(argv))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("study: error: ") and err.count("\n") == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_runs_dir_that_is_or_is_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for runs in (blocker, blocker / "runs"):
        code, _, err = run_cli(capsys, "run", "--arch", "plain", "--depth", "8", "--runs-dir", str(runs))
        assert code == 2 and f"{blocker} is a file, not a directory" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_file_where_a_run_keeps_its_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "fashion-mnist-mini-plain8-A-s0-it2").write_text("")
    code, _, err = run_cli(capsys, "run", "--arch", "plain", "--depth", "8", "--iterations", "2", "--runs-dir", str(runs))
    assert code == 2 and err.count("\n") == 1, err
    assert "fashion-mnist-mini-plain8-A-s0-it2 is a file, where run fashion-mnist-mini-plain8-A-s0-it2 keeps its folder" in err
    assert [p.name for p in runs.iterdir()] == ["fashion-mnist-mini-plain8-A-s0-it2"]


def test_a_runs_dir_that_is_or_is_inside_a_runs_folder_is_refused(tmp_path, capsys):
    """--runs-dir one level too deep (a run's own folder, or a folder in it) would nest new runs among
    that run's files, where no command looks: refused, naming the runs dir to pass."""
    runs = tmp_path / "runs"
    run = Run(runs, RunConfig("plain", 8, iterations=2))
    run.prepare("cpu")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for inside in (run.dir, run.dir / "more" / "runs"):
        code, _, err = run_cli(capsys, "run", "--arch", "plain", "--depth", "8", "--iterations", "2",
                               "--runs-dir", str(inside))
        assert code == 2 and err.count("\n") == 1, err
        assert f"the folder of run {run.cfg.run_id}; pass --runs-dir {runs}," in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # The folder the path names, not its spelling: `<run>/..` is the runs dir itself; a link into a run's
    # folder is that folder.
    from study.runstore import RunStoreError, check_not_in_a_run

    check_not_in_a_run(run.dir / "..")
    (tmp_path / "link").symlink_to(run.dir)
    with pytest.raises(RunStoreError, match=f"is the folder of run {run.cfg.run_id}"):
        check_not_in_a_run(tmp_path / "link")


def test_a_tensorboard_dir_that_cannot_be_written_leaves_no_runs_dir(tmp_path, capsys):
    pytest.importorskip("tensorboard")  # without it, `--tensorboard` is refused before any folder is made
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "run", "--arch", "plain", "--depth", "8", "--iterations", "2",
                           "--runs-dir", str(tmp_path / "new" / "runs"), "--tensorboard", str(blocker))
    assert code == 2 and f"--tensorboard {blocker} is not a writable directory" in err and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize("env,needle", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK is not set"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a non-negative whole number"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 is outside a job of WORLD_SIZE=2 processes"),
    ({"RANK": "1"}, "unknown grid"),  # RANK alone is no job: the error is still said
])
def test_malformed_torchrun_variables_are_one_line_errors(tmp_path, monkeypatch, capsys, env, needle):
    monkeypatch.chdir(tmp_path)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(capsys, "run", "--grid", "nope" if "RANK" in env and len(env) == 1 else "quick")
    assert code == 2 and err.startswith("study: error: ") and err.count("\n") == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []


#: Every command with a folder or file option, and what else it needs to get as far as that option.
EMPTY_PATH_CASES = {
    "run": ["run", "--arch", "plain", "--depth", "8"], "status": ["status"], "publish": ["publish", "--out", "pub"],
    "export tensorboard": ["export", "tensorboard", "--out", "tb"], "evaluate": ["evaluate"],
    "plot": ["plot", "all"], "table": ["table", "table6"], "report": ["report"], "probe": ["probe"],
}


def _path_options() -> set[tuple[str, str]]:
    """(command, option) for every folder or file option the CLI has (--runs-dir, --out, --data-dir,
    --tensorboard, and any other whose metavar says DIR or FILE), sub-commands' included."""
    import argparse

    from study.cli import build_parser

    found = set()

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(child, f"{name} {sub}".strip())
            found.update((name, o) for o in action.option_strings
                         if o in ("--runs-dir", "--out", "--data-dir", "--tensorboard") or action.metavar in ("DIR", "FILE"))

    walk(build_parser(), "")
    return found


def test_an_empty_path_is_refused_in_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    """`--runs-dir ""`, `--out ""`, `--data-dir ""` or `--tensorboard ""`, of any command: one line naming the option, exit code 2,
    nothing written (an empty path would otherwise mean the current directory, or quietly the default)."""
    options = _path_options()
    assert {command for command, _ in options} == set(EMPTY_PATH_CASES)  # a new command: add its case
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for command, option in sorted(options):
        argv = [*EMPTY_PATH_CASES[command], option, ""]
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == "", (argv, out)
        assert err.startswith(f"study: error: argument {option}: an empty path names nothing") and err.count("\n") == 1, (
            argv, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and not any((tmp_path / "runs").iterdir()), argv


def test_a_runs_dir_on_a_file_system_that_makes_no_files_says_so(capsys):
    """/proc/1 exists, yet creating a file there fails with "No such file or directory": the line says
    what is wrong instead."""
    if not Path("/proc/1").is_dir():
        pytest.skip("no /proc here")
    code, _, err = run_cli(capsys, "run", "--arch", "plain", "--depth", "8", "--runs-dir", "/proc/1")
    assert code == 2 and "its file system accepts no new files" in err and err.count("\n") == 1, err
    assert "No such file" not in err


def test_listing_and_analysis_commands_do_not_import_torchvision():
    """torchvision's import costs seconds; only the data loaders need it (a fresh interpreter)."""
    code = "import sys, study.cli, study.analysis.report, study.analysis.figures; print('torchvision' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


@pytest.mark.slow  # two processes of the entry point, 11-17 s: the default run stays under 10 minutes
def test_console_script_in_a_pipe_is_quiet_and_fails_cleanly(tmp_path):
    """The installed `study` entry point: no progress bar in a pipe, no traceback on bad input."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "study", "run", "--arch", "plain", "--depth", "8", "--iterations", "3",
         "--batch-size", "16", "--runs-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "it/s" not in proc.stderr and "\r" not in proc.stderr  # no tqdm bar
    proc = subprocess.run([sys.executable, "-m", "study", "run", "--grid", "x", "--runs-dir", str(tmp_path / "new")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("study: error: unknown grid 'x'") and not (tmp_path / "new").exists(), proc.stderr


@pytest.mark.parametrize("argv, unbuffered", [(("grids",), False), (("grids",), True),
                                              pytest.param(("models", "--format", "json"), False, marks=pytest.mark.slow),
                                              pytest.param(("models", "--format", "json"), True, marks=pytest.mark.slow)])
def test_a_reader_that_leaves_early_gets_no_traceback(argv, unbuffered):
    """`study grids | head -1`: once the reader has gone, the command stops quietly (exit 141, as a
    shell tool killed by SIGPIPE) instead of printing a BrokenPipeError traceback; with stdout buffered
    (the pipe breaks at the flush) and unbuffered (at the first print)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | ({"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    read, write = os.pipe()
    os.close(read)  # the reader leaves before the first line
    proc = subprocess.run([sys.executable, "-m", "study", *argv], stdout=write, stderr=subprocess.PIPE, text=True,
                          env=env, timeout=300)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_a_broken_pipe_of_the_commands_own_is_not_taken_for_a_reader_that_left(monkeypatch):
    """Only a stdout whose reader has gone ends quietly: a BrokenPipeError from elsewhere (a worker's
    pipe) is a failure to report, stdout left as it was."""
    import study.cli.listing

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(study.cli.listing, "cmd_grids", broken)
    with pytest.raises(BrokenPipeError):
        main(["grids"])


def test_config_and_grids_do_not_import_torch():
    """The constants and their validation (`study.config`) and the named grids read without torch
    (a fresh interpreter)."""
    code = "import sys, study.config, study.grids; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


@pytest.mark.slow
def test_training_into_results_from_a_dirty_tree_says_so_before_it_starts(tmp_path, capsys, monkeypatch):
    """Published evidence comes from a clean, committed tree: `study run` into the checkout's
    results/ from a tree with uncommitted changes to tracked files says so in one line first (and
    the runs record git_dirty); elsewhere, or from a clean tree, nothing is said."""
    import study.runstore

    state = {"porcelain": " M study/train/loop.py\n"}

    def git(*args):
        if args[:2] == ("rev-parse", "--show-toplevel"):
            return f"{tmp_path}\n"
        if args[:1] == ("status",):
            return state["porcelain"]
        return "0123456789abcdef\n"

    monkeypatch.setattr(study.runstore, "_git", git)
    argv = ["run", "--arch", "plain", "--depth", "8", "--iterations", "1", "--batch-size", "32", "--device", "cpu"]
    code, out, err = run_cli(capsys, *argv, "--runs-dir", str(tmp_path / "results" / "mine"))
    assert code == 0, err
    notes = [line for line in out.splitlines() if "published evidence" in line]
    assert len(notes) == 1 and "uncommitted changes to tracked files" in notes[0]
    assert out.index("published evidence") < out.index("training on")
    cfg = json.loads(next((tmp_path / "results" / "mine").glob("*/config.json")).read_text())
    assert cfg["provenance"]["git_dirty"] is True

    for runs, porcelain in ((tmp_path / "elsewhere", " M study/x.py\n"), (tmp_path / "results" / "clean", "")):
        state["porcelain"] = porcelain
        code, out, err = run_cli(capsys, *argv, "--runs-dir", str(runs))
        assert code == 0 and "published evidence" not in out, out


def test_a_runs_cpu_label_names_its_model_kernels_and_bf16_units():
    """How pages and the HTML report name a CPU run's machine, from what its config.json recorded: runs
    written before the flags were recorded give the model alone; no model, no label."""
    from study.runstore import cpu_label

    assert cpu_label({"cpu": "AMD EPYC", "cpu_flags": ["avx2"], "cpu_capability": "AVX2"}) == "AMD EPYC (AVX2)"
    xeon = {"cpu": "Intel Xeon", "cpu_flags": ["avx2", "avx512f", "avx512_bf16", "amx_bf16"], "cpu_capability": "AVX512"}
    assert cpu_label(xeon) == "Intel Xeon (AVX512, AMX-BF16, AVX-512 BF16)"
    assert cpu_label({"cpu": "AMD EPYC"}) == "AMD EPYC"  # written before cpu_flags and cpu_capability
    assert cpu_label({"cpu": "Neoverse-N1", "cpu_flags": None, "cpu_capability": "DEFAULT"}) == "Neoverse-N1"
    assert cpu_label({"device_name": "x86_64"}) is None


@pytest.fixture
def full_disk(tmp_path):
    """A real file system with no space left: a small tmpfs, filled (needs mount rights: root, as in CI)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount rights)")
    try:
        (disk / "kept").mkdir()
        with open(disk / "filler", "wb", buffering=0) as f:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    f.write(bytes(4096))
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_runs_dir_on_a_full_disk_is_one_line_exit_2_and_nothing_is_left(full_disk, capsys):
    """A full disk takes an empty file but not a run's: found before any run starts (it used to fail each run
    with an empty folder left behind), the folders this command made removed again, a folder that was there
    left as it was."""
    args = ["run", "--arch", "plain", "--depth", "8", "--iterations", "2", "--device", "cpu"]
    for runs in (full_disk / "new" / "runs", full_disk / "kept"):
        assert main([*args, "--runs-dir", str(runs)]) == 2
        err = capsys.readouterr().err
        assert err == (f"study: error: runs dir {runs} has no space left (No space left on device); free some space "
                       "there or pass --runs-dir to another disk\n"), err
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "kept"]
    assert list((full_disk / "kept").iterdir()) == []
    # `study evaluate` writes into each run's own folder: no other folder to pass, only space to free.
    with pytest.raises(study.runstore.RunStoreError) as e:
        study.runstore.check_writable(full_disk / "kept", None, "run folder")
    assert str(e.value) == f"run folder {full_disk / 'kept'} has no space left (No space left on device); free some space there"


def test_status_names_a_finished_runs_deleted_metrics_and_reads_a_damaged_status_from_its_metrics(tmp_path, capsys):
    """A finished run whose metrics.parquet was deleted is named with its fix (its `study run` command rewrites
    it); one whose status.json is damaged stands where its metrics reach, not at 0 with the whole run left."""
    runs = tmp_path / "runs"
    train = ["run", "--arch", "plain", "--depth", "8", "--seeds", "0,1", "--iterations", "10", "--batch-size", "64",
             "--runs-dir", str(runs), "--device", "cpu", "--no-progress"]
    assert run_cli(capsys, *train)[0] == 0
    deleted, damaged = (runs / f"fashion-mnist-mini-plain8-A-s{seed}-it10-b64" for seed in (0, 1))
    (deleted / "metrics.parquet").unlink()
    (damaged / "status.json").write_text('{"status": "do')
    code, out, err = run_cli(capsys, "status", "--runs-dir", str(runs))
    assert code == 0, err
    assert (f"{deleted.name}: its metrics.parquet is missing: run the run's `study run` command again, which rewrites "
            "its metrics from its checkpoint") in out, out
    row = next(line.split() for line in out.splitlines() if line.startswith(damaged.name))
    assert (row[1], row[2], row[-1]) == ("unknown", "10/10", "-"), out
    assert "left: about" not in out, out
    code, out, err = run_cli(capsys, *train)
    assert code == 0 and f"{deleted.name}: its metrics.parquet is missing: rewritten from its checkpoint" in out, out
