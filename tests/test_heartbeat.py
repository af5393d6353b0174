"""The heartbeat (cxrdist/training/cluster/heartbeat.py): the verdict as pure logic, then real processes beating into a
real TCPStore that this test hosts, as the launcher does on machine 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from cxrdist.training.cluster.heartbeat import ENDED, FAILED, FAILED_GRACE_BEATS, Liveness, interval_for
from trainer_utils import REPO, free_port

WORKER = Path(__file__).with_name("heartbeat_worker.py")
GUARD = 120  # seconds: a guard for a loaded machine, not a speed requirement


# ---- pure: who is overdue ----

def test_a_rank_whose_counter_stops_is_named_after_the_bound_only():
    seen = Liveness(world_size=3, rank=0, bound=60, started=0.0)
    seen.hosts[2] = "node7 (10.0.0.7)"
    for t in range(0, 90, 10):
        seen.observe({0: t, 1: t, 2: min(t, 20)}, now=float(t))  # rank 2 last moved at t=20
        assert seen.verdict(float(t)) is None  # at t=80: 60 s silent, not yet past the bound
    assert seen.verdict(81.0) is None  # the store has not been read since t=80: nothing new is known of rank 2
    seen.observe({0: 81, 1: 81, 2: 20}, now=81.0)
    assert seen.verdict(81.0) == "no heartbeat from rank 2 on node7 (10.0.0.7) for 61 s"


def test_a_rank_never_heard_from_counts_from_the_start_and_an_ended_rank_never():
    seen = Liveness(world_size=3, rank=1, bound=30, started=100.0)
    seen.observe({1: 5, 2: 3}, now=110.0)
    seen.observe({1: 6, 2: 4}, now=130.0)
    assert seen.verdict(130.0) is None
    seen.observe({1: 6, 2: 5}, now=131.0)
    assert seen.verdict(131.0) == "no heartbeat from rank 0 for 31 s"
    seen.observe({0: ENDED + 4, 1: 6, 2: 4}, now=131.0)
    assert seen.verdict(1000.0) == "no answer from the rendezvous store on machine 0 for 869 s"
    seen.observe({0: ENDED + 4, 1: 7, 2: 5}, now=1000.0)
    assert seen.verdict(1030.0) is None  # rank 0 ended: its silence is expected


def test_a_rank_that_ended_by_an_error_is_named_with_its_line_after_the_grace_and_never_as_silent():
    seen = Liveness(world_size=3, rank=0, bound=60, started=0.0, grace=10)
    seen.hosts[1] = "node1 (10.0.0.2)"
    seen.observe({0: 1, 1: 1, 2: 1}, now=1.0)
    seen.errors[1] = "cxrdist train: crashed: RuntimeError: boom"
    seen.observe({0: 2, 1: 1 + FAILED, 2: 2}, now=5.0)
    assert seen.failure(14.0) is None  # the grace: the others' own error lines first, when every rank met the same error
    assert seen.failure(15.0) == "rank 1 on node1 (10.0.0.2) ended by an error (cxrdist train: crashed: RuntimeError: boom)"
    assert seen.verdict(15.0) is None and seen.ended(1)  # not "silent": it said how it ended
    seen.observe({0: 3, 1: 1 + FAILED, 2: 2 + ENDED}, now=20.0)
    assert seen.failure(1000.0).startswith("rank 1 ") and 2 not in seen.failed_at  # a normal end is never a failure
    unnamed = Liveness(world_size=2, rank=1, bound=60, started=0.0)
    unnamed.observe({0: 7 + FAILED, 1: 3}, now=2.0)
    assert unnamed.failure(2.0) == "rank 0 ended by an error (its own output says which)"


def test_every_silent_rank_and_its_host_is_named():
    seen = Liveness(world_size=12, rank=0, bound=30, started=0.0)
    seen.hosts.update({r: "node0 (10.0.0.1)" if r < 2 else "node1 (10.0.0.2)" for r in range(12)})
    seen.observe({r: 1 for r in range(12)}, now=1.0)
    seen.observe({r: 2 if r < 2 else 1 for r in range(12)}, now=40.0)  # ranks 2-11 (node1) stopped at t=1
    assert seen.verdict(40.0) == ("no heartbeat from rank 2 on node1 (10.0.0.2) for 39 s, "
                                  "nor from 9 more (rank 3, 4, 5, 6, 7, 8, 9, 10, ... on node1 (10.0.0.2))")


def test_the_store_unanswered_past_the_bound_is_the_verdict_even_when_a_rank_went_quiet_first():
    """Machine 0 going dark: its rank's counter stops a beat before its store stops answering; the store is the verdict."""
    seen = Liveness(world_size=2, rank=1, bound=30, started=0.0)
    seen.observe({0: 1, 1: 1}, now=4.0)
    seen.observe({0: 1, 1: 2}, now=5.0)  # rank 0 already quiet, the store still answered
    assert seen.verdict(35.0) is None
    assert seen.verdict(36.0) == "no answer from the rendezvous store on machine 0 for 31 s"


