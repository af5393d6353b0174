"""Patient-resampled (cluster) bootstrap intervals for per-label and macro ROC-AUC.

Images of one patient are correlated, so the resampling unit is the patient: each resample draws
as many patients as there are, with replacement, and takes all their images. A patient drawn k
times gives its images weight k, and the AUC of the resample is the weighted AUC, which equals the
AUC of the data with those images repeated k times.

`bootstrap_aucs` never builds per-image weights: each label's images are sorted once and reduced to
a sparse (segments x patients) matrix (`RankedLabel`), so a block of resamples is one sparse product
with the patients' draw counts followed by sums over the positives' score groups. The numbers are
those of `weighted_auc` on the per-image weights: both add the same integers and halves exactly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat

import numpy as np
from scipy import sparse

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
# An interval that rests on fewer positives (or, for a specificity, negatives) than this is flagged wherever it is shown:
# a resample of 2 positives holds 0-4 of them, so the interval says more about which few were drawn than about the model
# (e.g. an AUC of 0.932-1.000 from 2 positives), and percentile intervals cover far less than their level there.
FEW_CASES = 10
CHUNK = 200  # resamples per vectorised block of per-image weights: bounds memory at CHUNK x N floats
FLOAT32_EXACT = 2**24  # integers below this add up exactly in float32
BLOCK = 128  # resamples drawn and scored together: memory ~ BLOCK x (patients + threads x 2 x positives) floats


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


@dataclass
class RankedLabel:
    """One label's scored images, reduced to what a resample's weighted Mann-Whitney sum needs.

    The images are taken in score order and cut into score groups (ties); t = 0..T-1 numbers the
    groups that hold a positive. Rows of `segments` (per patient, the image weight in the segment):
    [0, T) the negatives above group t-1 (its ties included) and below group t; [T, 2T) the
    positives of group t; then one row per group in `tied` (groups t that also hold negatives): its
    negatives, counted half. The AUC only depends on which pairs are ordered, so when negatives form
    fewer groups the classes swap roles and the order reverses: the same pairs, fewer rows."""

    segments: sparse.csr_matrix
    groups: int  # T
    tied: np.ndarray
    negatives: np.ndarray  # (n_patients,) the negative image weight of each patient: W- of a resample


def groups_holding(member_groups: np.ndarray, n_score_groups: int) -> int:
    """How many score groups hold at least one of the members."""
    return int(np.count_nonzero(np.bincount(member_groups, minlength=n_score_groups)))


def ranked_label(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray, patients: np.ndarray, n_patients: int,
                 dtype: type = np.float64) -> RankedLabel:
    """One label's (targets, scores), per-image weights (the mask; 0 = left out) and patient numbers, ranked."""
    keep = np.flatnonzero(weights)
    order = keep[np.argsort(scores[keep], kind="stable")]  # the order (and ties) of weighted_auc
    s, y, w, p = scores[order], targets[order] > 0, weights[order].astype(dtype), patients[order]
    group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1 if len(s) else np.zeros(0, dtype=np.int64)
    n_score_groups = group[-1] + 1 if len(s) else 0
    if groups_holding(group[y], n_score_groups) > groups_holding(group[~y], n_score_groups):
        y, w, p, group = ~y[::-1], w[::-1], p[::-1], group[-1] - group[::-1]
    has_pos, has_neg = np.zeros(n_score_groups, dtype=bool), np.zeros(n_score_groups, dtype=bool)
    has_pos[group[y]], has_neg[group[~y]] = True, True
    upto = np.cumsum(has_pos)  # positive groups up to and including each score group
    n_groups = int(upto[-1]) if len(upto) else 0
    tied_groups = np.flatnonzero(has_pos & has_neg)
    tie_row = np.cumsum(has_pos & has_neg) - 1
    neg_group, neg_patient, neg_weight = group[~y], p[~y], w[~y]
    below_next = upto[neg_group] < n_groups  # negatives above the top positive group pair with nothing above them
    tied = has_pos[neg_group]
    rows = np.concatenate([upto[neg_group[below_next]], n_groups + upto[group[y]] - 1, 2 * n_groups + tie_row[neg_group[tied]]])
    cols = np.concatenate([neg_patient[below_next], p[y], neg_patient[tied]])
    data = np.concatenate([neg_weight[below_next], w[y], neg_weight[tied]])
    shape = (2 * n_groups + len(tied_groups), n_patients)
    segments = sparse.csr_matrix((data, (rows, cols)), shape=shape, dtype=dtype)  # repeated (row, patient) entries add up
    negatives = np.bincount(neg_patient, neg_weight, minlength=n_patients).astype(dtype)
    return RankedLabel(segments, n_groups, upto[tied_groups] - 1, negatives)


