"""Runs the real `study` command in a subprocess with a fault injected, for tests/test_faults.py.

    python tests/fault_driver.py [--kill-at-step K] [--kill-in-checkpoint K] [--nan-at-step K] -- ARGS...

The data set is cut to a small real slice (320 training, 200 test images of the embedded subset) so
an epoch is a few steps; everything else is the production code path. Faults:
- --kill-at-step K: SIGKILL this process right after optimizer step K.
- --kill-in-checkpoint K: SIGKILL halfway through writing the K-th checkpoint (a truncated temp file).
- --nan-at-step K: the training loss of step K (and later) becomes NaN.
- --sleep-per-step S: sleep S seconds after every step (results unchanged), to signal a run mid-epoch.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import study.train
from study.cli import main
from study.data import Data, Split, load_data


def small(*args, **kwargs) -> Data:
    full = load_data("fashion-mnist-mini")
    train = Split(full.train.images[:320].clone(), full.train.labels[:320].clone())
    test = Split(full.eval.images[:200].clone(), full.eval.labels[:200].clone())
    return Data(full.info, train, test, "test", train.images.float().div(255).mean(0))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main_with_faults() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-checkpoint", type=int)
    parser.add_argument("--nan-at-step", type=int)
    parser.add_argument("--sleep-per-step", type=float, default=0.0)
    parser.add_argument("study_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    study.train.runner.load_data = small
    study_args = args.study_args[1:] if args.study_args[:1] == ["--"] else args.study_args
    steps = {"n": 0}

    real_step = torch.optim.SGD.step

    def step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        steps["n"] += 1
        if steps["n"] == args.kill_at_step:
            die()
        time.sleep(args.sleep_per_step)  # slows the run so a test can signal it mid-epoch
        return out

    torch.optim.SGD.step = step

    if args.kill_in_checkpoint:
        real_save, saves = torch.save, {"n": 0}

        def save(obj, f, *a, **kw):
            if isinstance(obj, dict) and "optimizer" in obj:
                saves["n"] += 1
                if saves["n"] == args.kill_in_checkpoint:
                    # Serialized in memory (`Run.save_checkpoint`), then written to its temporary file: half written.
                    real_save(obj, f, *a, **kw)
                    whole = f.getvalue()
                    runs_dir = study_args[study_args.index("--runs-dir") + 1]
                    (tmp,) = Path(runs_dir).glob("*/.checkpoint.*.tmp")
                    tmp.write_bytes(whole[: len(whole) // 2])
                    die()
            return real_save(obj, f, *a, **kw)

        torch.save = save

    if args.nan_at_step:
        real_ce = F.cross_entropy

        def cross_entropy(*a, **kw):
            loss = real_ce(*a, **kw)
            if torch.is_grad_enabled() and steps["n"] + 1 >= args.nan_at_step:
                loss = loss * float("nan")
            return loss

        study.train.step.F.cross_entropy = cross_entropy

    return main(study_args)


if __name__ == "__main__":
    sys.exit(main_with_faults())
