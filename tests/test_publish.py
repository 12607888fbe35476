"""`study publish`: a finished run's small files, and only those, copied out of a runs dir; runs not
finished or trained from an uncommitted tree left out with the reason; bad input in one line."""

import json

import pandas as pd
import pytest

from study.cli import main
from study.config import RunConfig
from study.publish import SMALL_FILES
from study.runstore import METRIC_COLUMNS, Run


def make_run(runs_dir, seed, *, status="done", dirty=False, iterations=400):
    """A run through the real Run API, with its provenance's git_dirty set, a checkpoint and a lock."""
    cfg = RunConfig("plain", 8, seed=seed, iterations=iterations, dataset="fashion-mnist-mini")
    run = Run(runs_dir, cfg)
    run.prepare("cpu")
    record = json.loads(run.config_path.read_text())
    record["provenance"]["git_dirty"] = dirty
    run.config_path.write_text(json.dumps(record))
    row = dict.fromkeys(METRIC_COLUMNS)
    row.update(run_id=cfg.run_id, dataset=cfg.dataset, arch="plain", depth=8, shortcut="A", seed=seed, epoch=1,
               iteration=iterations, split="train", loss=1.0, error_pct=30.0, lr=0.1, elapsed_s=10.0, warmup_s=1.0)
    pd.DataFrame([row], columns=METRIC_COLUMNS).to_parquet(run.metrics_path, index=False)
    pd.DataFrame({"run_id": [cfg.run_id], "layer_index": [1], "std": [1.0]}).to_parquet(run.dir / "responses.parquet")
    run.checkpoint_path.write_bytes(b"weights")
    (run.dir / "lock").write_bytes(b"")
    run.set_status(status, iteration=iterations if status == "done" else 100)
    return run


