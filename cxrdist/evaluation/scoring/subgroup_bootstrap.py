"""The patient bootstrap of the subgroup audit: per label, the AUC of each group and of the rest of the images, itself
and in every resample of the evaluation's own draws.

The draws are those of `bootstrap.bootstrap_aucs` (same patients, same seed: `resample_counts`): resample r draws
every patient of the evaluated split as often as it does for the overall interval, and a group's AUC in it is the AUC
over the group's images weighted by their patients' counts. A group and the rest are scored on the same draws (a paired
interval of their difference).

How, per label and block of resamples (the rows are subgroup_rows.py's): ONE sparse product reads the patients' draw
counts, into the label's (cell, row) pairs; a second, streaming one re-sums the pairs into every group's own rows (the
whole evaluation's first). With U the Mann-Whitney count of ordered (positive, negative) pairs (ties count half):
    U_g    = sum_u POS_g[u] x (g's negatives below its run u) + half sum over g's tie rows, for the whole too;
    U_rest = U_all - X_g + U_g, where X_g = U(g, all) + U(all, g) counts the pairs with a member of g (those inside g
             twice) and is the sum over g's cells of X_c = sum of (pair sum x its partner in the whole): a segment pair's
             positives above it, a positive pair's negatives below it, halves for ties. One pass over the pairs for all
             groups; the rest costs no rows of its own.
Every sum is of integer counts and halves (exact in float32 below 2**23 per resample, else float64, as `resample_dtype`
decides; products and U in float64), and the AUC is U / (positives x negatives): the weighted AUC of the resample,
which with one draw per patient is scikit-learn's AUC. tests/test_subgroups.py checks both against scikit-learn and a
brute-force bootstrap, and against the previous implementation (one product per group) bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cxrdist.evaluation.scoring.bootstrap import patient_index, resample_counts, resample_dtype
from cxrdist.evaluation.scoring.subgroup_rows import BAND, EVERYONE, Layout, Pairs, label_layout, label_pairs, member_cells, rank

COUNT_DTYPE = np.int16  # a patient is drawn at most a few times per resample (Poisson(1)); the blocks are kept for every label
COLUMNS = 32  # resamples summed together: the draw counts of 70,000 patients x 32 stay in a CPU's cache (fewer misses than 128)


def draws(groups: Sequence, n_resamples: int, seed: int) -> tuple[np.ndarray, int, list[np.ndarray]]:
    """(patient number of each image, number of patients, the (n_patients, b) count blocks): the evaluation's draws."""
    patients, n_patients = patient_index(groups)
    blocks = [block.astype(COUNT_DTYPE) for block in resample_counts(n_patients, n_resamples, seed)]
    return patients, n_patients, blocks


def running_sums(stored: np.ndarray, bands: np.ndarray) -> np.ndarray:
    """In place, each group's running sum down its rows of a banded (BAND, bands, b) array (`bands`: each group's
    first band): within bands, then each band plus the bands of its group below it (those offsets in float64: exact)."""
    for i in range(1, BAND):
        np.add(stored[i], stored[i - 1], out=stored[i])
    totals = stored[-1].astype(np.float64)
    below = np.cumsum(totals, axis=0) - totals
    sizes = np.diff(bands)
    below -= np.repeat(below[bands[:-1][sizes > 0]], sizes[sizes > 0], axis=0)  # restart at each group's first band
    stored += below.astype(stored.dtype)
    return stored


def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per resample (column), the sum over the other axes of a x b, in float64 (integer sums: exact)."""
    axes = "ijk"[: a.ndim - 1]
    return np.einsum(f"{axes}b,{axes}b->b", a, b, dtype=np.float64)


def ratio(numerator: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = numerator / (positives * negatives)
    auc[(positives == 0) | (negatives == 0)] = np.nan
    return auc


def own_u(layout: Layout, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """((groups + 1, b) each group's U, and the whole's banded (positives, negatives below) for the partners)."""
    n_bands, b = int(layout.bands[-1]), rows.shape[1]
    size = BAND * n_bands
    positives, ties = rows[:size].reshape(n_bands, BAND, b).transpose(1, 0, 2), rows[2 * size :]
    below = running_sums(np.ascontiguousarray(rows[size : 2 * size].reshape(n_bands, BAND, b).transpose(1, 0, 2)), layout.bands)
    u = np.stack([dot(positives[:, start:end], below[:, start:end]) for start, end in zip(layout.bands[:-1], layout.bands[1:])])
    if len(ties):
        u += 0.5 * (layout.tie_groups @ np.multiply(np.take(rows, layout.tie_positive, axis=0), ties, dtype=np.float64))
    everyone = slice(layout.bands[EVERYONE], layout.bands[EVERYONE + 1])
    return u, positives[:, everyone], below[:, everyone]


def partners(positives: np.ndarray, below: np.ndarray, p_all: np.ndarray) -> np.ndarray:
    """The partner table: [positives at or above each segment (banded); negatives below each run (banded); zeros]."""
    band, bands, b = positives.shape
    table = np.zeros((2 * band * bands + 1, b), dtype=positives.dtype)
    above = table[: band * bands].reshape(band, bands, b)
    above[:] = positives
    running_sums(above, np.array([0, bands]))
    np.subtract(p_all.astype(positives.dtype), above, out=above)
    above += positives  # P - (positives below and at run s) + those at s
    table[band * bands : -1] = below.reshape(-1, b)
    return table


def cross_pairs(pairs: Pairs, layout: Layout, per_pair: np.ndarray, rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(cells, b) X_c: each cell's pairs with the whole, a segment pair x the positives above it, a positive pair x
    the negatives below it, plus the halves that ties make."""
    x = np.zeros((len(pairs.cell_starts) - 1, per_pair.shape[1]))
    for c, (start, end) in enumerate(zip(pairs.cell_starts[:-1], pairs.tie_starts)):
        if end > start:
            x[c] = dot(per_pair[start:end], np.take(table, layout.partner[start:end], axis=0))
    chosen, partner, cells = layout.tie_cross
    if len(chosen):
        x += 0.5 * (cells @ np.multiply(np.take(per_pair, chosen, axis=0), np.take(rows, partner, axis=0), dtype=np.float64))
    return x


