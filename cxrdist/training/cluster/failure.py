"""A rank that lost its peers: recognise the process group's errors and say so in one line."""

from __future__ import annotations

import os
import sys
import threading

# What a surviving rank exits with. `accelerate launch` reports any non-zero code as 1; SLURM's
# srun --kill-on-bad-exit then ends the step on every node, and the fold task fails.
EXIT_LOST_PEER = 1

# gloo's and NCCL's words for a peer that is gone: its connection reset or closed (the process
# died), or no answer within the process-group timeout (the node vanished without a reset).
LOST_PEER_MARKERS = (
    "timeout caused pair closure", "timed out waiting", "connection closed by peer", "connection reset by peer",
    "broken pipe", "ncclremoteerror", "nccl watchdog", "gloo",
)


def peer_error(err: BaseException | None) -> BaseException | None:
    """The error of the process group (a dead or unreachable rank) that `err` is or was raised while handling (the
    elastic agent stops this rank's DataLoader workers as it restarts the group), or None: an error of the training."""
    import torch.distributed as dist

    while err is not None:
        text = str(err).lower()
        if isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(marker in text for marker in LOST_PEER_MARKERS)):
            return err
        err = err.__cause__ or err.__context__
    return None


def lost_peer(err: BaseException) -> bool:
    return peer_error(err) is not None


def cause(err: BaseException) -> str:
    text = str(err).lower()
    if "timed out" in text or "timeout" in text:
        return "no answer from another rank within train.dist_timeout (a node lost, partitioned or stuck)"
    return "another rank's connection closed (that process died)"


def lost_peer_message(err: BaseException) -> str:
    err = peer_error(err) or err
    detail = " ".join(str(err).split())[:300]
    return lost_contact_message(cause(err), f" ({type(err).__name__}: {detail})")


def lost_contact_message(why: str, detail: str = "") -> str:
    from cxrdist.training.cluster.elastic import restart_sentence

    rank = os.environ.get("RANK", "?")
    return f"rank {rank}: lost contact with the other ranks: {why}; stopping. {restart_sentence()}{detail}"


_STOPPING = threading.Lock()


def stop_lost_peer(message: str) -> None:
    """Say it in one line, record the outcome and leave now, from any thread; the first caller speaks, a second
    (the heartbeat's watcher and the main thread's collective can notice at once) waits for the exit.
    A normal interpreter exit would wait on gloo's pending work and the loader workers (seconds); the process
    group is broken, the checkpoints are whole."""
    from cxrdist.training.launcher import outcome

    _STOPPING.acquire()
    line = f"cxrdist train: error: {message}"
    print(line, file=sys.stderr, flush=True)  # every surviving rank says it: on another machine it may be the only line
    sys.stdout.flush()
    outcome.record(EXIT_LOST_PEER, line)
    os._exit(EXIT_LOST_PEER)


def heartbeat_lost(words: str) -> None:
    """The heartbeat's verdict (training/cluster/heartbeat.py): some rank, or machine 0's store, silent past the bound."""
    stop_lost_peer(lost_contact_message(words))
