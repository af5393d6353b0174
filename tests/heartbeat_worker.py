"""One rank of tests/test_heartbeat.py: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT as a launcher sets them, a
rendezvous store the test hosts. Beats with `train.heartbeat_timeout`=argv[1] while its main thread sleeps argv[2]
seconds (a long evaluation or checkpoint), then ends normally (exit 0), or with argv[3] == "raise" by an uncaught
exception (what a crash in the training loop is); the heartbeat's verdict exits 1."""

from __future__ import annotations

import sys
import time

from cxrdist.training.cluster.failure import heartbeat_lost
from cxrdist.training.cluster.heartbeat import start_heartbeat

bound, busy = float(sys.argv[1]), float(sys.argv[2])
ends_by_error = sys.argv[3:] == ["raise"]
heartbeat = start_heartbeat(bound, on_lost=heartbeat_lost)
assert heartbeat is not None
while len(heartbeat.liveness.last_count) < heartbeat.world_size:  # every rank heard from once
    time.sleep(0.05)
print("beating", flush=True)
time.sleep(busy)
if ends_by_error:
    raise RuntimeError("planted failure on this rank")
heartbeat.stop()
print("ended normally", flush=True)
