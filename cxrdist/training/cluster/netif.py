"""Which network interface the process group's sockets use when a run spans machines.

gloo (and NCCL's bootstrap) otherwise bind to the address the hostname resolves to, which is often
loopback or a management network: the other machines then cannot reach them ("Connection refused
... remote=[127.0.0.1]") and the run hangs. The interface whose address routes to the main process
(MASTER_ADDR) is the one the peers reach.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

# The one knob: an interface name to use instead of the detected one, or "none" to leave the
# choice to gloo/NCCL. GLOO_SOCKET_IFNAME or NCCL_SOCKET_IFNAME set by the user also win.
OVERRIDE = "CXRDIST_SOCKET_IFNAME"
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
DISABLED = ("none", "off", "0")


@dataclass(frozen=True)
class Choice:
    ifname: str | None  # the interface to set in IFNAME_VARS; None: leave them alone
    reason: str  # one line for the log


def source_address(destination: str) -> str:
    """The local address the kernel sends from to reach `destination` (a UDP connect sends no packet)."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(destination, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.connect(sockaddr)
        return s.getsockname()[0]


def local_addresses() -> dict[str, list[str]]:
    """{interface: [IPv4/IPv6 addresses]} of this machine (this network namespace)."""
    import psutil

    families = (socket.AF_INET, socket.AF_INET6)
    return {name: [a.address for a in addrs if a.family in families] for name, addrs in psutil.net_if_addrs().items()}


def interface_with_address(address: str, addresses: Mapping[str, list[str]]) -> str | None:
    """The interface that holds `address`. Not the route's device: to reach an address of its own,
    the kernel routes over `lo`, yet the peers reach that address on the interface holding it."""
    wanted = ipaddress.ip_address(address.split("%")[0])
    for name, addrs in addresses.items():
        if any(ipaddress.ip_address(a.split("%")[0]) == wanted for a in addrs):
            return name
    return None


def spans_machines(env: Mapping[str, str]) -> bool:
    """torchrun (accelerate launch) gives every worker WORLD_SIZE and its machine's LOCAL_WORLD_SIZE."""
    world = int(env.get("WORLD_SIZE", "1") or 1)
    local = int(env.get("LOCAL_WORLD_SIZE", str(world)) or world)
    return world > local


def choose(env: Mapping[str, str], find: Callable[[str], str | None]) -> Choice:
    """What to do, from the environment alone; `find(MASTER_ADDR)` names the interface that routes there."""
    preset = [f"{var}={env[var]}" for var in IFNAME_VARS if env.get(var)]
    if preset:
        return Choice(None, f"{', '.join(preset)} set by the user")
    override = env.get(OVERRIDE, "").strip()
    if override.lower() in DISABLED:
        return Choice(None, f"{OVERRIDE}={override}: the interface is left to gloo/NCCL")
    if override:
        return Choice(override, f"{OVERRIDE}={override}")
    if not spans_machines(env):
        return Choice(None, "one machine")
    master = env.get("MASTER_ADDR", "")
    if not master:
        return Choice(None, "MASTER_ADDR is not set")
    try:
        ifname = find(master)
    except OSError as err:
        return Choice(None, f"no route to MASTER_ADDR {master} ({err})")
    if ifname is None:
        return Choice(None, f"no local interface holds the address that routes to MASTER_ADDR {master}")
    return Choice(ifname, f"routes to MASTER_ADDR {master}")


def interface_towards(destination: str) -> str | None:
    return interface_with_address(source_address(destination), local_addresses())


def configure(env: MutableMapping[str, str]) -> Choice:
    """Set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME in `env` (before the process group starts)."""
    choice = choose(env, interface_towards)
    if choice.ifname is not None:
        for var in IFNAME_VARS:
            env[var] = choice.ifname
    return choice


def describe(choice: Choice) -> str:
    if choice.ifname is None:
        return f"process-group network interface not set by cxrdist: {choice.reason}"
    return f"process-group network interface {choice.ifname} ({choice.reason}; set {OVERRIDE} to override)"
