"""The patient bootstrap against the code it replaced (tests/bootstrap_reference.py: same seed, same draws, the
same AUCs) and against scikit-learn on explicitly materialised resamples (each drawn patient's images repeated)."""

from __future__ import annotations

import numpy as np
import pytest
from bootstrap_reference import reference_bootstrap_aucs, reference_patient_weights
from sklearn.metrics import roc_auc_score

from cxrdist.evaluation.scoring import group_ranks
from cxrdist.evaluation.scoring.bootstrap import auc_intervals, bootstrap_aucs, patient_weights, percentile_interval, resample_counts


def awkward_labels(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(targets, scores, mask, patients): ties, masked images, and labels that are skipped or nearly so."""
    rng = np.random.default_rng(seed)
    patients = [f"p{i}" for i in rng.integers(0, n // 3, n)]  # 1 to ~8 images per patient
    prevalence = np.array([0.2, 0.7, 0.5, 0.0, 1.0, 0.01, 0.3, 0.3, 0.8])  # 8: more positives, no ties
    targets = (rng.random((n, len(prevalence))) < prevalence).astype(float)
    scores = rng.random(targets.shape) + 0.4 * targets
    scores[:, :3] = np.round(scores[:, :3], 1)  # heavy ties, positives tied with negatives
    scores[:, 6] = 0.5  # every image tied
    mask = (rng.random(targets.shape) < 0.8).astype(float)
    mask[:, 7] = 0.0  # a label left out everywhere
    return targets, scores, mask, patients


def test_draws_made_in_blocks_are_the_draws_of_one_call():
    for n_patients in (1, 7, 1001):
        groups = [f"p{i:05d}" for i in range(n_patients)]  # sorted names: patient number = position
        one_call = reference_patient_weights(groups, 130, seed=4)
        for block in (1, 3, 64, 200):
            blocks = np.concatenate([c.T for c in resample_counts(n_patients, 130, seed=4, block=block)])
            np.testing.assert_array_equal(blocks, one_call)
    groups = awkward_labels()[3]
    np.testing.assert_array_equal(patient_weights(groups, 300, seed=9), reference_patient_weights(groups, 300, seed=9))


def test_bootstrap_equals_the_previous_code():
    targets, scores, mask, patients = awkward_labels()
    expected = reference_bootstrap_aucs(targets, scores, mask, patients, 300, seed=3)
    got = bootstrap_aucs(targets, scores, mask, patients, 300, seed=3)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert np.isnan(expected[:, 3:5]).all() and np.isnan(expected[:, 7]).all() and np.isnan(expected[:, 5]).any()
    assert np.isfinite(expected[:, [0, 1, 2, 6, 8]]).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    unmasked = bootstrap_aucs(targets, scores, None, patients, 300, seed=3)
    np.testing.assert_allclose(unmasked, reference_bootstrap_aucs(targets, scores, None, patients, 300, seed=3), rtol=0, atol=1e-12)


def test_weights_that_are_not_zero_or_one_still_weight_as_before():
    targets, scores, mask, patients = awkward_labels(seed=1)
    mask = mask * np.random.default_rng(1).choice([0.5, 1.0, 2.0], size=mask.shape)
    expected = reference_bootstrap_aucs(targets, scores, mask, patients, 100, seed=0)
    np.testing.assert_allclose(bootstrap_aucs(targets, scores, mask, patients, 100, seed=0), expected, rtol=0, atol=1e-12)


def test_intervals_equal_the_previous_code():
    targets, scores, mask, patients = awkward_labels(seed=2)
    labels = [f"l{j}" for j in range(targets.shape[1])]
    result = auc_intervals(targets, scores, labels, mask, patients, n_resamples=200, level=0.9, seed=5)
    aucs = reference_bootstrap_aucs(targets, scores, mask, patients, 200, seed=5)
    for j in (0, 1, 2, 5, 6, 8):
        assert result["per_label"][labels[j]] == percentile_interval(aucs[:, j], 0.9)
    assert result["per_label"]["l3"] is None and result["per_label"]["l7"] is None


def test_each_resample_is_sklearn_on_its_materialised_images():
    targets, scores, mask, patients = awkward_labels(n=150, seed=3)
    aucs = bootstrap_aucs(targets, scores, mask, patients, 40, seed=8)
    weights = patient_weights(patients, 40, seed=8)  # the same draws, per image
    checked = 0
    for r in range(40):
        for j in range(targets.shape[1]):
            repeats = weights[r] * (mask[:, j] > 0)
            y, s = np.repeat(targets[:, j], repeats), np.repeat(scores[:, j], repeats)
            if len(np.unique(y)) < 2:
                assert np.isnan(aucs[r, j])
            else:
                assert aucs[r, j] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
                checked += 1
    assert checked > 100


def test_one_thread_gives_the_same_aucs_as_several(monkeypatch):
    targets, scores, mask, patients = awkward_labels(seed=4)
    several = bootstrap_aucs(targets, scores, mask, patients, 150, seed=2)
    monkeypatch.setattr(group_ranks.os, "sched_getaffinity", lambda _: {0}, raising=False)
    monkeypatch.setattr(group_ranks.os, "cpu_count", lambda: 1)
    np.testing.assert_array_equal(bootstrap_aucs(targets, scores, mask, patients, 150, seed=2), several)


def test_where_numba_can_cache_nothing_the_pass_is_compiled_in_each_process(monkeypatch):
    """A read-only install and home: numba refuses cache=True when it decorates (measured by hand on a read-only bind
    mount: the import raised "cannot cache function ... no locator available"); the pass then compiles per process."""
    real = group_ranks.njit

    def njit(**options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'add_one': no locator available for file 'x.py'")
        return real(**options)

    def add_one(x):
        return x + 1

    monkeypatch.setattr(group_ranks, "njit", njit)
    assert group_ranks.compiled(add_one)(41) == 42
