"""Patient-resampled (cluster) bootstrap intervals for per-label and macro ROC-AUC.

Images of one patient are correlated, so the resampling unit is the patient: each resample draws
as many patients as there are, with replacement, and takes all their images. A patient drawn k
times gives its images weight k, and the AUC of the resample is the weighted AUC, which equals the
AUC of the data with those images repeated k times.

`bootstrap_aucs` never builds per-image weights: each label's images are sorted once, and each block of resamples is
one compiled pass up them (group_ranks.py) that reads every image's patient draw counts and sums the Mann-Whitney
count. The numbers are those of `weighted_auc` on the per-image weights: both add the same integers and halves exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from cxrdist.evaluation.scoring.group_ranks import COUNT_DTYPE, member_cells, resample_group_aucs

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
# An interval that rests on fewer positives (or, for a specificity, negatives) than this is flagged wherever it is shown:
# a resample of 2 positives holds 0-4 of them, so the interval says more about which few were drawn than about the model
# (e.g. an AUC of 0.932-1.000 from 2 positives), and percentile intervals cover far less than their level there.
FEW_CASES = 10
CHUNK = 200  # resamples per vectorised block of per-image weights: bounds memory at CHUNK x N floats
BLOCK = 128  # resamples drawn together: memory ~ BLOCK x patients counts


def patient_index(groups: Sequence) -> tuple[np.ndarray, int]:
    """(patient number of each image, number of patients); patients numbered in sorted order of their ids."""
    _, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    return index, int(index.max()) + 1 if len(index) else 0


def resample_counts(n_patients: int, n_resamples: int, seed: int, block: int = BLOCK) -> Iterator[np.ndarray]:
    """(n_patients, b) blocks of how often each patient is drawn in b consecutive resamples.

    The draws are those of one `integers(0, n_patients, size=(n_resamples, n_patients))` call on
    `default_rng(seed)`, made b rows at a time: the generator's stream does not depend on how the
    rows are split (tests/test_bootstrap.py checks it), so intervals stay those of a given seed."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        cells = rng.integers(0, n_patients, size=(b, n_patients))
        cells *= b
        cells += np.arange(b)[:, None]  # cell of (patient, resample) in a (n_patients, b) table
        yield np.bincount(cells.ravel(), minlength=n_patients * b).reshape(n_patients, b)


def patient_weights(groups: Sequence, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, N) int weights: how often each image's patient was drawn in each resample."""
    index, n_patients = patient_index(groups)
    counts = [block.T for block in resample_counts(n_patients, n_resamples, seed)]
    return np.concatenate(counts)[:, index] if counts else np.zeros((0, len(index)), dtype=np.int64)


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
    """(n_resamples, C) AUC of every label in every patient resample (NaN where a resample has one class).

    Labels are scored in threads, one per CPU this process may use; every label's column comes out the same whatever
    the thread count."""
    targets, scores = np.asarray(targets), np.asarray(scores)
    mask = np.ones_like(targets, dtype=np.float64) if mask is None else np.asarray(mask, dtype=np.float64)
    patients, n_patients = patient_index(groups)
    everyone = member_cells(np.zeros((0, len(targets)), dtype=bool))
    blocks = (counts.astype(COUNT_DTYPE) for counts in resample_counts(n_patients, n_resamples, seed))
    aucs = [np.stack([whole for _, _, whole in labels], axis=1) for labels in resample_group_aucs(targets, scores, mask, everyone, patients, blocks)]
    return np.concatenate(aucs) if aucs else np.empty((0, targets.shape[1]))


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
    resampled: np.ndarray | None = None,
) -> dict:
    """Percentile intervals: {"per_label": {label: [lo, hi] or None}, "macro_auc": [lo, hi] or None, ...}.

    The macro AUC of a resample averages the labels that have both classes in the full set (the
    labels the point estimate averages) and in that resample. `resampled`: the (n_resamples, C)
    `bootstrap_aucs` of these arguments when already computed (the subgroup audit's pass makes them).
    """
    aucs = bootstrap_aucs(targets, scores, mask, groups, n_resamples, seed) if resampled is None else resampled
    if aucs.shape != (n_resamples, np.shape(targets)[1]):
        raise ValueError(f"resampled AUCs of shape {aucs.shape}, not ({n_resamples}, {np.shape(targets)[1]})")
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
