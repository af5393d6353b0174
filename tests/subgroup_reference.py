"""The subgroup audit's patient bootstrap as it was before issue 29 item 6 (one sparse product per group and label,
every group ranked in the whole evaluation's rows): the oracle that tests/test_subgroups.py holds today's
`group_resample_aucs` to, bit for bit. Frozen: do not edit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import sparse

# The helpers it used from cxrdist/evaluation/scoring/bootstrap.py, copied here unchanged when bootstrap.py moved to the
# compiled pass (group_ranks.py).
FLOAT32_EXACT = 2**24  # integers below this add up exactly in float32


def groups_holding(member_groups: np.ndarray, n_score_groups: int) -> int:
    """How many score groups hold at least one of the members."""
    return int(np.count_nonzero(np.bincount(member_groups, minlength=n_score_groups)))


def cumulative_rows(a: np.ndarray, rows: int = 1024) -> np.ndarray:
    """In place, the cumulative sum down axis 0 of a C-ordered (T, b) array, a cache-sized band of rows at a time
    (numpy accumulates along axis 0 one column at a time, striding through the whole array)."""
    for start in range(0, len(a), rows):
        band = a[start : start + rows]
        np.cumsum(band, axis=0, out=band)
        if start:
            band += a[start - 1]
    return a


def resample_dtype(weights_binary: bool, images: np.ndarray, counts: np.ndarray) -> type:
    """float32 where every sum a block of resamples makes is an integer below 2**24, so exact (and half the
    memory traffic): 0/1 image weights, and no resample's whole image weight (`images` per patient x counts)
    reaching 2**24; else float64."""
    return np.float32 if weights_binary and int((images @ counts).max(initial=0)) < FLOAT32_EXACT else np.float64


@dataclass
class LabelRows:
    """One label's scored images in score order, each placed in the evaluation's rows (see the module docstring)."""

    image: np.ndarray  # index of each scored image among all images
    patient: np.ndarray
    weight: np.ndarray
    positive: np.ndarray  # bool, after the swap `ranked_label` makes (fewer positive groups: fewer rows, the same pairs)
    row: np.ndarray  # a positive: its group t; a negative: its segment t (0..T)
    tie: np.ndarray  # a negative: the group it ties with, else -1
    groups: int  # T


def label_rows(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray, patients: np.ndarray) -> LabelRows:
    keep = np.flatnonzero(weights)
    order = keep[np.argsort(scores[keep], kind="stable")]
    s, y = scores[order], targets[order] > 0
    level = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1 if len(s) else np.zeros(0, dtype=np.int64)
    levels = int(level[-1]) + 1 if len(s) else 0
    if groups_holding(level[y], levels) > groups_holding(level[~y], levels):
        order, y, level = order[::-1], ~y[::-1], level[-1] - level[::-1]
    holds_positive = np.zeros(levels, dtype=bool)
    holds_positive[level[y]] = True
    upto = np.cumsum(holds_positive)  # positive groups at or below each score level
    row = np.where(y, upto[level] - 1, upto[level]) if len(s) else level
    tie = np.where(~y & holds_positive[level], upto[level] - 1, -1) if len(s) else level
    return LabelRows(order, patients[order], weights[order], y, row, tie, int(upto[-1]) if len(s) else 0)


@dataclass
class RowSums:
    """The rows a set of images occupies (sorted row numbers) and the sparse (rows x patients) matrix of their weights."""

    segments: np.ndarray
    positives: np.ndarray
    ties: np.ndarray
    matrix: sparse.csr_matrix

    def __call__(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(segment, positive, tie) row sums of the images' draw counts, each (rows, b)."""
        sums = self.matrix @ counts
        a, b = len(self.segments), len(self.segments) + len(self.positives)
        return sums[:a], sums[a:b], sums[b:]


def row_sums(rows: LabelRows, keep: np.ndarray, n_patients: int, dtype: type, full: bool = False) -> RowSums:
    """The row structure of the images `keep` (a mask over `rows`); `full`: every row 0..T (the whole evaluation's)."""
    negative, positive = keep & ~rows.positive, keep & rows.positive
    tied = negative & (rows.tie >= 0)
    if full:
        found = [np.arange(rows.groups + 1), np.arange(rows.groups), np.arange(rows.groups)]
        index = [rows.row[negative], rows.row[positive], rows.tie[tied]]
    else:
        found, index = zip(*(np.unique(values, return_inverse=True) for values in (rows.row[negative], rows.row[positive], rows.tie[tied])))
    offsets = np.cumsum([0, len(found[0]), len(found[1])])
    kinds = (negative, positive, tied)
    entries = (np.concatenate([rows.weight[k] for k in kinds]).astype(dtype),
               (np.concatenate([i + o for i, o in zip(index, offsets)]), np.concatenate([rows.patient[k] for k in kinds])))
    matrix = sparse.csr_matrix(entries, shape=(int(offsets[-1] + len(found[2])), n_patients), dtype=dtype)  # repeats add up
    return RowSums(*found, matrix)