def cumulative_rows(a: np.ndarray, rows: int = 1024) -> np.ndarray:
    """In place, the cumulative sum down axis 0 of a C-ordered (T, b) array, a cache-sized band of rows at a time
    (numpy accumulates along axis 0 one column at a time, striding through the whole array)."""
    for start in range(0, len(a), rows):
        band = a[start : start + rows]
        np.cumsum(band, axis=0, out=band)
        if start:
            band += a[start - 1]
    return a


def resample_auc(label: RankedLabel, counts: np.ndarray) -> np.ndarray:
    """(b,) AUC of the label in each resample of `counts` (n_patients, b); NaN without both classes."""
    sums = label.segments @ counts  # (rows, b): each segment's image weight in each resample
    t = label.groups
    negatives_below, positives = cumulative_rows(sums[:t]), sums[t : 2 * t]
    numerator = np.einsum("tb,tb->b", positives, negatives_below, dtype=np.float64)
    numerator += 0.5 * np.einsum("tb,tb->b", positives[label.tied], sums[2 * t :], dtype=np.float64)
    total_pos, total_neg = positives.sum(axis=0, dtype=np.float64), (label.negatives @ counts).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = numerator / (total_pos * total_neg)
    auc[(total_pos == 0) | (total_neg == 0)] = np.nan
    return auc


def resample_dtype(weights_binary: bool, images: np.ndarray, counts: np.ndarray) -> type:
    """float32 where every sum a block of resamples makes is an integer below 2**24, so exact (and half the
    memory traffic): 0/1 image weights, and no resample's whole image weight (`images` per patient x counts)
    reaching 2**24; else float64."""
    return np.float32 if weights_binary and int((images @ counts).max(initial=0)) < FLOAT32_EXACT else np.float64


def bootstrap_aucs(
    targets: np.ndarray, scores: np.ndarray, mask: np.ndarray | None, groups: Sequence, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> np.ndarray:
    """(n_resamples, C) AUC of every label in every patient resample (NaN where a resample has one class).

    Labels are scored in threads, one per CPU this process may use (the sorts and sparse products
    release the GIL); every label's column comes out the same whatever the thread count."""
    targets, scores = np.asarray(targets), np.asarray(scores)
    mask = np.ones_like(targets, dtype=np.float64) if mask is None else np.asarray(mask, dtype=np.float64)
    patients, n_patients = patient_index(groups)
    binary = bool(np.all((mask == 0) | (mask == 1)))
    dtype, images = np.float32 if binary else np.float64, np.bincount(patients, minlength=n_patients)
    columns = range(targets.shape[1])
    out = np.empty((n_resamples, targets.shape[1]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, min(cpus, len(columns)))) as pool:
        labels = list(pool.map(lambda j: ranked_label(targets[:, j], scores[:, j], mask[:, j], patients, n_patients, dtype), columns))
        start = 0
        for counts in resample_counts(n_patients, n_resamples, seed):
            block = counts.astype(resample_dtype(binary, images, counts))
            for j, auc in zip(columns, pool.map(resample_auc, labels, repeat(block))):
                out[start : start + block.shape[1], j] = auc
            start += block.shape[1]
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
