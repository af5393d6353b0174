"""Two "hosts" on one machine: two network namespaces with private addresses joined by a veth pair.

Each namespace has its own interfaces, routes and sockets (loopback included) and shares the
filesystem, so a process started in it with `ip netns exec` behaves like one on another machine
that mounts the same shared filesystem. Needs root and iproute2 (`ip`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

SUBNET = "10.213.7"  # private, and only ever inside these namespaces
IFNAME = "cx0"  # the same name in both namespaces is allowed


class HostsUnavailable(RuntimeError):
    """Network namespaces cannot be made here; the tests skip with this reason."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise HostsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@dataclass
class TwoHosts:
    names: tuple[str, str]
    addresses: tuple[str, str] = (f"{SUBNET}.1", f"{SUBNET}.2")
    ifname: str = IFNAME

    def create(self) -> TwoHosts:
        for name in self.names:
            ip("netns", "add", name)
        ip("link", "add", self.ifname, "netns", self.names[0], "type", "veth", "peer", "name", self.ifname, "netns", self.names[1])
        for name, address in zip(self.names, self.addresses):
            ip("-n", name, "addr", "add", f"{address}/24", "dev", self.ifname)
            ip("-n", name, "link", "set", "lo", "up")
        for host in (0, 1):
            self.link(host, up=True)
        return self

    def delete(self) -> None:
        for name in self.names:
            ip("netns", "delete", name, check=False)

    def link(self, host: int, up: bool) -> None:
        """Take a host's network link down (it vanishes: no resets, no answers) or up again."""
        ip("-n", self.names[host], "link", "set", self.ifname, "up" if up else "down")

    def prefix(self, host: int) -> list[str]:
        """Prefix a command with this to run it on `host`."""
        return ["ip", "netns", "exec", self.names[host]]

    def enter(self, host: int) -> list[str]:
        """Like prefix(), but only the network namespace: `ip netns exec` also mounts a fresh /sys,
        without the cgroup filesystem that slurmd needs."""
        return ["nsenter", f"--net=/run/netns/{self.names[host]}"]


def make_two_hosts(tag: str) -> TwoHosts:
    if os.geteuid() != 0:
        raise HostsUnavailable("network namespaces need root")
    if shutil.which("ip") is None:
        raise HostsUnavailable("iproute2 (`ip`) is not installed")
    hosts = TwoHosts(names=(f"cxd-{tag}-h0", f"cxd-{tag}-h1"))
    try:
        return hosts.create()
    except BaseException:
        hosts.delete()
        raise


def two_hosts_or_skip(tag: str):
    """A pytest fixture's body: the two hosts while the tests use them, or the test skipped where they cannot be made."""
    import pytest

    try:
        made = make_two_hosts(tag)
    except HostsUnavailable as err:
        pytest.skip(f"no network namespaces: {err}")
    yield made
    made.delete()
