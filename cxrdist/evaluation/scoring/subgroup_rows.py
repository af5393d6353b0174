"""Where the subgroup audit's bootstrap (subgroup_bootstrap.py) puts one label's images, decided once per label.

RUNS. The label's scored images are ranked as `bootstrap.ranked_label` ranks them (the class with fewer score levels
plays the positives: the same pairs, fewer rows), and positive score levels with no negative between them (and no
negative tied with either) form one run: their positives have the same negatives below them. Run t, segment s (the
negatives below run s and above run s-1, ties of run s-1 included; s = R above every run) and tie t (the negatives
tied with run t, which is then one level) are the rows of the whole evaluation. A balanced label has about half as
many runs as positive levels.

CELLS AND PAIRS. Images with the same group memberships form a cell (sex F x age 40-59 x view AP x ...): every group
is a union of cells. The images are summed into (cell, kind, row) pairs: the one sparse product that reads the
patients' draw counts (`Pairs.counts`), cell by cell.

OWN ROWS. Each group, the whole evaluation first (`EVERYONE`), has its own runs: the runs holding one of its positives,
merged where none of its negatives lies between them, and its own segments below each. A sparse 0/1 matrix
(`Layout.own`) re-sums the pairs into them, group after group, each group's rows padded to whole BANDs: viewed as
(bands, BAND, b) and copied to (BAND, bands, b), a running sum down every group's rows is BAND - 1 additions of
contiguous (bands, b) slices (subgroup_bootstrap.running_sums), ~1 ns an element where numpy's cumsum down axis 0
takes ~5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from cxrdist.evaluation.scoring.bootstrap import groups_holding

SEGMENT, POSITIVE, TIE = 0, 1, 2  # kinds of pairs
EVERYONE = 0  # the first group of a Layout: every cell
BAND = 32


@dataclass
class Ranked:
    """One label's scored images in score order, each placed in the whole evaluation's rows."""

    image: np.ndarray  # index of each scored image among all images
    weight: np.ndarray
    positive: np.ndarray  # bool, after the swap
    row: np.ndarray  # a positive: its run t; a negative: its segment s (0..R)
    tie: np.ndarray  # a negative tied with run t: t, else -1
    runs: int  # R


def rank(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> Ranked:
    keep = np.flatnonzero(weights)
    order = keep[np.argsort(scores[keep], kind="stable")]  # the order (and ties) of weighted_auc
    s, y = scores[order], targets[order] > 0
    level = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1 if len(s) else np.zeros(0, dtype=np.int64)
    levels = int(level[-1]) + 1 if len(s) else 0
    if groups_holding(level[y], levels) > groups_holding(level[~y], levels):
        order, y, level = order[::-1], ~y[::-1], level[-1] - level[::-1]
    holds_positive = np.zeros(levels, dtype=bool)
    holds_positive[level[y]] = True
    upto = np.cumsum(holds_positive)  # positive levels at or below each score level
    n_levels = int(upto[-1]) if len(s) else 0
    row = np.where(y, upto[level] - 1, upto[level]) if len(s) else level  # positive level t / segment s (0..T)
    tie = np.where(~y & holds_positive[level], upto[level] - 1, -1) if len(s) else level
    starts = np.zeros(n_levels + 1, dtype=bool)  # the positive levels that start a run (index T: the top segment)
    starts[:1] = True
    starts[row[~y]] = True  # negatives below level s: s starts a run
    starts[tie[tie >= 0]] = True  # a tied level is a run of its own (the next one starts anew: its tied negatives)
    run = np.cumsum(starts) - 1
    runs = int(run[n_levels - 1]) + 1 if n_levels else 0
    run[n_levels] = runs  # segment T lies above every run
    return Ranked(order, weights[order], y, run[row], np.where(tie >= 0, run[tie], -1), runs)


def member_cells(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cell of each image, (groups, cells) which groups hold each cell) of a boolean (groups, images) `members`."""
    packed = np.packbits(members, axis=0).T  # one row of bytes per image
    cells, cell = np.unique(packed, axis=0, return_inverse=True)
    return cell.reshape(-1), np.unpackbits(cells, axis=1, count=len(members)).T.astype(bool)


