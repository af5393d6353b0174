"""The patient bootstrap's inner loop, compiled (numba), for the evaluation's interval (`bootstrap.bootstrap_aucs`: the
whole evaluation alone) and the subgroup audit (subgroup_bootstrap.py: the whole and every group at once): one pass up a
label's scored images in score order gives, for a block of resamples, every group's Mann-Whitney count U and the counts
that make its rest's.

Per image the pass reads its patient's draw counts once (a row of the block). Images with the same group memberships
form a cell (sex F x age 40-59 x view AP x ...); an image updates the running negatives and U of the groups that hold
its cell (the whole evaluation, group 0, and one group per attribute) and three sums of its cell. For each score level
(images of equal score), with c an image's weight in the resample (its mask weight x its patient's draw count):
    U_g += c x (g's negatives below the level + half of g's negatives in it), for each positive of g;
    A_c += c x (all negatives below the level + half of those in it), for each positive of cell c: U(c, all);
    Y_c += c x (all positives below the level + half of those in it), for each negative of c;
and, summed over a group's cells, U(all, g) = P_all x N_g - Y_g (the positives above each of g's negatives, ties
half). A group's rest has U_rest = U_all - (A_g + U(all, g)) + U_g: the whole's pairs less those with a member of g
(those inside g counted twice, so once added back). With 0/1 or integer mask weights every sum is of integers and
halves below 2**53, so exact in float64 in any order: the AUCs are those of any exact method, bit for bit
(tests/test_subgroups.py and tests/test_bootstrap.py check them against the previous implementations and brute force).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat

import numpy as np
from numba import njit


def compiled(function):
    """`function` compiled without the GIL, cached on disk where numba finds a writable place (next to this file, or
    the user's cache directory); where it finds none (a read-only install and home), compiled anew in each process."""
    try:
        return njit(nogil=True, cache=True)(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return njit(nogil=True)(function)


COUNT_DTYPE = np.int16  # a patient is drawn at most a few times per resample (Poisson(1))
COLUMNS = 64  # resamples per pass, a constant of the compiled loops: a patient's 64 counts are two adjacent cache lines


@dataclass
class Cells:
    """Images with the same group memberships form a cell; every group is a union of cells."""

    of_image: np.ndarray
    holds: np.ndarray  # (groups + 1, cells) 0/1 float: the whole (row 0), then each group
    ptr: np.ndarray  # the groups of cell c: group[ptr[c]:ptr[c + 1]], 0 first
    group: np.ndarray


def member_cells(members: np.ndarray) -> Cells:
    """The cells of a boolean (groups, images) `members` (no groups: one cell, the whole)."""
    if len(members):
        packed = np.packbits(members, axis=0).T  # one row of bytes per image
        cells, of_image = np.unique(packed, axis=0, return_inverse=True)
        holds = np.unpackbits(cells, axis=1, count=len(members)).astype(bool).T
    else:
        of_image, holds = np.zeros(members.shape[1], dtype=np.int64), np.zeros((0, 1), dtype=bool)
    holds = np.vstack([np.ones(holds.shape[1], dtype=bool), holds])
    ptr = np.r_[0, np.cumsum(holds.sum(axis=0))].astype(np.int64)
    return Cells(of_image.reshape(-1).astype(np.int64), holds.astype(np.float64), ptr, np.nonzero(holds.T)[1].astype(np.int64))


@dataclass
class RankedImages:
    """One label's scored images in ascending score order, as `label_sums` reads them."""

    patient: np.ndarray
    weight: np.ndarray
    positive: np.ndarray
    level_end: np.ndarray  # where each score level (images of one score) ends
    cell: np.ndarray


def ranked_images(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray, patients: np.ndarray, cell_of_image: np.ndarray) -> RankedImages:
    keep = np.flatnonzero(weights)
    order = keep[np.argsort(scores[keep], kind="stable")]
    s = scores[order]
    level_end = np.r_[np.flatnonzero(s[1:] != s[:-1]) + 1, len(s)] if len(s) else np.zeros(0, dtype=np.int64)
    return RankedImages(patients[order].astype(np.int64), weights[order].astype(np.float64), targets[order] > 0, level_end.astype(np.int64),
                        cell_of_image[order])


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resample_group_aucs(targets: np.ndarray, scores: np.ndarray, mask: np.ndarray, cells: Cells, patients: np.ndarray,
                        blocks: Iterable[np.ndarray]) -> Iterable[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Per block of draw counts (n_patients, b), per label: ((groups, b) AUC of each group, of its rest, (b,) the
    whole's); NaN where a side holds one class. Labels run in threads (the passes release the GIL), each pass COLUMNS
    resamples; the numbers do not depend on either."""
    n_labels = targets.shape[1]
    with ThreadPoolExecutor(max(1, min(cpus(), n_labels))) as pool:
        ranked = list(pool.map(lambda j: ranked_images(targets[:, j], scores[:, j], mask[:, j], patients, cells.of_image), range(n_labels)))

        def aucs(label: RankedImages, passes: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            parts = []
            for counts, width in passes:
                sums = label_sums(label.patient, label.weight, label.positive, label.level_end, label.cell, cells.ptr, cells.group,
                                  len(cells.holds), counts, width)
                parts.append(group_aucs(sums, cells.holds))
            return tuple(np.concatenate(side, axis=-1) for side in zip(*parts))

        for block in blocks:
            yield list(pool.map(aucs, ranked, repeat(pass_counts(block))))


def pass_counts(block: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """A block of draw counts (n_patients, b) cut once into what the compiled pass reads, (n_patients, COLUMNS) C-ordered,
    and how many of those columns are resamples (the rest are zeros: no patient drawn)."""
    passes = []
    for first in range(0, block.shape[1], COLUMNS):
        width = min(COLUMNS, block.shape[1] - first)
        counts = np.zeros((len(block), COLUMNS), dtype=COUNT_DTYPE)
        counts[:, :width] = block[:, first : first + width]
        passes.append((counts, width))
    return passes


@dataclass
class LabelSums:
    """What one pass returns, per resample (the last axis)."""

    u: np.ndarray  # (groups + 1, b) U of the whole, then of each group
    negatives: np.ndarray  # (groups + 1, b)
    all_below: np.ndarray  # (cells, b) A_c
    positives_below: np.ndarray  # (cells, b) Y_c
    positives: np.ndarray  # (cells, b)


@compiled
def _tied_level(start, end, patient, weight, positive, cell, cell_ptr, cell_group, counts, u, negatives, all_below, positives_below,
                positives, positives_all, level_negatives, level_positives):  # pragma: no cover - compiled; see the module docstring
    """A score level of several images: pairs within it count half."""
    for i in range(start, end):
        if positive[i]:
            for r in range(COLUMNS):
                level_positives[r] += weight[i] * counts[patient[i], r]
        else:
            for k in range(cell_ptr[cell[i]], cell_ptr[cell[i] + 1]):
                g = cell_group[k]
                for r in range(COLUMNS):
                    level_negatives[g, r] += weight[i] * counts[patient[i], r]
    for i in range(start, end):
        j = cell[i]
        for r in range(COLUMNS):
            c = weight[i] * counts[patient[i], r]
            if positive[i]:
                all_below[j, r] += c * (negatives[0, r] + 0.5 * level_negatives[0, r])
                positives[j, r] += c
            else:
                positives_below[j, r] += c * (positives_all[r] + 0.5 * level_positives[r])
        if positive[i]:
            for k in range(cell_ptr[j], cell_ptr[j + 1]):
                g = cell_group[k]
                for r in range(COLUMNS):
                    u[g, r] += weight[i] * counts[patient[i], r] * (negatives[g, r] + 0.5 * level_negatives[g, r])
    for i in range(start, end):  # the level joins what lies below (the first image of a group moves its sums)
        for k in range(cell_ptr[cell[i]], cell_ptr[cell[i] + 1]):
            g = cell_group[k]
            for r in range(COLUMNS):
                negatives[g, r] += level_negatives[g, r]
                level_negatives[g, r] = 0.0
    for r in range(COLUMNS):
        positives_all[r] += level_positives[r]
        level_positives[r] = 0.0


@compiled
def _label_sums(patient, weight, positive, level_end, cell, cell_ptr, cell_group, n_groups, counts):  # pragma: no cover
    b, n_cells = COLUMNS, len(cell_ptr) - 1
    u, negatives = np.zeros((n_groups, b)), np.zeros((n_groups, b))
    all_below, positives_below, positives = np.zeros((n_cells, b)), np.zeros((n_cells, b)), np.zeros((n_cells, b))
    positives_all, level_negatives, level_positives = np.zeros(b), np.zeros((n_groups, b)), np.zeros(b)
    c = np.zeros(b)
    start = 0
    for end in level_end:
        if end - start > 1:
            _tied_level(start, end, patient, weight, positive, cell, cell_ptr, cell_group, counts, u, negatives, all_below, positives_below,
                        positives, positives_all, level_negatives, level_positives)
            start = end
            continue
        row, w, j = counts[patient[start]], weight[start], cell[start]  # most levels hold one image: no ties
        if positive[start]:
            for r in range(COLUMNS):  # the cell's sums and the whole (group 0, first of every cell's groups) in one go
                c[r] = w * row[r]
                pairs = c[r] * negatives[0, r]
                u[0, r] += pairs
                all_below[j, r] += pairs
                positives[j, r] += c[r]
                positives_all[r] += c[r]
            for k in range(cell_ptr[j] + 1, cell_ptr[j + 1]):
                g = cell_group[k]
                for r in range(COLUMNS):
                    u[g, r] += c[r] * negatives[g, r]
        else:
            for r in range(COLUMNS):
                c[r] = w * row[r]
                positives_below[j, r] += c[r] * positives_all[r]
                negatives[0, r] += c[r]
            for k in range(cell_ptr[j] + 1, cell_ptr[j + 1]):
                g = cell_group[k]
                for r in range(COLUMNS):
                    negatives[g, r] += c[r]
        start = end
    return u, negatives, all_below, positives_below, positives


def label_sums(patient, weight, positive, level_end, cell, cell_ptr, cell_group, n_groups: int, counts: np.ndarray, width: int) -> LabelSums:
    """One label and one pass of draw counts (`pass_counts`: (n_patients, COLUMNS), its first `width` columns resamples):
    the scored images in ascending score order (patient number, weight, class, cell), `level_end` where each score level
    ends, and the groups of each cell (`cell_group[cell_ptr[c]:cell_ptr[c + 1]]`, group 0 the whole first)."""
    sums = _label_sums(patient, weight, positive, level_end, cell, cell_ptr, cell_group, n_groups, counts)
    return LabelSums(*(part[..., :width] for part in sums))


def group_aucs(sums: LabelSums, holds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """((groups, b) AUC of each group, (groups, b) AUC of its rest, (b,) the whole's); `holds` (groups + 1, cells) 0/1."""
    positives, all_below, positives_below = holds @ sums.positives, holds @ sums.all_below, holds @ sums.positives_below
    u, negatives = sums.u, sums.negatives
    p_all, n_all = positives[0], negatives[0]
    x = all_below[1:] + (p_all * negatives[1:] - positives_below[1:])  # the pairs with a member of the group
    return (ratio(u[1:], positives[1:], negatives[1:]), ratio(u[0] - x + u[1:], p_all - positives[1:], n_all - negatives[1:]),
            ratio(u[0], p_all, n_all))


def ratio(numerator: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = numerator / (positives * negatives)
    auc[(positives == 0) | (negatives == 0)] = np.nan
    return auc
