"""A lost rank noticed in bounded time, whatever the collectives are doing.

A node that vanishes (power, a partition: no TCP reset) leaves the other ranks blocked in a collective until
gloo's read gives up at TCP's retransmission limit (~15 minutes), whatever the process-group timeout says. So
every rank of a multi-process run beats, from a daemon thread, a counter of its own in the launcher's
rendezvous store (the TCPStore on machine 0, at MASTER_ADDR:MASTER_PORT) and reads everyone's; a second thread
ends the process with one line when some rank's counter has not moved, or the store has not answered, for
`train.heartbeat_timeout` seconds. The threads run while the main thread is busy (a long evaluation, a
checkpoint on a slow filesystem, a collective): only a rank whose process or network is gone stops beating.

A rank that ends says how: ENDED once its training is done (its silence is expected from then on), FAILED when
it ends any other way (an uncaught exception, a refused setting: the at-exit stop of a rank that never finished).
The others stop on a failed rank as on a lost one, naming it and its error line, a few beats later (time for
their own line when every rank meets the same error), instead of waiting in a collective for
`train.dist_timeout`.
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

PREFIX = "cxrdist/heartbeat"
# Added to a rank's counter when it ends normally: from then on its silence is expected, not a loss.
ENDED = 1 << 40
# Added instead when it ends by an error: the others stop as for a lost rank, after FAILED_GRACE_BEATS beats.
FAILED = 1 << 42
FAILED_GRACE_BEATS = 2
MAX_ERROR_CHARS = 300  # of the failed rank's line, repeated by the others
MAX_INTERVAL = 10.0  # seconds between beats, at most
MAX_NAMED = 8  # silent ranks named in the verdict beyond the first
BEATS_PER_BOUND = 12  # the interval is the bound over this, so a rank misses many beats before it counts as lost


LOST_HINT = "a node lost, partitioned or frozen"


def interval_for(bound: float) -> float:
    return max(0.2, min(MAX_INTERVAL, bound / BEATS_PER_BOUND))


@dataclass
class Liveness:
    """Who is overdue, from the counters read off the store, judged by this process's own clock (the hosts' clocks
    need not agree: only a counter's change is compared, with the time this process saw it change)."""

    world_size: int
    rank: int
    bound: float
    started: float
    last_count: dict[int, int] = field(default_factory=dict)
    last_change: dict[int, float] = field(default_factory=dict)
    hosts: dict[int, str] = field(default_factory=dict)
    store_seen: float = 0.0
    grace: float = 0.0  # how long a failed rank is given before it is reported (the others' own error lines first)
    failed_at: dict[int, float] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # a failed rank's own line, when it left one

    def __post_init__(self) -> None:
        self.store_seen = self.started

    def observe(self, counts: dict[int, int], now: float) -> None:
        """A successful read of the store: each rank's counter (absent: that rank has not beaten yet)."""
        self.store_seen = now
        for rank, count in counts.items():
            if self.last_count.get(rank) != count:
                self.last_count[rank], self.last_change[rank] = count, now
            if count >= FAILED:
                self.failed_at.setdefault(rank, now)

    def ended(self, rank: int) -> bool:
        """Ended normally or by an error: either way it beats no more."""
        return self.last_count.get(rank, 0) >= ENDED

    def failure(self, now: float) -> str | None:
        """The first rank that ended by an error and was given its grace, in words, or None."""
        failed = sorted(rank for rank, seen in self.failed_at.items() if rank != self.rank and now - seen >= self.grace)
        if not failed:
            return None
        first = failed[0]
        error = self.errors.get(first, "")
        return f"rank {first}{self.where(first)} ended by an error" + (f" ({error})" if error else " (its own output says which)")

    def verdict(self, now: float) -> str | None:
        """Why this rank must stop, in words, or None while everyone is heard from within the bound."""
        if now - self.store_seen > self.bound:
            return f"no answer from the rendezvous store on machine 0 for {now - self.store_seen:.0f} s"
        # A rank counts as silent only for as long as the store answered without its counter moving: while the store
        # is unreachable (machine 0 or this machine's link dark) nothing is known about the ranks, and that is the verdict.
        silent = {rank: now - self.last_change.get(rank, self.started) for rank in range(self.world_size)
                  if rank != self.rank and not self.ended(rank)}
        lost = [rank for rank in silent if self.store_seen - self.last_change.get(rank, self.started) > self.bound]
        if not lost:
            return None
        first, more = lost[0], lost[1:]
        words = f"no heartbeat from rank {first}{self.where(first)} for {silent[first]:.0f} s"
        if more:
            hosts = sorted({self.hosts[r] for r in more if r in self.hosts})
            shown = ", ".join(map(str, more[:MAX_NAMED])) + (", ..." if len(more) > MAX_NAMED else "")
            words += f", nor from {len(more)} more (rank {shown}{' on ' + ', '.join(hosts) if hosts else ''})"
        return words

    def where(self, rank: int) -> str:
        return f" on {self.hosts[rank]}" if rank in self.hosts else ""


