"""Operating points: sensitivity at a fixed specificity and specificity at a fixed sensitivity.

A threshold is chosen on one set of predictions (the out-of-fold predictions of the held-out
folds) and then applied, unchanged, to another (the test split): choosing it on the test split
itself would report the best case, not what a deployed threshold achieves. A score at or above
the threshold counts as positive (scikit-learn's `roc_curve` convention).

Intervals on the applied split are patient-bootstrap percentile intervals (the resampling of
`bootstrap.patient_weights`): the threshold stays fixed, only the evaluated images are resampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from cxrdist.evaluation.scoring.bootstrap import CHUNK, DEFAULT_LEVEL, DEFAULT_RESAMPLES, patient_weights, percentile_interval

TARGET_LEVELS = (0.90, 0.95)


def point_names(levels: Sequence[float] = TARGET_LEVELS) -> list[tuple[str, str, float]]:
    """[(name, fixed quantity, level)]: "sens@spec90" fixes specificity at 0.90 and reports sensitivity, ..."""
    names = [(f"sens@spec{round(100 * level)}", "specificity", level) for level in levels]
    return names + [(f"spec@sens{round(100 * level)}", "sensitivity", level) for level in levels]


def threshold_for_specificity(targets: np.ndarray, scores: np.ndarray, level: float) -> float | None:
    """The lowest threshold whose specificity is >= `level` (so the highest sensitivity that keeps it); None without both classes.
    Infinite when only calling no image positive keeps it (the top scores belong to too many negatives): not reachable."""
    y = np.asarray(targets) > 0
    if y.all() or not y.any():
        return None
    fpr, _tpr, thresholds = roc_curve(y, scores, drop_intermediate=False)
    allowed = np.flatnonzero(fpr <= 1 - level + 1e-12)
    return float(thresholds[allowed[-1]])  # fpr grows as the threshold falls: the last allowed point is the lowest


def threshold_for_sensitivity(targets: np.ndarray, scores: np.ndarray, level: float) -> float | None:
    """The highest threshold whose sensitivity is >= `level` (so the highest specificity that keeps it); None without both classes."""
    y = np.asarray(targets) > 0
    if y.all() or not y.any():
        return None
    _fpr, tpr, thresholds = roc_curve(y, scores, drop_intermediate=False)
    reached = np.flatnonzero(tpr >= level - 1e-12)
    return float(thresholds[reached[0]])


def rates(targets: np.ndarray, scores: np.ndarray, threshold: float, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sensitivity, specificity) of `scores >= threshold`, one per row of `weights` (R, N); NaN where a class has no weight."""
    y = np.asarray(targets) > 0
    called = np.asarray(scores) >= threshold
    w = np.ones((1, len(y))) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = (w * (y & called)).sum(axis=1) / (w * y).sum(axis=1)
        specificity = (w * (~y & ~called)).sum(axis=1) / (w * ~y).sum(axis=1)
    return sensitivity, specificity


def choose_thresholds(targets: np.ndarray, scores: np.ndarray, mask: np.ndarray | None, labels: Sequence[str],
                      levels: Sequence[float] = TARGET_LEVELS) -> dict[str, dict[str, float | None]]:
    """{label: {point name: threshold or None}} chosen on (targets, scores), masked entries left out."""
    keep = np.ones_like(targets, dtype=bool) if mask is None else np.asarray(mask) > 0
    chosen = {}
    for j, label in enumerate(labels):
        y, s = np.asarray(targets)[keep[:, j], j], np.asarray(scores)[keep[:, j], j]
        finder = {"specificity": threshold_for_specificity, "sensitivity": threshold_for_sensitivity}
        chosen[label] = {name: finder[fixed](y, s, level) for name, fixed, level in point_names(levels)}
    return chosen


def _first(values: np.ndarray) -> float | None:
    value = float(values[0])
    return value if np.isfinite(value) else None


def applied_operating_points(
    thresholds: dict[str, dict[str, float | None]],
    targets: np.ndarray,
    scores: np.ndarray,
    mask: np.ndarray | None,
    labels: Sequence[str],
    groups: Sequence,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> dict[str, dict[str, dict]]:
    """Each threshold applied to (targets, scores): {label: {point: {threshold, sensitivity, specificity, *_interval}}}."""
    keep = np.ones_like(targets, dtype=bool) if mask is None else np.asarray(mask) > 0
    weights = patient_weights(groups, n_resamples, seed)
    result: dict[str, dict[str, dict]] = {}
    for j, label in enumerate(labels):
        result[label] = {}
        for name, threshold in thresholds[label].items():
            entry = {"threshold": threshold, "sensitivity": None, "specificity": None, "sensitivity_interval": None, "specificity_interval": None}
            y, s = np.asarray(targets)[:, j], np.asarray(scores)[:, j]
            if threshold is not None and not np.isfinite(threshold):
                entry.update(threshold=None, reachable=False, note=unreachable_note(name))
            elif threshold is not None and len(np.unique(y[keep[:, j]])) == 2:
                sens, spec = rates(y[keep[:, j]], s[keep[:, j]], threshold)
                boot_sens, boot_spec = [np.zeros(0)], [np.zeros(0)]
                for start in range(0, n_resamples, CHUNK):
                    bs, bp = rates(y, s, threshold, weights[start : start + CHUNK] * keep[:, j])
                    boot_sens.append(bs)
                    boot_spec.append(bp)
                entry.update(sensitivity=_first(sens), specificity=_first(spec),
                             sensitivity_interval=percentile_interval(np.concatenate(boot_sens), level),
                             specificity_interval=percentile_interval(np.concatenate(boot_spec), level))
            result[label][name] = entry
    return result


def unreachable_note(name: str) -> str:
    fixed = "specificity" if name.startswith("sens@") else "sensitivity"
    level = name.rsplit(fixed[:4], 1)[1]
    return (f"not reachable: on the out-of-fold predictions no threshold keeps {fixed} >= {level}% "
            "while calling any image positive (the highest scores belong to too many negatives)")


def operating_points(
    oof: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    evaluated: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    labels: Sequence[str],
    groups: Sequence,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    levels: Sequence[float] = TARGET_LEVELS,
) -> dict:
    """Thresholds chosen on the out-of-fold (targets, scores, mask), applied to the evaluated split's.

    Also reports what each threshold achieves on the out-of-fold predictions themselves (where it
    meets its target by construction), so a gap between the two shows the shift between them.
    """
    thresholds = choose_thresholds(*oof, labels, levels)
    return {
        "chosen_on": "out-of-fold predictions of the held-out folds",
        "rule": "positive when score >= threshold",
        "points": [name for name, _, _ in point_names(levels)],
        "per_label": applied_operating_points(thresholds, *evaluated, labels, groups, n_resamples, seed=seed),
        "out_of_fold": applied_operating_points(thresholds, *oof, labels, np.arange(len(oof[0])), n_resamples=0),
    }
