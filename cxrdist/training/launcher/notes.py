"""Notes said once per command, not once per fold: a command that trains several folds (`cxrdist train --fold all`,
`cxrdist demo`) gives its trainers a folder (CXRDIST_NOTES_DIR) where rank 0 records what it noted, as files.

- `say_note(..., at_end=False)`: said by the first fold that notes `key`, and by no later fold of the command (the EMA
  schedule: the same for every fold);
- `say_note(..., at_end=True)`: recorded only; the command says it once after its folds, naming the folds that noted it
  (the inert-refinement note: "folds 0, 1, 2: the label-graph refinement is inert: ...").
A trainer started alone (no folder) says every note at once, as before.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cxrdist.atomic import atomic_write_text
from cxrdist.layout import fold_sort_key
from cxrdist.log import get_logger

NOTES_DIR_ENV = "CXRDIST_NOTES_DIR"
DEFERRED = "at-end"


def say_note(key: str, message: str, fold: int | None, say: Callable[[str], None], at_end: bool = False) -> None:
    """Rank 0 of a trainer: say `message` now, later (at_end) or not at all (said by an earlier fold); see the module."""
    folder = os.environ.get(NOTES_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        say(message)
        return
    kind = Path(folder) / (DEFERRED if at_end else "once") / key
    already = kind.is_dir() and any(kind.iterdir())
    kind.mkdir(parents=True, exist_ok=True)
    atomic_write_text(kind / f"fold-{'none' if fold is None else fold}.json", json.dumps({"fold": fold, "message": message}))
    if not at_end and not already:
        say(message)


def deferred_notes(folder: Path) -> list[str]:
    """The at-end notes of a command: one line per distinct message, naming the folds that noted it."""
    lines = []
    for key in sorted((folder / DEFERRED).glob("*")):
        by_message: dict[str, list] = {}
        for path in sorted(key.glob("*.json"), key=lambda p: fold_sort_key(p.stem)):
            record = json.loads(path.read_text())
            by_message.setdefault(record["message"], []).append(record["fold"])
        for message, folds in by_message.items():
            named = [str(f) for f in folds if f is not None]
            lines.append((f"fold{'s' * (len(named) > 1)} {', '.join(named)}: " if named else "") + message)
    return lines


def say_cxrdist(line: str) -> None:
    get_logger("train").info(f"cxrdist: {line}")  # as the trainers say their notes


@contextmanager
def collected_notes(say: Callable[[str], None] = say_cxrdist) -> Iterator[None]:
    """Trainers started inside share a notes folder; on leaving, each at-end note is said once through `say`."""
    previous = os.environ.get(NOTES_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="cxrdist-notes-") as folder:
        os.environ[NOTES_DIR_ENV] = folder
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(NOTES_DIR_ENV, None)
            else:
                os.environ[NOTES_DIR_ENV] = previous
            for line in deferred_notes(Path(folder)):
                say(line)
