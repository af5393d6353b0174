"""A host that goes dark is noticed in bounded time (cxrdist/training/cluster/heartbeat.py), on two network namespaces
(tests/two_hosts.py) with one `accelerate launch` per host, as tests/test_multinode.py runs them.

Without the heartbeat, at the default settings, the first host's trainer waited 931 s for gloo's read to give up at
TCP's retransmission limit (train.dist_timeout=600 s did not end it). Here:
  - default settings: host 1 goes dark and its processes die; host 0's trainer stops with one line naming rank 1;
  - host 0 (the rendezvous store's machine) goes dark: host 1's trainer stops too, with a shortened bound;
  - rank 1 sleeps in its main thread at a checkpoint for longer than the bound: nothing trips, the run finishes.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from cxrdist.training.config import TrainConfig
from test_multinode import FOLD, LOST_CONTACT, host_env, start, wait_for_step
from trainer_utils import REPO
from two_hosts import TwoHosts, two_hosts_or_skip

DEFAULT_BOUND = TrainConfig().heartbeat_timeout
# Guards, not speed requirements: each stays far below train.dist_timeout's 600 s default and TCP's ~15 minutes,
# so only the heartbeat can end the survivor in time.
DEFAULT_GUARD = DEFAULT_BOUND + 240
SHORT_BOUND = 15
SHORT_GUARD = SHORT_BOUND + 200
FINISH_GUARD = 900
PAUSE = 2 * SHORT_BOUND  # seconds rank 1's main thread sleeps in every checkpoint (tests/slow_rank/sitecustomize.py)


@pytest.fixture(scope="module")
def hosts() -> TwoHosts:
    yield from two_hosts_or_skip(tag=f"lh{os.getpid()}")


def lose_host(hosts: TwoHosts, shards: Path, tmp_path: Path, lost: int, port: int, settings: dict) -> tuple[int, str]:
    """Train until step 4, take host `lost` dark (link down, then its processes killed: no reset reaches the
    other), and return the survivor's exit code and output."""
    survivor = 1 - lost
    run = start(hosts, tmp_path, shards, f"lose-host{lost}", port, settings={"train.epochs": 2, "data.workers": 1, **settings})
    try:
        wait_for_step(run, tmp_path / "demo" / f"fold-{FOLD}", 4)
        hosts.link(lost, up=False)
        run.kill(lost)
        guard = DEFAULT_GUARD if "train.heartbeat_timeout" not in settings else SHORT_GUARD
        try:
            code, seconds = run.wait(survivor, timeout=guard)
        except subprocess.TimeoutExpired:
            pytest.fail(f"host {survivor} still running {guard} s after host {lost} went dark:\n{run.output(survivor)[-4000:]}")
        print(f"\nhost {lost} dark: host {survivor}'s trainer exited {seconds:.1f} s later ({settings or 'default settings'})")
        return code, run.output(survivor)
    finally:
        run.stop()
        hosts.link(lost, up=True)


def the_line(output: str, rank: int) -> str:
    """The survivor's one 'lost contact' line, after its rank."""
    lines = re.findall(LOST_CONTACT.pattern.replace("rank 0", f"rank {rank}"), output, re.MULTILINE)
    assert len(lines) == 1, output[-4000:]
    return lines[0]


@pytest.mark.slow
def test_at_the_defaults_a_dark_host_stops_the_other_naming_the_lost_rank(hosts, synth_shards, tmp_path):
    code, output = lose_host(hosts, synth_shards, tmp_path, lost=1, port=29521, settings={})
    assert code != 0, output[-4000:]
    line = the_line(output, rank=0)
    assert re.match(rf"no heartbeat from rank 1 on \S+ \({re.escape(hosts.addresses[1])}\) for \d+ s "
                    rf"\(train.heartbeat_timeout={DEFAULT_BOUND} s\)", line), line


@pytest.mark.slow
def test_the_stores_host_going_dark_stops_the_other_host(hosts, synth_shards, tmp_path):
    """Machine 0 holds the launcher's rendezvous store: the ranks elsewhere cannot beat and must stop too."""
    code, output = lose_host(hosts, synth_shards, tmp_path, lost=0, port=29522, settings={"train.heartbeat_timeout": SHORT_BOUND})
    assert code != 0, output[-4000:]
    assert the_line(output, rank=1).startswith("no answer from the rendezvous store on machine 0 for "), output[-4000:]


@pytest.mark.slow
def test_a_rank_busy_longer_than_the_bound_in_its_main_thread_does_not_trip_it(hosts, synth_shards, tmp_path):
    """Rank 1 sleeps PAUSE s (twice the bound) in its main thread inside every checkpoint: a slow shared filesystem."""
    env = host_env()
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests" / "slow_rank"), env.get("PYTHONPATH")])),
               CXRDIST_TEST_SLOW_RANK=f"1:{PAUSE}")
    settings = {"train.epochs": 1, "data.workers": 1, "train.heartbeat_timeout": SHORT_BOUND}
    run = start(hosts, tmp_path, synth_shards, "pause", 29523, settings=settings, env=env)
    try:
        done = [run.wait(host, timeout=FINISH_GUARD)[0] for host in (0, 1)]
    finally:
        run.stop()
    for host in (0, 1):
        assert done[host] == 0 and "lost contact" not in run.output(host), run.output(host)[-4000:]
    assert "cxrdist: done:" in run.output(0)
    assert f"CXRDIST_TEST_SLOW_RANK: rank 1 slept {PAUSE} s in save_state" in run.output(1), run.output(1)[-4000:]
