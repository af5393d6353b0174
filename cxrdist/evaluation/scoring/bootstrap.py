"""Patient-resampled (cluster) bootstrap intervals for per-label and macro ROC-AUC.

Images of one patient are correlated, so the resampling unit is the patient: each resample draws
as many patients as there are, with replacement, and takes all their images. A patient drawn k
times gives its images weight k, and the AUC of the resample is the weighted AUC, which equals the
AUC of the data with those images repeated k times. The scores are sorted once per label; every
resample then only needs cumulative sums of its weights (vectorised over resamples).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
CHUNK = 200  # resamples per vectorised block: bounds memory at CHUNK x N floats


def patient_weights(groups: Sequence, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, N) int weights: how often each image's patient was drawn in each resample."""
    _, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_patients = int(index.max()) + 1 if len(index) else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, size=(n_resamples, n_patients))
    counts = np.zeros((n_resamples, n_patients), dtype=np.int64)
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1)
    return counts[:, index]


def weighted_auc(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC-AUC for each row of `weights` (R, N) over one label's (targets, scores); NaN without both classes.

    Mann-Whitney with weights and ties counted one half: sum over positives i and negatives j of
    w_i w_j ([s_i > s_j] + [s_i == s_j] / 2), divided by W+ W-.
    """
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(scores, kind="stable")
    s, y, w = np.asarray(scores)[order], np.asarray(targets)[order] > 0, weights[:, order]
    pos, neg = w * y, w * ~y
    # Tie groups: positions where the sorted score changes start a new group.
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, dtype=int)
    pos_g = np.add.reduceat(pos, starts, axis=1) if len(s) else pos
    neg_g = np.add.reduceat(neg, starts, axis=1) if len(s) else neg
    neg_below = np.cumsum(neg_g, axis=1) - neg_g
    total_pos, total_neg = pos_g.sum(axis=1), neg_g.sum(axis=1)
    numerator = (pos_g * (neg_below + 0.5 * neg_g)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = numerator / (total_pos * total_neg)
    auc[(total_pos == 0) | (total_neg == 0)] = np.nan
    return auc


def bootstrap_aucs(
    targets: np.ndarray, scores: np.ndarray, mask: np.ndarray | None, groups: Sequence, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> np.ndarray:
    """(n_resamples, C) AUC of every label in every patient resample (NaN where a resample has one class)."""
    targets, scores = np.asarray(targets), np.asarray(scores)
    mask = np.ones_like(targets, dtype=np.float64) if mask is None else np.asarray(mask, dtype=np.float64)
    weights = patient_weights(groups, n_resamples, seed)
    out = np.empty((n_resamples, targets.shape[1]))
    for start in range(0, n_resamples, CHUNK):
        block = weights[start : start + CHUNK]
        for j in range(targets.shape[1]):
            out[start : start + CHUNK, j] = weighted_auc(targets[:, j], scores[:, j], block * mask[:, j])
    return out


def percentile_interval(values: np.ndarray, level: float) -> list[float] | None:
    finite = values[np.isfinite(values)]
    if len(finite) < 2:
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(low), float(high)]


def auc_intervals(
    targets: np.ndarray,
    scores: np.ndarray,
    labels: Sequence[str],
    mask: np.ndarray | None,
    groups: Sequence,
    n_resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> dict:
    """Percentile intervals: {"per_label": {label: [lo, hi] or None}, "macro_auc": [lo, hi] or None, ...}.

    The macro AUC of a resample averages the labels that have both classes in the full set (the
    labels the point estimate averages) and in that resample.
    """
    aucs = bootstrap_aucs(targets, scores, mask, groups, n_resamples, seed)
    evaluated = ~np.all(np.isnan(aucs), axis=0)
    full_mask = np.ones_like(targets, dtype=bool) if mask is None else np.asarray(mask) > 0
    for j in range(targets.shape[1]):  # a label skipped in the full set is skipped in the macro too
        if len(np.unique(np.asarray(targets)[full_mask[:, j], j])) < 2:
            evaluated[j] = False
    per_label = {label: (percentile_interval(aucs[:, j], level) if evaluated[j] else None) for j, label in enumerate(labels)}
    macro = None
    if evaluated.any():
        with warnings.catch_warnings():  # a resample where every label has one class: NaN, dropped below
            warnings.simplefilter("ignore", RuntimeWarning)
            macro_samples = np.nanmean(aucs[:, evaluated], axis=1)
        macro = percentile_interval(macro_samples, level)
    return {
        "per_label": per_label,
        "macro_auc": macro,
        "resamples": int(n_resamples),
        "level": float(level),
        "unit": "patient",
        "patients": int(len(set(map(str, groups)))),
        "seed": int(seed),
    }