def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per resample (column), the sum over rows of a x b, in float64 (integer sums: exact)."""
    return np.einsum("tb,tb->b", a, b, dtype=np.float64)


def ratio(numerator: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = numerator / (positives * negatives)
    auc[(positives == 0) | (negatives == 0)] = np.nan
    return auc


def group_and_rest(whole: RowSums, group: RowSums, counts: np.ndarray, everyone: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(group AUC, rest AUC) in each resample of `counts`; `everyone` = (U, P, N, below, ties, positives, above) of the
    whole evaluation in those resamples (see `whole_sums`)."""
    u_all, p_all, n_all, below, ties, positives, above = everyone
    seg, pos, tie = group(counts)
    p_g, n_g = pos.sum(axis=0, dtype=np.float64), seg.sum(axis=0, dtype=np.float64)
    own_below = np.vstack([np.zeros((1, seg.shape[1]), seg.dtype), cumulative_rows(seg.copy())])
    u_g = dot(pos, own_below[np.searchsorted(group.segments, group.positives, side="right")])
    _, at_positive, at_tie = np.intersect1d(group.positives, group.ties, assume_unique=True, return_indices=True)
    u_g += 0.5 * dot(pos[at_positive], tie[at_tie])
    inner = group.segments < len(above)  # segment T lies above every positive
    x_g = dot(pos, below[group.positives]) + 0.5 * dot(pos, ties[group.positives]) + dot(seg[inner], above[group.segments[inner]])
    x_g += 0.5 * dot(tie, positives[group.ties])
    return ratio(u_g, p_g, n_g), ratio(u_all - x_g + u_g, p_all - p_g, n_all - n_g)


def whole_sums(whole: RowSums, counts: np.ndarray) -> tuple:
    """(U, P, N, negatives below each group t, negatives tied with it, its positives, positives at or above segment t)."""
    seg, pos, tie = whole(counts)
    below = cumulative_rows(seg[:-1].copy())
    above = cumulative_rows(pos[::-1].copy())[::-1]
    u = dot(pos, below) + 0.5 * dot(pos, tie)
    return u, pos.sum(axis=0, dtype=np.float64), seg.sum(axis=0, dtype=np.float64), below, tie, pos, above


def reference_group_resample_aucs(targets: np.ndarray, scores: np.ndarray, mask: np.ndarray, members: np.ndarray, patients: np.ndarray,
                        n_patients: int, blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs (2, groups, labels), resampled AUCs (resamples, 2, groups, labels)): for each group (a row of the boolean
    (G, N) `members`) and label, [0] the group's AUC and [1] the rest's, with every patient once (scikit-learn's AUC)
    and in each resample; NaN where a side holds one class. Labels run in threads."""
    targets, scores, mask = np.asarray(targets), np.asarray(scores), np.asarray(mask, dtype=np.float64)
    n_resamples, n_labels = sum(block.shape[1] for block in blocks), targets.shape[1]
    point, out = np.full((2, len(members), n_labels), np.nan), np.full((n_resamples, 2, len(members), n_labels), np.nan)
    binary = bool(np.all((mask == 0) | (mask == 1)))
    images = np.bincount(patients, minlength=n_patients)
    dtypes = [resample_dtype(binary, images, block) for block in blocks]

    def score_label(j: int) -> None:
        rows = label_rows(targets[:, j], scores[:, j], mask[:, j], patients)
        if rows.groups == 0:
            return
        dtype = np.float32 if binary else np.float64
        whole = row_sums(rows, np.ones(len(rows.image), dtype=bool), n_patients, dtype, full=True)
        groups = [row_sums(rows, member[rows.image], n_patients, dtype) for member in members]
        once = np.ones((n_patients, 1), dtype=dtype)
        everyone = whole_sums(whole, once)
        point[:, :, j] = np.array([[auc[0] for auc in group_and_rest(whole, g, once, everyone)] for g in groups]).T
        start = 0
        for block, block_dtype in zip(blocks, dtypes):
            counts = block.astype(block_dtype)
            everyone = whole_sums(whole, counts)
            for k, g in enumerate(groups):
                inside, rest = group_and_rest(whole, g, counts, everyone)
                out[start : start + counts.shape[1], :, k, j] = np.stack([inside, rest], axis=1)
            start += counts.shape[1]

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, min(cpus, n_labels))) as pool:
        list(pool.map(score_label, range(n_labels)))
    return point, out