@pytest.mark.parametrize("bound, interval", [(120, 10.0), (12, 1.0), (1, 0.2), (600, 10.0)])
def test_beats_come_many_times_per_bound(bound, interval):
    assert interval_for(bound) == interval


# ---- real processes, a real store ----

def start_ranks(port: int, bound: float, busy: list[float], outcomes: Path, raises: int | None = None) -> list[subprocess.Popen]:
    procs = []
    for rank, seconds in enumerate(busy):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(len(busy)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "CXRDIST_OUTCOME_DIR": str(outcomes), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        ending = ["raise"] if rank == raises else []
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(bound), str(seconds), *ending], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def host_store(port: int):
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    done = []
    for proc in procs:
        out, _ = proc.communicate(timeout=GUARD)
        done.append((proc.returncode, out))
    return done


def lost_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("cxrdist train: error:")]


@pytest.mark.slow
def test_ranks_busy_far_longer_than_the_bound_are_not_lost(tmp_path):
    """The beats come from a thread: a main thread asleep 3x the bound (an evaluation, a slow checkpoint) trips nothing;
    nor does rank 0's silence after it ended normally, 12 s before rank 1."""
    port = free_port()
    store = host_store(port)  # noqa: F841 - kept alive while the ranks beat
    procs = start_ranks(port, bound=5, busy=[3, 15], outcomes=tmp_path)
    for code, output in finish(procs):
        assert code == 0 and "ended normally" in output and not lost_lines(output), output


@pytest.mark.slow
def test_a_frozen_rank_stops_the_other_with_one_line_naming_it(tmp_path):
    port = free_port()
    store = host_store(port)  # noqa: F841
    procs = start_ranks(port, bound=3, busy=[GUARD, GUARD], outcomes=tmp_path)
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "beating"
        os.kill(procs[1].pid, signal.SIGSTOP)  # the whole process, its heartbeat thread included: a node gone dark
        tic = time.monotonic()
        code, output = finish(procs[:1])[0]
        print(f"\nrank 0 stopped {time.monotonic() - tic:.1f} s after rank 1 froze (bound 3 s)")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert code == 1, output
    [line] = lost_lines(output)
    assert line.startswith("cxrdist train: error: rank 0: lost contact with the other ranks: no heartbeat from rank 1 on "), line
    assert line.endswith("(train.heartbeat_timeout=3 s): a node lost, partitioned or frozen; stopping. "
                         "Restart every node to resume from the newest complete checkpoint."), line
    recorded = json.loads((tmp_path / "rank-0.json").read_text())
    assert recorded["code"] == 1 and recorded["message"] == line


@pytest.mark.slow
def test_a_rank_that_raises_stops_the_others_within_the_bound_naming_it(tmp_path):
    """An uncaught exception runs the at-exit stop; it must not read as "ended normally" (the others would then wait in
    their next collective for train.dist_timeout): the survivor stops with one line naming the rank, within the bound."""
    bound = 24  # beats every 2 s: the survivor hears of the failure within a beat and gives it FAILED_GRACE_BEATS more
    port = free_port()
    store = host_store(port)  # noqa: F841
    procs = start_ranks(port, bound=bound, busy=[GUARD, 1], outcomes=tmp_path, raises=1)
    try:
        assert procs[0].stdout.readline().strip() == "beating"
        failed_code, failed_output = finish(procs[1:])[0]
        failed_at = time.monotonic()
        code, output = finish(procs[:1])[0]
        waited = time.monotonic() - failed_at
        print(f"\nrank 0 stopped {waited:.1f} s after rank 1 raised (bound {bound} s, grace {FAILED_GRACE_BEATS} beats)")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert failed_code == 1 and "RuntimeError: planted failure on this rank" in failed_output, failed_output
    assert code == 1, output
    [line] = lost_lines(output)
    assert line.startswith("cxrdist train: error: rank 0: lost contact with the other ranks: rank 1 on "), line
    assert "ended by an error (its own output says which); stopping." in line, line
    assert waited < bound, f"the survivor stopped {waited:.0f} s after the failure, past train.heartbeat_timeout={bound}"


@pytest.mark.slow
def test_machine_0s_store_gone_stops_every_rank(tmp_path):
    """The store lives on machine 0: when it is lost, the other machines' ranks cannot beat and must stop too."""
    port = free_port()
    store = host_store(port)
    procs = start_ranks(port, bound=3, busy=[GUARD, GUARD], outcomes=tmp_path)
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "beating"
        del store  # the server goes with it
        done = finish(procs)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for rank, (code, output) in enumerate(done):
        assert code == 1, output
        [line] = lost_lines(output)
        assert line.startswith(f"cxrdist train: error: rank {rank}: lost contact with the other ranks: "
                               "no answer from the rendezvous store on machine 0 for "), line
