"""A throwaway two-node SLURM cluster on one machine: one slurmd per network namespace.

The nodes are the two "hosts" of tests/two_hosts.py. slurmctld runs on the first (its address is
the controller's), each slurmd in its own namespace with its own NodeName/NodeAddr, spool and log
(`%n` in slurm.conf); munged runs here and its socket, a file, is shared by both. Everything is
under one temporary directory with its own slurm.conf (SLURM_CONF), so it never meets the
one-node test cluster or /etc/slurm; its ports are inside the namespaces. Client commands run on
the first node.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass

from slurm_cluster import ClusterUnavailable, SlurmCluster, ensure_installed, real_memory_mb, shared_conf
from two_hosts import TwoHosts

NODE_NAMES = ("cxn0", "cxn1")
CONTROLLER_PORT, SLURMD_PORT = 6917, 6918  # inside the namespaces: no other cluster can be there


def two_node_conf(cluster: TwoNodeCluster, munge_socket) -> str:
    root, hosts = cluster.root, cluster.hosts
    nodes = "\n".join(
        f"NodeName={name} NodeAddr={address} CPUs={cluster.cpus} RealMemory={real_memory_mb() // 2} State=UNKNOWN"
        for name, address in zip(NODE_NAMES, hosts.addresses)
    )
    return f"""\
ClusterName=cxrdist-two
SlurmctldHost={cluster.host}({hosts.addresses[0]})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={CONTROLLER_PORT}
SlurmdPort={SLURMD_PORT}
{shared_conf(root, munge_socket, per_node="-%n")}\
{nodes}
PartitionName=two Nodes={",".join(NODE_NAMES)} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class TwoNodeCluster(SlurmCluster):
    hosts: TwoHosts | None = None

    def start(self, timeout: float = 90.0) -> TwoNodeCluster:
        for sub in ("state", "log", "munge", *(f"spool-{n}" for n in NODE_NAMES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o700)
        munge_socket = self._start_munge()
        conf = self.root / "slurm.conf"
        conf.write_text(two_node_conf(self, munge_socket))
        self.env = dict(os.environ, SLURM_CONF=str(conf))
        self._spawn(self.hosts.enter(0) + ["slurmctld", "-D", "-i", "-f", str(conf)], "slurmctld.out")
        for host, name in enumerate(NODE_NAMES):
            self._spawn(self.hosts.enter(host) + ["slurmd", "-D", "-f", str(conf), "-N", name], f"slurmd-{name}.out")
        self._wait_nodes_idle(timeout)
        return self

    def _wait_nodes_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            self._check_alive()
            states = self.run("sinfo", "--noheader", "--Node", "-o", "%N %T", check=False).stdout
            if sorted(states.split()) == sorted([*NODE_NAMES, "idle", "idle"]):
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"nodes not idle after {timeout:.0f} s (sinfo: {states!r}); {self.log('slurmctld.log')[-800:]}")

    def stop(self, grace: float = 60.0) -> None:
        if self.env and all(p.poll() is None for p in self.daemons):
            self.run("scancel", "--full", "--quiet", "--user", "root", check=False)
            deadline = time.monotonic() + grace  # slurmd ends the jobs' processes before it goes
            while time.monotonic() < deadline and self.run("squeue", "--noheader", "-o", "%i", check=False).stdout.strip():
                time.sleep(0.5)
        env, self.env = self.env, {}
        super().stop()
        self.env = env

    def _check_alive(self) -> None:
        for proc in self.daemons:
            if proc.poll() is not None:
                raise ClusterUnavailable(f"{' '.join(proc.args[2:4])} exited with {proc.returncode}: {self.log('slurmctld.log')[-800:]}")

    def run(self, *cmd: str, check: bool = True, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        """Client commands run on the first node, where the controller's address is reachable."""
        return super().run(*self.hosts.enter(0), *cmd, check=check, env=env, cwd=cwd)


def start_two_node_cluster(root, hosts: TwoHosts, timeout: float = 90.0) -> TwoNodeCluster:
    ensure_installed()
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip() or socket.gethostname()
    cluster = TwoNodeCluster(root=root, host=host, cpus=os.cpu_count() or 1, hosts=hosts)
    try:
        return cluster.start(timeout)
    except BaseException:
        cluster.stop()
        raise
