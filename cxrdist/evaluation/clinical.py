"""What a clinical team asks beyond AUC: operating points and calibration, in metrics.json.

Thresholds and temperatures are fitted on the out-of-fold predictions: each fold model's
predictions on the fold it was validated on (its best/val_predictions.csv, written by training),
pooled. They are then applied to the evaluated split's ensemble probabilities. The out-of-fold
predictions are single models without TTA; the evaluated ones are the TTA ensemble, which is a
little less spread out, so the out-of-fold figures are reported next to the applied ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist.errors import UserError
from cxrdist.evaluation.bootstrap import DEFAULT_RESAMPLES
from cxrdist.evaluation.calibration import apply_temperature, calibration_summary, fit_temperatures
from cxrdist.evaluation.operating_points import operating_points

VAL_PREDICTIONS_FILE = "val_predictions.csv"

OutOfFold = tuple[np.ndarray, np.ndarray, np.ndarray]  # targets, probabilities, mask (N, C) each


def read_val_predictions(path: Path, labels: Sequence[str]) -> OutOfFold:
    """(targets, probabilities, mask) from one val_predictions.csv (a blank target is masked out)."""
    table = pd.read_csv(path)
    missing = [c for label in labels for c in (f"target_{label}", f"prob_{label}") if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing columns {', '.join(missing[:3])}")
    raw_targets = table[[f"target_{label}" for label in labels]].to_numpy(dtype=np.float64)
    probs = table[[f"prob_{label}" for label in labels]].to_numpy(dtype=np.float64)
    mask = ~np.isnan(raw_targets)
    return np.nan_to_num(raw_targets), probs, mask.astype(np.float64)


def load_out_of_fold(model_dirs: Sequence[Path], labels: Sequence[str]) -> OutOfFold | None:
    """The pooled out-of-fold predictions of the fold models (their best/ directories); None if any is missing."""
    paths = [Path(d) / VAL_PREDICTIONS_FILE for d in model_dirs]
    if not paths or not all(p.is_file() for p in paths):
        return None
    parts = [read_val_predictions(p, labels) for p in paths]
    return tuple(np.concatenate([part[i] for part in parts]) for i in range(3))  # type: ignore[return-value]


def clinical_metrics(
    oof: OutOfFold | None,
    targets: np.ndarray,
    probs: np.ndarray,
    mask: np.ndarray,
    labels: Sequence[str],
    groups: Sequence,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict:
    """{"calibration": ..., "operating_points": ... or None}: the evaluated ensemble's calibration, and,
    when out-of-fold predictions exist, thresholds and temperatures fitted on them and applied here."""
    result: dict = {"calibration": {"ensemble": calibration_summary(targets, probs, mask, labels)}, "operating_points": None}
    if oof is None:
        result["calibration"]["note"] = "no val_predictions.csv in the models' best/ directories: no operating points or temperatures"
        return result
    temperatures = fit_temperatures(*oof, labels)
    result["calibration"].update(
        temperature=temperatures,
        temperature_scaled=calibration_summary(targets, apply_temperature(probs, [temperatures[label] for label in labels]), mask, labels),
        out_of_fold=calibration_summary(*oof, labels),
        out_of_fold_images=len(oof[0]),
    )
    result["operating_points"] = operating_points(oof, (targets, probs, mask), labels, groups, resamples, seed)
    result["operating_points"]["out_of_fold_images"] = len(oof[0])
    return result
