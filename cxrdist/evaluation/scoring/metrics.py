"""Per-label and macro ROC-AUC (scikit-learn), skipping labels with a single class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def label_auc(targets: np.ndarray, scores: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """ROC-AUC of one label over its unmasked entries; None when only one class is present."""
    keep = np.ones(len(targets), dtype=bool) if mask is None else np.asarray(mask) > 0
    y, s = np.asarray(targets)[keep], np.asarray(scores)[keep]
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, s))


def auc_summary(targets: np.ndarray, scores: np.ndarray, labels: Sequence[str], mask: np.ndarray | None = None) -> dict:
    """{"macro_auc", "per_label": {label: auc or None}, "skipped": [labels with one class], "evaluated": n}.

    Macro AUC = mean of the per-label AUCs over labels that have both classes (NaN if none has).
    """
    per_label = {}
    for j, label in enumerate(labels):
        per_label[label] = label_auc(targets[:, j], scores[:, j], None if mask is None else mask[:, j])
    valid = [v for v in per_label.values() if v is not None]
    return {
        "macro_auc": float(np.mean(valid)) if valid else float("nan"),
        "per_label": per_label,
        "skipped": [label for label, v in per_label.items() if v is None],
        "evaluated": int(len(targets)),
    }