class Heartbeat:
    """Beats this rank's counter and watches everyone's, on two daemon threads (the watcher never waits on the
    network, so a store call stuck on a dark link cannot delay the verdict)."""

    def __init__(self, rank: int, world_size: int, bound: float, master: tuple[str, int], on_lost) -> None:
        self.rank, self.world_size, self.master = rank, world_size, master
        self.bound, self.interval = bound, interval_for(bound)
        self.op_timeout = max(self.interval, min(bound / 4, 30.0))
        self.on_lost = on_lost  # called with the verdict's words; expected not to return (it ends the process)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # keys of an earlier attempt in the same store
        self.prefix = f"{PREFIX}/{restart}"
        self.liveness = Liveness(world_size, rank, bound, started=time.monotonic(), grace=FAILED_GRACE_BEATS * self.interval)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.error: str | None = None  # this rank's own error line, when it ends by one (ending_by_error)
        self.store = None
        self.threads = [threading.Thread(target=self._beat, name="cxrdist-heartbeat", daemon=True),
                        threading.Thread(target=self._watch, name="cxrdist-heartbeat-watch", daemon=True)]

    def start(self) -> Heartbeat:
        for thread in self.threads:
            thread.start()
        # Any exit (a user error before training, an exception) must stop the beat first: a daemon thread still inside a
        # store call when the interpreter finalises is ended through C++ frames, and the process aborts (SIGABRT).
        # An exit that did not go through stop() is one that never finished training: an error.
        atexit.register(self.stop, failed=True)
        return self

    def stop(self, failed: bool = False) -> None:
        """This rank ends, normally or (`failed`) by an error: tell the others (best effort) and stop both threads,
        waiting for a store call in flight."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        failed = failed or self.error is not None
        with self.lock:
            try:
                store = self._client()
                if failed and self.error:
                    store.set(self._key(self.rank, "error"), self.error[:MAX_ERROR_CHARS])  # before the mark: readers rely on it
                store.add(self._key(self.rank), FAILED if failed else ENDED)
            except Exception:  # noqa: BLE001 - the store may be gone already; the others then judge by the bound
                pass
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout=self.op_timeout + self.interval)

    # ---- the threads ------------------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self.stopped.is_set():
            with self.lock:
                try:
                    counts = self._exchange()
                    with_host = [r for r in counts if r not in self.liveness.hosts]
                    if with_host:
                        self.liveness.hosts.update(self._hosts(with_host))
                    with_error = [r for r, c in counts.items() if c >= FAILED and r not in self.liveness.errors]
                    if with_error:
                        self.liveness.errors.update(self._errors(with_error))
                    self.liveness.observe(counts, time.monotonic())
                except Exception:  # noqa: BLE001 - a store call that failed or timed out is a missed beat
                    self.store = None  # a timed-out connection may deliver a late answer: start a fresh one
            self.stopped.wait(self.interval)

    def _watch(self) -> None:
        while not self.stopped.wait(min(1.0, self.interval)):
            now = time.monotonic()
            failure, words = self.liveness.failure(now), self.liveness.verdict(now)
            if self.stopped.is_set():
                return
            if failure is not None:
                self.on_lost(failure)
            elif words is not None:
                self.on_lost(f"{words} (train.heartbeat_timeout={self.bound:g} s): {LOST_HINT}")

    # ---- the store --------------------------------------------------------------------------------------------
    def _key(self, rank: int, kind: str = "beat") -> str:
        return f"{self.prefix}/{kind}/{rank}"

    def _client(self):
        if self.store is None:
            import torch.distributed as dist

            host, port = self.master
            self.store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=self.op_timeout))
            self.store.set(self._key(self.rank, "host"), describe_self(host))  # before the counter exists: readers rely on it
        return self.store

    def _exchange(self) -> dict[int, int]:
        """Beat once and read every rank's counter ({rank: count} of those that have beaten)."""
        store = self._client()
        store.add(self._key(self.rank), 1)
        keys = [self._key(r) for r in range(self.world_size)]
        if store.check(keys):
            counts = {r: int(v) for r, v in enumerate(store.multi_get(keys))}
        else:
            counts = {r: store.add(key, 0) for r, key in enumerate(keys)}  # add 0 reads without waiting for a missing key
        return {r: c for r, c in counts.items() if c > 0}  # 0: created by a reader, that rank has not beaten yet

    def _hosts(self, ranks: list[int]) -> dict[int, str]:
        values = self.store.multi_get([self._key(r, "host") for r in ranks])
        return {r: v.decode(errors="replace") for r, v in zip(ranks, values)}

    def _errors(self, ranks: list[int]) -> dict[int, str]:
        """The lines failed ranks left ("" for one that left none: an uncaught exception ends through the at-exit stop)."""
        keys = [self._key(r, "error") for r in ranks]
        return {r: self.store.get(key).decode(errors="replace") if self.store.check([key]) else "" for r, key in zip(ranks, keys)}


def describe_self(master: str) -> str:
    """This machine's name and the address it reaches machine 0 from (host names may be alike, addresses differ)."""
    from cxrdist.training.cluster.netif import source_address

    try:
        address = source_address(master)
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()} ({address})"


_running: list[Heartbeat] = []  # this process's heartbeat, for ending_by_error


def ending_by_error(line: str) -> None:
    """This rank is ending by an error (its one line): stop watching first, so that no verdict of ours comes before
    that line, and tell the others which error it was."""
    for heartbeat in _running:
        heartbeat.error = line
        heartbeat.stop(failed=True)


def start_heartbeat(bound: float, on_lost) -> Heartbeat | None:
    """Started by every rank once the process group exists; None for one process, bound 0 (off), or a launcher
    that names no rendezvous store."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    master, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world < 2 or bound <= 0 or not master or not port:
        return None
    import torch.distributed  # noqa: F401 - here, not in the thread: an import there can take seconds of the bound
    heartbeat = Heartbeat(int(os.environ.get("RANK", "0")), world, bound, (master, int(port)), on_lost).start()
    _running.append(heartbeat)
    return heartbeat