def resample_group_aucs(pairs: Pairs, layout: Layout, cell_groups: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((groups, b) AUC of each group, (groups, b) AUC of its rest) in each resample of `counts` (n_patients, b)."""
    per_pair = pairs.counts @ counts
    rows = layout.own @ per_pair
    u, positives, below = own_u(layout, rows)
    negatives, positive = np.split((layout.by_cell @ per_pair).astype(np.float64), 2)
    p_all, n_all = positive.sum(axis=0), negatives.sum(axis=0)
    x_cells = cross_pairs(pairs, layout, per_pair, rows, partners(positives, below, p_all))
    groups = cell_groups.astype(np.float64)
    x_g, p_g, n_g, u_g = groups @ x_cells, groups @ positive, groups @ negatives, u[EVERYONE + 1 :]
    return ratio(u_g, p_g, n_g), ratio(u[EVERYONE] - x_g + u_g, p_all - p_g, n_all - n_g)


def group_resample_aucs(targets: np.ndarray, scores: np.ndarray, mask: np.ndarray, members: np.ndarray, patients: np.ndarray,
                        n_patients: int, blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs (2, groups, labels), resampled AUCs (resamples, 2, groups, labels)): for each group (a row of the boolean
    (G, N) `members`) and label, [0] the group's AUC and [1] the rest's, with every patient once (scikit-learn's AUC)
    and in each resample; NaN where a side holds one class. Labels run in threads."""
    targets, scores, mask = np.asarray(targets), np.asarray(scores), np.asarray(mask, dtype=np.float64)
    n_resamples, n_labels = sum(block.shape[1] for block in blocks), targets.shape[1]
    point, out = np.full((2, len(members), n_labels), np.nan), np.full((n_resamples, 2, len(members), n_labels), np.nan)
    if not len(members):
        return point, out
    binary = bool(np.all((mask == 0) | (mask == 1)))
    images = np.bincount(patients, minlength=n_patients)
    dtypes = [resample_dtype(binary, images, block) for block in blocks]
    cell_of_image, cell_groups = member_cells(np.asarray(members, dtype=bool))

    def score_label(j: int) -> None:
        ranked = rank(targets[:, j], scores[:, j], mask[:, j])
        if ranked.runs == 0:
            return
        dtype = np.float32 if binary else np.float64
        pairs = label_pairs(ranked, cell_of_image, cell_groups.shape[1], patients, n_patients, dtype)
        layout = label_layout(pairs, cell_groups, dtype)
        point[:, :, j] = np.array([auc[:, 0] for auc in resample_group_aucs(pairs, layout, cell_groups, np.ones((n_patients, 1), dtype))])
        start = 0
        for block, block_dtype in zip(blocks, dtypes):
            for first in range(0, block.shape[1], COLUMNS):
                counts = np.ascontiguousarray(block[:, first : first + COLUMNS], dtype=block_dtype)
                inside, rest = resample_group_aucs(pairs, layout, cell_groups, counts)
                out[start : start + counts.shape[1], 0, :, j], out[start : start + counts.shape[1], 1, :, j] = inside.T, rest.T
                start += counts.shape[1]

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, min(cpus, n_labels))) as pool:
        list(pool.map(score_label, range(n_labels)))
    return point, out


def resampled_sums(columns: Sequence[np.ndarray], patients: np.ndarray, n_patients: int, blocks: Sequence[np.ndarray]) -> np.ndarray:
    """(resamples, K): each of K per-image counts (0/1 vectors over the images) summed in each resample, every image
    weighted by how often its patient was drawn. A rate of a resample (underdiagnosis) is a ratio of two such sums."""
    per_patient = np.stack([np.bincount(patients, weights=column, minlength=n_patients) for column in columns], axis=1)
    sums = [block.T.astype(np.float64) @ per_patient for block in blocks]
    return np.concatenate(sums) if sums else np.zeros((0, len(columns)))
