"""The patient bootstrap of the subgroup audit: per-label AUCs of image subsets (a group, the rest) in every resample
of the evaluation's own draws.

The resamples are those of `bootstrap.bootstrap_aucs` with the same patients and seed (`resample_counts`): resample r
draws every patient of the evaluated split as often as it does for the overall interval, and a subset's AUC in it is
the AUC over the subset's images weighted by their patients' counts. So a group and the rest are scored on the same
draws (a paired interval of their difference), and next to the overall AUC of the same resample. Each (subset, label)
is ranked once (`ranked_label` with the subset as the image weights) and scored per block of resamples with one
sparse product (`resample_auc`), exactly as the overall bootstrap is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cxrdist.evaluation.scoring.bootstrap import patient_index, ranked_label, resample_auc, resample_counts, resample_dtype

COUNT_DTYPE = np.int16  # a patient is drawn at most a few times per resample (Poisson(1)); blocks are kept for every label


def draws(groups: Sequence, n_resamples: int, seed: int) -> tuple[np.ndarray, int, list[np.ndarray]]:
    """(patient number of each image, number of patients, the (n_patients, b) count blocks): the evaluation's draws."""
    patients, n_patients = patient_index(groups)
    blocks = [block.astype(COUNT_DTYPE) for block in resample_counts(n_patients, n_resamples, seed)]
    return patients, n_patients, blocks


def subset_resample_aucs(targets: np.ndarray, scores: np.ndarray, mask: np.ndarray, subsets: np.ndarray, patients: np.ndarray,
                         n_patients: int, blocks: Sequence[np.ndarray]) -> np.ndarray:
    """(resamples, subsets, labels) AUC of each label over each subset's images (a row of the boolean (S, N) `subsets`)
    in each resample; NaN where a resample leaves the subset one class. Labels run in threads."""
    targets, scores = np.asarray(targets), np.asarray(scores)
    mask = np.asarray(mask, dtype=np.float64)
    n_resamples = sum(block.shape[1] for block in blocks)
    out = np.full((n_resamples, len(subsets), targets.shape[1]), np.nan)
    binary = bool(np.all((mask == 0) | (mask == 1)))
    dtype, images = np.float32 if binary else np.float64, np.bincount(patients, minlength=n_patients)
    block_dtypes = [resample_dtype(binary, images, block) for block in blocks]

    def score_label(j: int) -> None:
        ranked = [ranked_label(targets[:, j], scores[:, j], mask[:, j] * subset, patients, n_patients, dtype) for subset in subsets]
        start = 0
        for block, block_dtype in zip(blocks, block_dtypes):
            counts = block.astype(block_dtype)
            for s, label in enumerate(ranked):
                out[start : start + counts.shape[1], s, j] = resample_auc(label, counts)
            start += counts.shape[1]

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, min(cpus, targets.shape[1]))) as pool:
        list(pool.map(score_label, range(targets.shape[1])))
    return out


def resampled_sums(columns: Sequence[np.ndarray], patients: np.ndarray, n_patients: int, blocks: Sequence[np.ndarray]) -> np.ndarray:
    """(resamples, K): each of K per-image counts (0/1 vectors over the images) summed in each resample, every image
    weighted by how often its patient was drawn. A rate of a resample (underdiagnosis) is a ratio of two such sums."""
    per_patient = np.stack([np.bincount(patients, weights=column, minlength=n_patients) for column in columns], axis=1)
    sums = [block.T.astype(np.float64) @ per_patient for block in blocks]
    return np.concatenate(sums) if sums else np.zeros((0, len(columns)))
