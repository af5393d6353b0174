"""The patient bootstrap of the subgroup audit: per label, the AUC of each group and of the rest of the images, itself
and in every resample of the evaluation's own draws.

The draws are those of `bootstrap.bootstrap_aucs` (same patients, same seed: `resample_counts`): resample r draws
every patient of the evaluated split as often as it does for the overall interval, and a group's AUC in it is the AUC
over the group's images weighted by their patients' counts. A group and the rest are scored on the same draws (a paired
interval of their difference).

How: per label the scored images are sorted by score once, and each block of resamples is one compiled pass up them
(group_ranks.py) that updates, per image, only the groups holding it. The whole evaluation is group 0: its resampled
AUCs are those of `bootstrap.bootstrap_aucs` (the same pass with no group), bit for bit, and `cxrdist evaluate` takes
its overall interval from them when it audits (one pass, not two). tests/test_subgroups.py checks every number against
scikit-learn, a brute-force bootstrap and the previous implementation (tests/subgroup_reference.py) bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxrdist.evaluation.scoring.bootstrap import patient_index, resample_counts
from cxrdist.evaluation.scoring.group_ranks import COUNT_DTYPE, member_cells, resample_group_aucs


def draws(groups: Sequence, n_resamples: int, seed: int) -> tuple[np.ndarray, int, list[np.ndarray]]:
    """(patient number of each image, number of patients, the (n_patients, b) count blocks): the evaluation's draws."""
    patients, n_patients = patient_index(groups)
    blocks = [block.astype(COUNT_DTYPE) for block in resample_counts(n_patients, n_resamples, seed)]
    return patients, n_patients, blocks


def group_resample_aucs(targets: np.ndarray, scores: np.ndarray, mask: np.ndarray, members: np.ndarray, patients: np.ndarray,
                        n_patients: int, blocks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AUCs (2, groups, labels), resampled AUCs (resamples, 2, groups, labels), the whole's resampled AUCs (resamples,
    labels)): for each group (a row of the boolean (G, N) `members`) and label, [0] the group's AUC and [1] the rest's,
    with every patient once (scikit-learn's AUC) and in each resample; NaN where a side holds one class. The whole's
    are `bootstrap.bootstrap_aucs` on the same draws, bit for bit."""
    targets, scores, mask = np.asarray(targets), np.asarray(scores), np.asarray(mask, dtype=np.float64)
    cells = member_cells(np.asarray(members, dtype=bool).reshape(len(members), len(targets)))
    once = np.ones((n_patients, 1), dtype=COUNT_DTYPE)  # every patient drawn once: the point estimate, a column of the
    columns = [*blocks[:-1], np.hstack([blocks[-1], once])] if len(blocks) else [once]  # last pass (usually room to spare)
    inside, rest, whole = [], [], []  # per block: (groups, b, labels), (groups, b, labels), (b, labels)
    for labels in resample_group_aucs(targets, scores, mask, cells, patients, columns):
        for side, aucs in zip((inside, rest, whole), zip(*labels)):
            side.append(np.stack(aucs, axis=-1))
    inside, rest, whole = np.concatenate(inside, axis=1), np.concatenate(rest, axis=1), np.concatenate(whole)
    point = np.stack([inside[:, -1], rest[:, -1]])
    resampled = np.stack([inside[:, :-1], rest[:, :-1]])  # (2, groups, resamples, labels)
    return point, resampled.transpose(2, 0, 1, 3), whole[:-1]


def resampled_sums(columns: Sequence[np.ndarray], patients: np.ndarray, n_patients: int, blocks: Sequence[np.ndarray]) -> np.ndarray:
    """(resamples, K): each of K per-image counts (0/1 vectors over the images) summed in each resample, every image
    weighted by how often its patient was drawn. A rate of a resample (underdiagnosis) is a ratio of two such sums."""
    per_patient = np.stack([np.bincount(patients, weights=column, minlength=n_patients) for column in columns], axis=1)
    sums = [block.T.astype(np.float64) @ per_patient for block in blocks]
    return np.concatenate(sums) if sums else np.zeros((0, len(columns)))
