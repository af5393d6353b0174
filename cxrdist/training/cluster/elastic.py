"""Elastic restarts: a trainer that dies is started again inside the same job by the launcher (torch elastic's agent,
which `accelerate launch --max_restarts N` runs), and resumes from the newest complete checkpoint on however many
processes came back (data/order.py, training/topology.py). No rendezvous of our own: torch elastic's c10d rendezvous,
with its TCP store not shared with the trainers (RESTART_ENVIRONMENT), so that every restart bootstraps its process
group on a fresh store: the static rendezvous, and the c10d one sharing its store, keep the first attempt's keys, and
a restarted rank can read a dead peer's address from them ("Gloo connectFullMesh failed ... Connection refused": seen
in tests/test_elastic.py with either, on 2 of 7 and on 2 of 2 restarted runs).

The agent restarts its worker group after any failure; it cannot tell a dead node from a trainer that ended on
purpose. A trainer that ends on purpose (a user error, exit 2: the same on every restart; or a preemption, exit 75:
the scheduler is ending the job and requeues it) therefore asks its agent (its parent process) to stop with SIGTERM,
on which the agent ends its workers and exits without restarting them. Only failures (a lost peer, exit 1; a crash;
a process killed) are restarted, at most `--max-restarts` times.

The agent acts on the first worker that exits, and ends the others: so under an agent that would restart, a trainer
other than its machine's first (LOCAL_RANK 0, the one that says a user error) does not exit but waits for the first to
stop the agent, which ends it; only if that does not come (an error on this rank alone) does it say the error itself
and stop the agent. One line per machine, and no restart.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from cxrdist.errors import UserError

MAX_RESTARTS_LIMIT = 100  # beyond this a "restart" budget is a loop that hides a broken job, not resilience
RESTART_RENDEZVOUS = "c10d"  # accelerate launch --rdzv_backend with restarts (slurm/train_folds.sh says the same)
# torch elastic's opt-out of sharing the rendezvous store: the trainers' MASTER_PORT is then a new store per round
# (torch/distributed/elastic/rendezvous/dynamic_rendezvous.py). slurm/train_folds.sh exports the same.
RESTART_ENVIRONMENT = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
FIRST_RANK_GRACE_S = 60.0  # how long another trainer waits for its machine's first to end the agent


def check_max_restarts(value: int, where: str = "--max-restarts") -> int:
    if not 0 <= value <= MAX_RESTARTS_LIMIT:
        raise UserError(f"{where}={value}: expected 0 (no restarts) to {MAX_RESTARTS_LIMIT} restarts of the trainers")
    return value


def restarts_left(environ=os.environ) -> int:
    """How many more times this process's elastic agent would restart the trainers after a failure (0 outside one)."""
    if "TORCHELASTIC_RUN_ID" not in environ:
        return 0
    return max(0, int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def end_on_purpose(line: str | None, environ=os.environ) -> None:
    """This trainer ends on purpose: say `line` (a user error) once per machine, and keep the agent from restarting."""
    first = environ.get("LOCAL_RANK", "0") == "0"
    if restarts_left(environ) and not first:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the agent's SIGTERM, once the first stopped it, ends this process
        time.sleep(FIRST_RANK_GRACE_S)
        first = True  # still here: the first trainer of this machine did not end, so this one speaks and stops the agent
    if first and line:
        print(line, file=sys.stderr, flush=True)
    stop_restarts(environ)


def stop_restarts(environ=os.environ) -> bool:
    """This trainer ends on purpose: ask the elastic agent that started it not to start it again. Returns whether it asked."""
    if restarts_left(environ) == 0:
        return False
    try:
        os.kill(os.getppid(), signal.SIGTERM)
    except ProcessLookupError:  # the agent is gone already
        return False
    return True


def restart_sentence(environ=os.environ) -> str:
    """What happens after a failure, for the line a rank that lost its peers ends with."""
    left = restarts_left(environ)
    if left == 0:
        return "Restart every node to resume from the newest complete checkpoint."
    done = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return (f"The launcher restarts the trainers (restart {done + 1} of {done + left}, --max-restarts) and they resume from the "
            "newest complete checkpoint.")
