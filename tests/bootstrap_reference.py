"""The patient bootstrap as it was before issue 22 (one (R, N) weight matrix drawn at once, a sort per label and
block of 200 resamples): the oracle that tests/test_bootstrap.py and bench/bench_bootstrap.py hold today's code to.
Frozen: do not edit. `weighted_auc` is still the package's (compare uses it; tests/test_evaluate.py holds it to
scikit-learn)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxrdist.evaluation.scoring.bootstrap import weighted_auc

CHUNK = 200


def reference_patient_weights(groups: Sequence, n_resamples: int, seed: int) -> np.ndarray:
    _, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_patients = int(index.max()) + 1 if len(index) else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, size=(n_resamples, n_patients))
    counts = np.zeros((n_resamples, n_patients), dtype=np.int64)
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1)
    return counts[:, index]


def reference_bootstrap_aucs(targets: np.ndarray, scores: np.ndarray, mask: np.ndarray | None, groups: Sequence,
                             n_resamples: int, seed: int) -> np.ndarray:
    targets, scores = np.asarray(targets), np.asarray(scores)
    mask = np.ones_like(targets, dtype=np.float64) if mask is None else np.asarray(mask, dtype=np.float64)
    weights = reference_patient_weights(groups, n_resamples, seed)
    out = np.empty((n_resamples, targets.shape[1]))
    for start in range(0, n_resamples, CHUNK):
        block = weights[start : start + CHUNK]
        for j in range(targets.shape[1]):
            out[start : start + CHUNK, j] = weighted_auc(targets[:, j], scores[:, j], block * mask[:, j])
    return out
