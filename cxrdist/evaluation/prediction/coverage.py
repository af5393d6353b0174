"""Whether an ensemble holds every fold of its experiment, and the console line each command says when it does not
(`evaluate`, `predict`, `export`, `report`): an ensemble of fewer folds is a different model, never a silent one."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cxrdist.layout import BEST_DIR, CARD_FILE, fold_name, fold_run_dirs, fold_sort_key
from cxrdist.log import get_logger

LOG = get_logger("coverage")


def is_experiment_dir(runs: Path) -> bool:
    """runs/EXP (the folds' parent), not one fold directory or one best/ directory (a single model, chosen on purpose)."""
    runs = Path(runs)
    return runs.is_dir() and not (runs / CARD_FILE).is_file() and not (runs / BEST_DIR / CARD_FILE).is_file()


def missing_folds(runs: Path, trained: Iterable[str], num_folds: int | None) -> dict[str, str]:
    """{fold name: why it is missing} for the folds of experiment `runs` (its fold-K directories and the
    dataset's folds 0..num_folds-1) that are not among `trained`."""
    trained = set(trained)
    on_disk = {d.name for d in fold_run_dirs(runs)}
    expected = on_disk | {fold_name(k) for k in range(num_folds or 0)}
    missing = {}
    for name in sorted(expected - trained, key=fold_sort_key):
        missing[name] = "no finished best model" if name in on_disk else "never trained: no directory"
    return missing


def coverage_note(runs: Path, trained: Iterable[str], num_folds: int | None) -> str | None:
    """'ensemble of 1 of 3 folds (fold-0); missing: ...', or None when every fold is there."""
    trained = sorted(set(trained), key=fold_sort_key)
    missing = missing_folds(runs, trained, num_folds)
    if not missing:
        return None
    total = len(trained) + len(missing)
    gone = ", ".join(f"{name} ({why})" for name, why in missing.items())
    return f"ensemble of {len(trained)} of {total} folds ({', '.join(trained)}); missing: {gone}"


def say_coverage(command: str, runs: Path, cards) -> str | None:
    """Say on stderr (one line) which folds of experiment `runs` the models `cards` leave out; returns the note."""
    if not is_experiment_dir(runs):
        return None
    counts = [c.dataset.get("num_folds") for c in cards if isinstance(c.dataset, dict)]
    note = coverage_note(runs, [fold_name(c.fold) for c in cards], max((n for n in counts if isinstance(n, int)), default=None))
    if note is not None:
        LOG.warning(f"cxrdist {command}: warning: {note}")
    return note


def say_stale_ensemble(command: str, evaluated: Iterable[str], trained: Iterable[str]) -> str | None:
    """Say on stderr when the evaluated ensemble (its metrics.json) lacks folds that are trained now."""
    newer = sorted(set(trained) - set(evaluated), key=fold_sort_key)
    if not newer:
        return None
    note = f"the evaluated ensemble leaves out {', '.join(newer)}, trained since: run `cxrdist evaluate` again"
    LOG.warning(f"cxrdist {command}: warning: {note}")
    return note
