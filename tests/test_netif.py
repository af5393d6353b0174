"""Interface selection for multi-machine runs: the decision from the environment, and the real lookups."""

from __future__ import annotations

import pytest

from cxrdist.training.cluster import netif

ADDRESSES = {"lo": ["127.0.0.1", "::1"], "eth0": ["192.168.1.5", "fe80::1%eth0"], "ib0": ["10.0.0.5", "fd00::5"]}
TWO_MACHINES = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node001"}


def route_to(source: str):
    """A stand-in for the kernel: every destination is reached from `source`."""
    return lambda destination: netif.interface_with_address(source, ADDRESSES)


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.5", "ib0"), ("192.168.1.5", "eth0"), ("127.0.0.1", "lo"), ("fd00::5", "ib0"), ("FD00:0::5", "ib0"), ("fe80::1%eth0", "eth0"),
    ("10.0.0.6", None),
])
def test_interface_is_the_one_holding_the_source_address(address, expected):
    assert netif.interface_with_address(address, ADDRESSES) == expected


def test_multi_machine_run_gets_the_interface_that_routes_to_the_master():
    env = dict(TWO_MACHINES)
    assert netif.choose(env, route_to("10.0.0.5")) == netif.Choice("ib0", "routes to MASTER_ADDR node001")


@pytest.mark.parametrize("env", [
    {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node001"},  # one machine, 8 processes
    {"WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"},
    {},  # not launched at all
])
def test_one_machine_is_left_alone(env):
    assert netif.choose(env, route_to("10.0.0.5")).ifname is None


@pytest.mark.parametrize("preset", ["GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"])
def test_a_variable_set_by_the_user_wins_over_everything(preset):
    env = {**TWO_MACHINES, preset: "eth7", netif.OVERRIDE: "eth3"}
    choice = netif.choose(env, route_to("10.0.0.5"))
    assert choice.ifname is None and f"{preset}=eth7" in choice.reason


def test_the_knob_names_the_interface_or_turns_selection_off():
    assert netif.choose({**TWO_MACHINES, netif.OVERRIDE: "eth3"}, route_to("10.0.0.5")).ifname == "eth3"
    assert netif.choose({"WORLD_SIZE": "1", netif.OVERRIDE: "eth3"}, route_to("10.0.0.5")).ifname == "eth3"
    assert netif.choose({**TWO_MACHINES, netif.OVERRIDE: "none"}, route_to("10.0.0.5")).ifname is None


def test_unroutable_master_or_unknown_source_leaves_the_variables_unset():
    def no_route(destination):
        raise OSError("Network is unreachable")

    assert "no route" in netif.choose(dict(TWO_MACHINES), no_route).reason
    assert netif.choose(dict(TWO_MACHINES), route_to("172.16.0.1")).ifname is None
    assert netif.choose({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, route_to("10.0.0.5")).reason == "MASTER_ADDR is not set"


def test_configure_sets_both_variables_from_the_real_routing_table():
    """Loopback is on every machine: a master at 127.0.0.1 is reached from lo's address, held by the loopback interface."""
    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    assert netif.source_address("127.0.0.1") == "127.0.0.1"
    loopback = netif.interface_with_address("127.0.0.1", netif.local_addresses())
    assert loopback is not None
    choice = netif.configure(env)
    assert choice.ifname == loopback and env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == loopback
    assert loopback in netif.describe(choice) and netif.OVERRIDE in netif.describe(choice)
