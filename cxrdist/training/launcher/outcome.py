"""The trainer's outcome, told to `cxrdist train` through files it owns instead of the launcher's text.

`accelerate launch` reports every failing trainer as exit 1 with a page of its own (and its wording changes
between releases), so `cxrdist train` gives the trainers a directory in CXRDIST_OUTCOME_DIR: each rank writes
`rank-R.json` = {"code": exit code, "message": its one line} as it ends, and the launcher side decides the exit
code from those files alone. Without the variable (a plain `accelerate launch cxrdist/train.py`) nothing is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

OUTCOME_DIR_ENV = "CXRDIST_OUTCOME_DIR"

# Which rank's code the run ends with when ranks differ: a user error (every rank raises it) says the most,
# then a preemption (every rank checkpointed), then anything else; 0 only when no rank failed.
PRIORITY = {2: 0, 75: 1}


@dataclass(frozen=True)
class Outcome:
    rank: int
    code: int
    message: str


def record(code: int, message: str = "") -> None:
    """Called by each trainer process as it ends (no-op outside `cxrdist train`)."""
    directory = os.environ.get(OUTCOME_DIR_ENV)
    if not directory:
        return
    from cxrdist.atomic import atomic_write_json

    rank = int(os.environ.get("RANK", "0"))
    try:
        atomic_write_json(Path(directory) / f"rank-{rank}.json", {"rank": rank, "code": int(code), "message": message})
    except OSError:  # the launcher side is gone (its directory with it): nobody is left to tell
        pass


def read(directory: Path) -> list[Outcome]:
    outcomes = []
    for path in sorted(Path(directory).glob("rank-*.json")):
        try:
            data = json.loads(path.read_text())
            outcomes.append(Outcome(int(data["rank"]), int(data["code"]), str(data.get("message", ""))))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a rank killed mid-write leaves only its temporary file, never a half file
    return outcomes


def decide(outcomes: list[Outcome], launcher_code: int) -> tuple[int, bool]:
    """(exit code of `cxrdist train`, whether the trainers explained it).

    Unexplained: the launcher failed and no trainer recorded a failure (a trainer killed by a signal or the
    kernel's OOM killer, or a launcher that never started one): then its own page is all the user has."""
    failed = [o for o in outcomes if o.code != 0]
    if launcher_code == 0 and not failed:
        return 0, True
    if not failed:
        return launcher_code or 1, False
    chosen = min(failed, key=lambda o: (PRIORITY.get(o.code, 2), o.rank))
    return chosen.code, True