@dataclass
class Pairs:
    """One label's (cell, kind, row) pairs in that order; `counts` sums a block of draw counts into them."""

    counts: sparse.csr_matrix  # (pairs, patients): the image weight of each pair per patient
    kind: np.ndarray
    row: np.ndarray  # a segment pair's s, a positive or tie pair's t
    cell: np.ndarray
    cell_starts: np.ndarray  # (cells + 1,) where each cell's pairs start
    tie_starts: np.ndarray  # (cells,) where each cell's tie pairs start (after its segment and positive pairs)
    runs: int


def label_pairs(ranked: Ranked, cell_of_image: np.ndarray, n_cells: int, patients: np.ndarray, n_patients: int, dtype: type) -> Pairs:
    tied = np.flatnonzero(ranked.tie >= 0)
    entry = np.r_[np.arange(len(ranked.image)), tied]  # a tied negative counts in its segment and in its tie row
    kind = np.r_[np.where(ranked.positive, POSITIVE, SEGMENT), np.full(len(tied), TIE)]
    row = np.r_[ranked.row, ranked.tie[tied]]  # in score order: rising within each kind
    cell_kind = cell_of_image[ranked.image[entry]] * 3 + kind
    order = np.argsort(cell_kind.astype(np.int16 if 3 * n_cells < 2**15 else np.int64), kind="stable")  # a radix sort
    key = cell_kind[order] * (ranked.runs + 1) + row[order]
    first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, dtype=bool)
    pair = np.empty(len(key), dtype=np.int64)
    pair[order] = np.cumsum(first) - 1
    found = key[first]
    data = ranked.weight[entry].astype(dtype)  # repeated (pair, patient) entries add up
    counts = sparse.csr_matrix((data, (pair, patients[ranked.image[entry]])), shape=(len(found), n_patients), dtype=dtype)
    cell, kind = found // (3 * (ranked.runs + 1)), (found // (ranked.runs + 1)) % 3
    first_tie = np.searchsorted(cell * 3 + kind, np.arange(n_cells) * 3 + TIE)
    return Pairs(counts, kind, found % (ranked.runs + 1), cell, np.searchsorted(cell, np.arange(n_cells + 1)), first_tie, ranked.runs)


@dataclass
class OwnRows:
    """One group's runs, and (pair, own run) of its positive pairs, its segment pairs, its tie pairs."""

    runs: int
    positive: tuple[np.ndarray, np.ndarray]
    segment: tuple[np.ndarray, np.ndarray]
    tie: tuple[np.ndarray, np.ndarray]


def own_rows(pairs: Pairs, holds: np.ndarray) -> OwnRows:
    """The rows of one group (`holds`: which cells are in it): its levels are the runs holding one of its positives;
    its segment u holds its negatives below its level u and above its u-1 (those above its top level pair with
    nothing); a tie pair counts where its run is one of the group's levels. Levels with none of its negatives between
    them (and no tie) merge into one own run."""
    mine = holds[pairs.cell]
    pos, seg, tie = (np.flatnonzero(mine & (pairs.kind == kind)) for kind in (POSITIVE, SEGMENT, TIE))
    is_level = np.zeros(pairs.runs + 1, dtype=bool)
    is_level[pairs.row[pos]] = True
    upto = np.cumsum(is_level)  # its levels at or below each run
    levels = int(upto[-1])
    seg_level = upto[pairs.row[seg]] - is_level[pairs.row[seg]]  # the first of its levels above the segment
    tied = is_level[pairs.row[tie]]
    at = upto[pairs.row[tie][tied]] - 1
    starts = np.zeros(levels + 1, dtype=bool)
    starts[:1] = True
    starts[seg_level] = True
    starts[at] = True
    run = np.cumsum(starts) - 1
    below = seg_level < levels
    return OwnRows(int(run[levels - 1]) + 1 if levels else 0, (pos, run[upto[pairs.row[pos]] - 1]), (seg[below], run[seg_level[below]]),
                   (tie[tied], run[at]))


@dataclass
class Layout:
    """How a block's pair sums (pairs, b) become every group's rows (see the module docstring)."""

    own: sparse.csr_matrix  # (2 x BAND x bands + tie rows, pairs): positives, segments (aligned), then ties
    bands: np.ndarray  # (groups + 1,) each group's first band (group 0: EVERYONE)
    tie_groups: sparse.csr_matrix  # (groups, tie rows) 0/1: the group of each tie row
    tie_positive: np.ndarray  # each tie row's row among the positives
    by_cell: sparse.csr_matrix  # (2 cells, pairs): each cell's negatives, then its positives
    partner: np.ndarray  # each segment and positive pair's row in the partner table (`subgroup_bootstrap.partners`)
    tie_cross: tuple[np.ndarray, np.ndarray, sparse.csr_matrix]  # (pairs, their rows in `own`'s output, (cells, those) 0/1)