def test_publish_copies_the_small_files_of_finished_clean_runs(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "results" / "study"
    done, running, dirty = make_run(runs, 0), make_run(runs, 1, status="interrupted"), make_run(runs, 2, dirty=True)
    assert main(["publish", "--runs-dir", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [done.cfg.run_id]
    copied = out / done.cfg.run_id
    assert sorted(p.name for p in copied.iterdir()) == sorted(n for n in SMALL_FILES if (done.dir / n).exists())
    assert not (copied / "checkpoint.pt").exists() and not (copied / "lock").exists()
    for p in copied.iterdir():
        assert p.read_bytes() == (done.dir / p.name).read_bytes()
    assert f"{running.cfg.run_id}: left out: not finished (interrupted)" in printed
    assert f"{dirty.cfg.run_id}: left out: trained from a tree with uncommitted changes" in printed and "--allow-dirty" in printed
    assert "published 1 run(s)" in printed and "2 left out" in printed
    # Again: nothing new to copy; with --allow-dirty the dirty run too.
    assert main(["publish", "--runs-dir", str(runs), "--out", str(out), "--allow-dirty"]) == 0
    printed = capsys.readouterr().out
    assert "published 1 run(s)" in printed and "1 already there unchanged" in printed
    assert (out / dirty.cfg.run_id / "metrics.parquet").exists()


def test_publish_leaves_out_what_it_cannot_vouch_for_and_keeps_the_copy_current(tmp_path, capsys):
    """A diverged run is a result and is published; a run whose status is unreadable or that has no
    metrics is left out, each with its reason. Files are written with a plain file's permissions, and
    a published file the run no longer has is removed."""
    import os

    runs, out = tmp_path / "runs", tmp_path / "out"
    diverged, corrupt, bare = make_run(runs, 0, status="diverged"), make_run(runs, 1), make_run(runs, 2)
    corrupt.status_path.write_text("{not json")
    bare.metrics_path.unlink()
    (diverged.dir / "tencrop.json").write_text("{}")
    assert main(["publish", "--runs-dir", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [diverged.cfg.run_id]
    assert (f"{corrupt.cfg.run_id}: left out: its status.json is unreadable (not JSON: Expecting property name "
            "enclosed in double quotes (line 1, column 2)); run the run's `study run` command again, which rewrites it "
            "from its checkpoint") in printed, printed
    assert f"{bare.cfg.run_id}: left out: no metrics.parquet" in printed
    umask = os.umask(0)
    os.umask(umask)
    modes = {oct(p.stat().st_mode & 0o777) for p in (out / diverged.cfg.run_id).iterdir()}
    assert modes == {oct(0o666 & ~umask)}
    (diverged.dir / "tencrop.json").unlink()
    assert main(["publish", "--runs-dir", str(runs), "--out", str(out)]) == 0
    assert not (out / diverged.cfg.run_id / "tencrop.json").exists() and "published 1 run(s)" in capsys.readouterr().out


_KILLED_PUBLISH = """
import os, signal, sys
from pathlib import Path
import study.publish as publish
where, runs, out = sys.argv[1:]
real_copy, real_rename, renames = publish.shutil.copyfile, publish.os.rename, []
def copyfile(src, dst, **kwargs):
    if where == "copy" and Path(dst).name == "metrics.parquet":  # config and status are copied before it
        os.kill(os.getpid(), signal.SIGKILL)
    return real_copy(src, dst, **kwargs)
def rename(src, dst):
    renames.append(src)
    if where == "swap" and len(renames) == 2:  # the old copy renamed aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst)
publish.shutil.copyfile, publish.os.rename = copyfile, rename
publish.publish(runs, out)
"""


@pytest.mark.parametrize("where", ["copy", "swap"])
def test_a_killed_publish_leaves_no_run_half_written_and_the_next_one_finishes_it(tmp_path, capsys, where):
    """SIGKILL while a run's files are copied (first publish) or while the new copy replaces the old one
    (a publish that updates it): no run is left that looks published without all of its files, a file the
    user put in the run's folder is kept, and publishing again completes it with nothing left behind."""
    import subprocess
    import sys

    from study.analysis.load import load_run_table
    from study.runstore import list_runs

    runs, out = tmp_path / "runs", tmp_path / "out"
    run = make_run(runs, 0)
    folder = out / run.cfg.run_id
    if where == "swap":
        assert main(["publish", "--runs-dir", str(runs), "--out", str(out)]) == 0
        (folder / "NOTES.md").write_text("seen on the cluster")
        (run.dir / "tencrop.json").write_text('{"top1": 1.0}')
    killed = subprocess.run([sys.executable, "-c", _KILLED_PUBLISH, where, str(runs), str(out)], capture_output=True)
    assert killed.returncode == -9, killed.stderr
    # Nothing that looks like a run, finished or not, to the commands or to the analysis.
    assert list_runs(out) == [] and load_run_table(out).empty and not folder.exists()
    # Its staging folder; when updating, also the old copy renamed aside.
    assert len(list(out.iterdir())) == (2 if where == "swap" else 1)
    capsys.readouterr()
    assert main(["publish", "--runs-dir", str(runs), "--out", str(out)]) == 0
    assert "published 1 run(s)" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == [run.cfg.run_id]
    expected = sorted(n for n in SMALL_FILES if (run.dir / n).exists()) + (["NOTES.md"] if where == "swap" else [])
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    for name in SMALL_FILES:
        if (run.dir / name).exists():
            assert (folder / name).read_bytes() == (run.dir / name).read_bytes()
    if where == "swap":
        assert (folder / "NOTES.md").read_text() == "seen on the cluster"


def test_a_publish_clears_any_runs_leftovers_and_keeps_a_users_links_and_the_folders_group(tmp_path, capsys):
    """What a killed publish left for a run that this publish does not touch is cleared too (and an old copy
    goes back into place), by the whole run id (ids with dots: `wd0` is not `wd0.0005`); a user's
    link in a run's folder is copied as a link; a published folder gets the group and setgid bit of a
    folder made there, and the folder's lock is no file of its own."""
    import os
    import stat

    runs, out = tmp_path / "runs", tmp_path / "out"
    a, b = make_run(runs, 0), make_run(runs, 1)
    out.mkdir()
    os.chmod(out, 0o2775)  # a group's shared folder: new folders inherit its group (setgid)
    assert main(["publish", "--runs-dir", str(runs), "--out", str(out)]) == 0
    capsys.readouterr()
    folder_a, folder_b = out / a.cfg.run_id, out / b.cfg.run_id
    assert all(f.stat().st_mode & stat.S_ISGID for f in (folder_a, folder_b))
    # A killed publish of run b, between its two renames: its old copy aside, its folder gone.
    parked = out / f".publishing-{b.cfg.run_id}.abcd1234.old"
    folder_b.rename(parked)
    (out / f".publishing-{b.cfg.run_id}.abcd1234").mkdir()
    # The old copy of another run, whose id is run a's and more after a dot.
    other = out / f".publishing-{a.cfg.run_id}.5.abcd1234.old"
    other.mkdir()
    (folder_a / "figs").symlink_to(tmp_path / "elsewhere")  # a dangling link of the user's
    (a.dir / "tencrop.json").write_text("{}")  # run a changed: republished
    assert main(["publish", "--runs-dir", str(runs), "--out", str(out), "--arch", "plain", "--depth", "8", "--seed",
                 "0", "--iterations", "400", "--dataset", "fashion-mnist-mini"]) == 0, capsys.readouterr().err
    # Each old copy went back as the run whose whole id it names: `<a>.5` is not `a`.
    assert sorted(p.name for p in out.iterdir()) == sorted([a.cfg.run_id, b.cfg.run_id, f"{a.cfg.run_id}.5"])
    assert (folder_b / "metrics.parquet").read_bytes() == b.metrics_path.read_bytes()  # put back in place
    assert (folder_a / "figs").is_symlink() and os.readlink(folder_a / "figs") == str(tmp_path / "elsewhere")
    assert (folder_a / "tencrop.json").exists() and folder_a.stat().st_mode & stat.S_ISGID


def test_two_publishes_to_one_folder_take_turns(tmp_path):
    """A publish waits while another holds the folder's lock, then publishes."""
    import fcntl
    import os
    import threading

    from study.publish import publish

    runs, out = tmp_path / "runs", tmp_path / "out"
    make_run(runs, 0)
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another publish holds it
    done = []
    worker = threading.Thread(target=lambda: done.append(publish(runs, out, log=lambda line: None)))
    worker.start()
    worker.join(1.0)
    assert worker.is_alive() and not done and list(out.iterdir()) == []
    os.close(fd)
    worker.join(30)
    assert len(done) == 1 and len(done[0].copied) == 1


def test_publish_takes_the_runs_a_study_run_command_line_selects(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    make_run(runs, 0), make_run(runs, 1), make_run(runs, 0, iterations=800)
    assert main(["publish", "--runs-dir", str(runs), "--out", str(out), "--arch", "plain", "--depth", "8",
                 "--seeds", "0-2", "--iterations", "400", "--dataset", "fashion-mnist-mini", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [f"fashion-mnist-mini-plain8-A-s{s}-it400" for s in (0, 1)]
    assert "fashion-mnist-mini-plain8-A-s2-it400: left out: not started" in printed
    # Choosing runs needs --grid or --arch, as with `study status`.
    assert main(["publish", "--runs-dir", str(runs), "--out", str(out), "--seeds", "0"]) == 2
    assert "--seeds selects runs of a --grid or an --arch" in capsys.readouterr().err


def test_publish_names_a_run_whose_config_json_cannot_be_read_and_why(tmp_path, capsys):
    """A damaged config.json leaves its run out with the reason and fix the other commands give (a note for
    every run, a line for a run selected by name); a folder whose config.json is gone is named as such."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    good, damaged, gone = make_run(runs, 0), make_run(runs, 1), make_run(runs, 2)
    damaged.config_path.write_text('{"config":')
    gone.config_path.unlink()
    fix = "copy it again if the run trained elsewhere, or move the run's folder out of the runs dir and train it again"
    why = "is unreadable (not JSON: Expecting value (line 1, column 11))"
    assert main(["publish", "--runs-dir", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"note: {damaged.config_path} {why}, so the run is left out: {fix}" in printed, printed
    assert (f"left out 1 folder(s) with a status.json but no config.json: {gone.cfg.run_id}; copy it again if the "
            "run trained elsewhere") in printed, printed
    assert sorted(p.name for p in out.iterdir()) == [good.cfg.run_id]
    assert main(["publish", "--runs-dir", str(runs), "--out", str(tmp_path / "out2"), "--arch", "plain", "--depth", "8",
                 "--seeds", "0-2", "--iterations", "400", "--dataset", "fashion-mnist-mini"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"{damaged.cfg.run_id}: left out: its config.json {why}: {fix}" in printed, printed
    assert f"{gone.cfg.run_id}: left out: its folder has no config.json" in printed, printed
    good.dir.rename(tmp_path / "elsewhere")  # nothing left to publish: one line, exit 2, nothing written
    assert main(["publish", "--runs-dir", str(runs), "--out", str(tmp_path / "out3")]) == 2
    err = capsys.readouterr().err
    assert err == (f"study: error: nothing to publish: no runs in {runs} (2 folder(s) with no readable config.json: "
                   f"`study status --runs-dir {runs}` says why); pass --runs-dir to where your finished runs are\n")
    assert not (tmp_path / "out3").exists()


@pytest.mark.parametrize("case", ["no runs dir", "out is a file", "out is the runs dir", "out in the runs dir",
                                  "a file in the way", "no runs in the runs dir", "no run finished", "every run dirty"])
def test_publish_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    """Including a publish that would copy nothing (a wrong --runs-dir, or runs still training): no empty
    --out folder is left to look like a success."""
    runs = tmp_path / "runs"
    if case == "no runs in the runs dir":
        runs.mkdir()
    elif case == "no run finished":
        make_run(runs, 0, status="interrupted"), make_run(runs, 1, status="running")
    elif case == "every run dirty":
        make_run(runs, 0, dirty=True), make_run(runs, 1, status="running")
    elif case != "no runs dir":
        make_run(runs, 0)
    out = {"out is a file": tmp_path / "file", "out is the runs dir": runs, "out in the runs dir": runs / "published",
           }.get(case, tmp_path / "out")
    if case == "out is a file":
        out.write_text("x")
    if case == "a file in the way":  # where the run's folder would go
        out.mkdir()
        (out / "fashion-mnist-mini-plain8-A-s0-it400").write_text("x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["publish", "--runs-dir", str(runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("study: error: "), err
    if case not in ("no run finished", "every run dirty"):  # those name their own fixes (below)
        assert "--runs-dir" in err or "--out" in err, err
    if case == "no run finished":
        assert "nothing to publish" in err and "of 2 run(s), 2 not finished; publish once they finish" in err, err
    if case == "every run dirty":  # each reason's own fix
        assert ("of 2 run(s), 1 trained from an uncommitted tree, 1 not finished; pass --allow-dirty, or publish once "
                "they finish") in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
