"""A throwaway one-node SLURM cluster (munged + slurmctld + slurmd) for the `slurm` tests.

Everything lives under one temporary directory: munge key and socket, slurm.conf, state and
spool directories, logs. Client commands find it through SLURM_CONF. Needs root (slurmd runs
jobs as their submitting user) and the Debian packages slurmctld, slurmd, slurm-client, munge,
which are installed with apt-get when missing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "munged")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the tests skip with this reason."""


def ensure_installed() -> None:
    if all(shutil.which(p) or Path("/usr/sbin", p).exists() for p in PROGRAMS):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and installing it needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-300:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    return kib // 1024 * 9 // 10  # a little under the total, or slurmd drains the node


def shared_conf(root: Path, munge_socket: Path, per_node: str = "") -> str:
    """The settings both test clusters share; `per_node` ("-%n") gives each node its own spool, pid and log."""
    return f"""\
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool{per_node}
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd{per_node}.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd{per_node}.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MpiDefault=none
MinJobAge=3600
KillWait=30
InactiveLimit=0
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
"""


def slurm_conf(root: Path, host: str, cpus: int, memory_mb: int, munge_socket: Path) -> str:
    return f"""\
ClusterName=cxrdist-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
{shared_conf(root, munge_socket)}\
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    host: str
    cpus: int
    env: dict = field(default_factory=dict)
    daemons: list = field(default_factory=list)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> SlurmCluster:
        for sub in ("state", "spool", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o700)
        munge_socket = self._start_munge()
        conf = self.root / "slurm.conf"
        conf.write_text(slurm_conf(self.root, self.host, self.cpus, real_memory_mb(), munge_socket))
        self.env = dict(os.environ, SLURM_CONF=str(conf))
        self._spawn(["slurmctld", "-D", "-i", "-f", str(conf)], "slurmctld.out")
        self._spawn(["slurmd", "-D", "-f", str(conf), "-N", self.host], "slurmd.out")
        self._wait_idle(timeout)
        return self

    def stop(self, grace: float = 60.0) -> None:
        if self.env:
            subprocess.run(["scancel", "--full", "--quiet", "--user", "root"], env=self.env, capture_output=True)
            # Let slurmd end the jobs' processes before it goes away, or they outlive the cluster.
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and all(p.poll() is None for p in self.daemons):
                left = subprocess.run(["squeue", "--noheader", "-o", "%i"], env=self.env, capture_output=True, text=True)
                if left.returncode != 0 or not left.stdout.strip():
                    break
                time.sleep(0.5)
        for proc in reversed(self.daemons):
            proc.terminate()
        for proc in reversed(self.daemons):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.daemons.clear()

    def _start_munge(self) -> Path:
        d = self.root / "munge"
        if len(str(d / "munge.socket")) > 100:  # a unix socket path has at most 107 bytes
            d = Path(tempfile.mkdtemp(prefix="cxrdist-munge-"))
            os.chmod(d, 0o700)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = d / "munge.socket"
        self._spawn(["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                     f"--pid-file={d}/munged.pid", f"--log-file={self.root}/log/munged.log",
                     f"--seed-file={d}/munged.seed"], "munged.out")
        deadline = time.monotonic() + 15
        while not sock.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"munged did not create {sock}: {self.log('munged.out')}")
            time.sleep(0.1)
        return sock

    def _spawn(self, cmd: list[str], log_name: str) -> None:
        out = open(self.root / "log" / log_name, "wb")
        self.daemons.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env or None, start_new_session=True))

    def _check_alive(self) -> None:
        for proc in self.daemons:
            if proc.poll() is not None:
                name = Path(proc.args[0]).name
                raise ClusterUnavailable(f"{name} exited with {proc.returncode}: {self.log(name + '.out')[-500:]} {self.log(name + '.log')[-800:]}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            done = self.run("sinfo", "--noheader", "--nodes", self.host, "-o", "%T", check=False)
            state = done.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"node {self.host} not idle after {timeout:.0f} s (sinfo: {state!r}); slurmd log: {self.log('slurmd.log')[-800:]}")

    # ---- client helpers ----------------------------------------------------------------------
    def log(self, name: str) -> str:
        path = self.root / "log" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def run(self, *cmd: str, check: bool = True, env: dict | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (the first record; for an array, ask for one task id)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id, check=False).stdout
        first = out.splitlines()[0] if out.strip() else ""
        return dict(kv.split("=", 1) for kv in first.split() if "=" in kv)

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """Every record `scontrol show job` prints (all tasks of an array)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id, check=False).stdout
        return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines() if line.strip()]

    def wait_finished(self, job_id: str, timeout: float) -> list[dict[str, str]]:
        """Wait until every record of a job (or array) is in a final state; returns the records."""
        deadline = time.monotonic() + timeout
        records: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            if records and all(r.get("JobState") in FINISHED_STATES for r in records):
                return records
            time.sleep(1)
        states = [(r.get("JobId"), r.get("ArrayTaskId"), r.get("JobState")) for r in records]
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {states}")


def start_cluster(root: Path, timeout: float = 60.0) -> SlurmCluster:
    ensure_installed()
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting slurmd needs root")
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip() or socket.gethostname()
    cluster = SlurmCluster(root=root, host=host, cpus=os.cpu_count() or 1)
    try:
        return cluster.start(timeout)
    except BaseException:
        cluster.stop()
        raise