def ones(rows: np.ndarray, columns: np.ndarray, shape: tuple[int, int], dtype: type) -> sparse.csr_matrix:
    return sparse.csr_matrix((np.ones(len(rows), dtype=dtype), (rows, columns)), shape=shape)


def banded_row(run: np.ndarray, first_band: int, bands: int) -> np.ndarray:
    """Where run u of a group whose bands start at `first_band` is stored in a (BAND, bands, b) array, as a row."""
    return (run % BAND) * bands + first_band + run // BAND


def label_layout(pairs: Pairs, cell_groups: np.ndarray, dtype: type) -> Layout:
    n_pairs, n_cells = len(pairs.row), cell_groups.shape[1]
    groups = [own_rows(pairs, holds) for holds in np.vstack([np.ones(n_cells, dtype=bool), cell_groups])]
    bands = np.cumsum([0] + [-(-g.runs // BAND) for g in groups])
    n_bands = int(bands[-1])
    size = BAND * n_bands
    ties = [np.unique(g.tie[1], return_inverse=True) for g in groups]  # one tie row per (group, own run)
    tie_first = np.cumsum([0] + [len(runs) for runs, _ in ties])
    rows, columns = [], []
    for k, (g, (_, tie_row)) in enumerate(zip(groups, ties)):
        rows += [BAND * bands[k] + g.positive[1], size + BAND * bands[k] + g.segment[1], 2 * size + tie_first[k] + tie_row.reshape(-1)]
        columns += [g.positive[0], g.segment[0], g.tie[0]]
    own = ones(np.concatenate(rows), np.concatenate(columns), (2 * size + int(tie_first[-1]), n_pairs), dtype)
    tie_positive = np.concatenate([BAND * bands[k] + runs for k, (runs, _) in enumerate(ties)])
    tie_group = np.repeat(np.arange(len(groups)), np.diff(tie_first))
    tie_groups = ones(tie_group, np.arange(len(tie_group)), (len(groups), len(tie_group)), np.float64)
    counted = pairs.kind != TIE
    by_cell = ones(pairs.cell[counted] + n_cells * pairs.kind[counted], np.flatnonzero(counted), (2 * n_cells, n_pairs), dtype)
    return Layout(own, bands, tie_groups, tie_positive, by_cell, partner_rows(pairs, groups[EVERYONE].runs, bands[1]),
                  tie_cross(pairs, ties[EVERYONE][0], tie_first, n_bands))


def partner_rows(pairs: Pairs, runs: int, bands: int) -> np.ndarray:
    """Each pair's row in the partner table [positives at or above each segment (banded); negatives below each run
    (banded); a zero row]: a segment pair's (the zero row above every run), a positive pair's; tie pairs' unused."""
    row = np.where(pairs.kind == SEGMENT, banded_row(pairs.row, 0, bands), BAND * bands + banded_row(pairs.row, 0, bands))
    row[(pairs.kind == SEGMENT) & (pairs.row == runs)] = 2 * BAND * bands
    return row


def tie_cross(pairs: Pairs, tied_runs: np.ndarray, tie_first: np.ndarray, n_bands: int) -> tuple:
    """The halves of the whole's pairs with each cell that ties make: a positive pair at a tied run with the
    negatives tied there, a tie pair with the positives of its run (rows of `own`'s output)."""
    positive_at_tie = np.flatnonzero((pairs.kind == POSITIVE) & np.isin(pairs.row, tied_runs))
    tie_row = 2 * BAND * n_bands + tie_first[EVERYONE] + np.searchsorted(tied_runs, pairs.row[positive_at_tie])
    tie_pairs = np.flatnonzero(pairs.kind == TIE)
    chosen = np.r_[positive_at_tie, tie_pairs]
    partner = np.r_[tie_row, pairs.row[tie_pairs]]  # the whole's rows come first: its run t is row t
    n_cells = len(pairs.cell_starts) - 1
    return chosen, partner, ones(pairs.cell[chosen], np.arange(len(chosen)), (n_cells, len(chosen)), np.float64)
