"""A one-node SLURM cluster (munged, slurmctld and slurmd on this machine, as root) in a temporary
state directory, for the tests that submit to a real SLURM (tests/test_slurm_real.py).

`start_cluster(state_dir)` returns a `Cluster` once `sinfo` reports the node idle; `Cluster.stop()`
ends every daemon it started, by pid. The client commands (sbatch, squeue, scancel, sinfo) find
the cluster through SLURM_CONF, which `Cluster.env` holds (the fixture also exports it).
Debian's `slurm-wlm` 22.05 and `munge`: `apt-get install -y slurm-wlm munge`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def unavailable() -> str | None:
    """Why a real SLURM cannot be started here, or None."""
    missing = [d for d in (*DAEMONS, "sbatch", "squeue", "sinfo", "scancel") if shutil.which(d) is None]
    if missing:
        return f"no SLURM here ({', '.join(missing)} not found; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the one-node SLURM cluster runs its daemons as root; not root here"
    return None


def conf_text(state: Path, host: str, cpus: int, *, over_time_limit: int = 0, kill_wait: int = 2) -> str:
    return f"""\
ClusterName=studytest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={state}/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerParameters=sched_interval=1
MinJobAge=600
KillWait={kill_wait}
OverTimeLimit={over_time_limit}
InactiveLimit=0
MessageTimeout=10
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    state: Path
    conf: Path
    env: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def sinfo_state(self) -> str:
        proc = self.run("sinfo", "-h", "-o", "%t", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else f"(sinfo: {proc.stderr.strip()})"

    def squeue(self) -> list[tuple[str, str]]:
        """(job id, state) of every job in the queue, array tasks one by one."""
        proc = self.run("squeue", "--noheader", "--array", "--format=%i %T")
        return [tuple(line.split()) for line in proc.stdout.splitlines() if line.strip()]

    def job_field(self, job_id: str, name: str) -> str | None:
        """A field of `scontrol show job` (e.g. Restarts, JobState), or None."""
        proc = self.run("scontrol", "show", "job", job_id, check=False)
        for word in proc.stdout.split():
            key, _, value = word.partition("=")
            if key == name:
                return value
        return None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.state.glob("*.log")))

    def stop(self) -> None:
        """End the daemons this cluster started (slurmd, slurmctld, munged), by pid."""
        for name in reversed(DAEMONS):
            pid = self.pids.pop(name, None)
            if pid is not None:
                _kill(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is dead
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _kill(pid: int, wait: float = 10.0) -> None:
    with _suppress():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        with _suppress():
            os.kill(pid, signal.SIGKILL)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)


def _daemon_pid(pid_file: Path, name: str, cluster: Cluster, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.05)
    raise RuntimeError(f"{name} wrote no pid file {pid_file}\n{cluster.logs()}")


def start_cluster(state: Path, *, cpus: int | None = None, over_time_limit: int = 0, kill_wait: int = 2,
                  timeout: float = 60.0) -> Cluster:
    """Start munged, slurmctld and slurmd with their state in `state` (created); return once the
    node is idle. On failure the daemons already started are stopped and RuntimeError says why."""
    state = Path(state).absolute()
    for sub in ("ctld", "d"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    cpus = cpus or os.cpu_count() or 1
    conf = state / "slurm.conf"
    conf.write_text(conf_text(state, host, cpus, over_time_limit=over_time_limit, kill_wait=kill_wait))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = Cluster(state, conf, env)
    try:
        key = state / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # munged as root, its key, socket, pid file and log here (--force: root-owned files are fine).
        subprocess.run(
            ["munged", "--force", f"--key-file={key}", f"--socket={state}/munge.socket",
             f"--pid-file={state}/munged.pid", f"--log-file={state}/munged.log", f"--seed-file={state}/munged.seed"],
            env=env, check=True, capture_output=True, text=True, timeout=30,
        )
        cluster.pids["munged"] = _daemon_pid(state / "munged.pid", "munged", cluster)
        for name, pid_file in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            subprocess.run([name, "-f", str(conf)], env=env, check=True, capture_output=True, text=True, timeout=30)
            cluster.pids[name] = _daemon_pid(state / pid_file, name, cluster)
        deadline = time.monotonic() + timeout
        while (st := cluster.sinfo_state()) != "idle":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node is {st!r}, not idle, after {timeout:.0f} s\n{cluster.logs()}")
            time.sleep(0.2)
    except BaseException:
        cluster.stop()
        raise
    return cluster


# --- the pytest fixture (registered in tests/conftest.py) --------------------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM for the session, SLURM_CONF exported to this process (and so to the `study`
    commands the tests start); skips with the reason where SLURM or root is missing. Every daemon
    it started is stopped at the end, also when a test fails."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    # KillWait 10 s: scancel's and the time limit's SIGKILL 10 s after their SIGTERM (30 s by default).
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"), cpus=2, kill_wait=10, over_time_limit=0)
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        try:
            cluster.run("scancel", "--user=root", check=False)
        except Exception:  # noqa: BLE001 - the daemons are stopped next anyway
            pass
        cluster.stop()
