"""Patient-grouped stratified folds: oracles are iterative-stratification itself, pandas group-bys
and hand-computed cases, never the module's own bookkeeping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from cxrdist.data.ingest.folds import (
    assign_splits,
    fold_name,
    format_balance,
    positives_matrix,
    read_assignment,
    split_balance,
    stratification_matrix,
    write_assignment,
)
from cxrdist.errors import UserError

LABELS = [f"label {i}" for i in range(14)]
PREVALENCE = np.array([0.10, 0.05, 0.12, 0.47, 0.04, 0.23, 0.07, 0.03, 0.15, 0.09, 0.39, 0.02, 0.04, 0.52])
TARGET_DEVIATION = 0.0002  # 0.02 percentage points
N_FOLDS = 5


def make_dataset(n_patients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient id per image and raw labels (1/0/-1/NaN); 1 to ~40 images per patient, positives
    correlated within a patient."""
    rng = np.random.default_rng(seed)
    images = 1 + rng.negative_binomial(0.5, 0.5 / 2.9, size=n_patients)
    patient_of_image = np.repeat(np.arange(n_patients), images)
    propensity = rng.standard_normal((n_patients, PREVALENCE.size))[patient_of_image]
    latent = 0.85 * propensity + 0.53 * rng.standard_normal((patient_of_image.size, PREVALENCE.size))
    threshold = np.diagonal(np.quantile(latent, 1 - PREVALENCE, axis=0))
    positive = latent > threshold
    raw = np.where(rng.random(positive.shape) < 0.6, np.nan, 0.0)
    raw[(rng.random(positive.shape) < 0.1) & ~positive] = -1.0
    raw[positive] = 1.0
    shuffle = rng.permutation(patient_of_image.size)  # a patient's images need not be adjacent
    return np.array([f"p{p:05d}" for p in patient_of_image])[shuffle], raw[shuffle]


@pytest.fixture(scope="module")
def dataset() -> tuple[np.ndarray, np.ndarray]:
    patients, raw = make_dataset(6000, seed=1)  # ~20k images
    return patients, positives_matrix(raw)


@pytest.fixture(scope="module")
def balanced(dataset) -> np.ndarray:
    return assign_splits(dataset[0], dataset[1], N_FOLDS, seed=0)


@pytest.fixture(scope="module")
def unbalanced(dataset) -> np.ndarray:
    return assign_splits(dataset[0], dataset[1], N_FOLDS, seed=0, balance=False)


def splits_per_patient(patients: np.ndarray, splits: np.ndarray) -> pd.Series:
    return pd.DataFrame({"patient": patients, "split": splits}).groupby("patient")["split"].nunique()


def fold_deviation_and_spread(splits: np.ndarray, positives: np.ndarray) -> tuple[float, float]:
    folds = [f"fold-{k}" for k in range(N_FOLDS)]
    in_folds = np.isin(splits, folds)
    overall = positives[in_folds].mean(axis=0)
    deviation = max(np.abs(positives[splits == f].mean(axis=0) - overall).max() for f in folds)
    sizes = np.array([(splits == f).sum() for f in folds])
    return deviation, (sizes.max() - sizes.min()) / sizes.mean()


def test_positives_are_exactly_the_ones():
    raw = np.array([[1, 0, -1, np.nan], [np.nan, 1, 1, -1]])
    assert positives_matrix(raw).tolist() == [[True, False, False, False], [False, True, True, False]]


def test_every_image_gets_a_fold_and_no_patient_is_in_two(dataset, balanced):
    patients, _ = dataset
    assert set(balanced) == {f"fold-{k}" for k in range(N_FOLDS)}
    assert splits_per_patient(patients, balanced).max() == 1


def test_without_balancing_the_folds_are_plain_patient_level_mis(dataset, unbalanced):
    patients, positives = dataset
    per_patient = pd.DataFrame(positives).groupby(patients).max()  # sorted patient ids, any image positive
    mis = MultilabelStratifiedKFold(n_splits=N_FOLDS, shuffle=True, random_state=0)
    expected = pd.Series("", index=per_patient.index)
    for k, (_, members) in enumerate(mis.split(np.zeros((len(per_patient), 1)), per_patient.to_numpy())):
        expected.iloc[members] = f"fold-{k}"
    assert (unbalanced == expected[patients].to_numpy()).all()


def test_balancing_reaches_the_image_level_targets(dataset, balanced, unbalanced):
    _, positives = dataset
    before, _ = fold_deviation_and_spread(unbalanced, positives)
    after, spread = fold_deviation_and_spread(balanced, positives)
    assert after < before
    assert before > TARGET_DEVIATION  # the data is hard enough for the test to mean something
    assert after <= TARGET_DEVIATION
    assert spread <= 0.01


def test_deterministic_for_a_seed_and_different_for_another(dataset, balanced):
    patients, positives = dataset
    assert (assign_splits(patients, positives, N_FOLDS, seed=0) == balanced).all()
    other = assign_splits(patients, positives, N_FOLDS, seed=1)
    assert (other != balanced).mean() > 0.5


def test_test_fraction_takes_that_share_of_images_without_leaks(dataset):
    patients, positives = dataset
    splits = assign_splits(patients, positives, N_FOLDS, seed=3, test_fraction=0.2)
    assert abs((splits == "test").mean() - 0.2) < 0.002
    assert splits_per_patient(patients, splits).max() == 1
    test_prevalence = positives[splits == "test"].mean(axis=0)
    assert np.abs(test_prevalence - positives.mean(axis=0)).max() < 0.001
    # Folds of ~3,300 images: one positive is 0.03 pp, so only a loose bound here (unbalanced: 2.8 pp).
    deviation, spread = fold_deviation_and_spread(splits, positives)
    assert deviation <= 2 * TARGET_DEVIATION and spread <= 0.01


def test_test_patients_are_honored(dataset):
    patients, positives = dataset
    chosen = set(np.unique(patients)[::7])
    splits = assign_splits(patients, positives, N_FOLDS, seed=0, test_patients=chosen)
    assert ((splits == "test") == np.isin(patients, list(chosen))).all()
    assert splits_per_patient(patients, splits).max() == 1


def test_a_single_label_works():
    patients, raw = make_dataset(300, seed=2)
    splits = assign_splits(patients, positives_matrix(raw[:, :1]), 3, seed=0)
    assert splits_per_patient(patients, splits).max() == 1
    assert set(splits) == {"fold-0", "fold-1", "fold-2"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_folds=1), "at least 2"),
        (dict(n_folds=5, test_fraction=1.0), "test fraction"),
        (dict(n_folds=5, test_fraction=-0.1), "test fraction"),
        (dict(n_folds=5, test_fraction=0.2, test_patients={"a"}), "not both"),
        (dict(n_folds=5, test_patients={"nobody"}), "test-list"),
        (dict(n_folds=4), "4 folds from 3 patients"),
        (dict(n_folds=3, test_patients={"a"}), "3 folds from 2 patients"),
        (dict(n_folds=2, test_fraction=0.9), "test fraction 0.9 of 3 patients"),
    ],
)
def test_impossible_requests_are_user_errors(kwargs, message):
    patients = ["a", "a", "b", "c", "c", "c"]
    positives = np.eye(6, 3, dtype=bool)
    with pytest.raises(UserError, match=message):
        assign_splits(patients, positives, **kwargs)


def test_split_balance_on_a_hand_computed_case():
    splits = np.array(["fold-0", "fold-0", "fold-1", "fold-1", "fold-1", "test", "test"])
    patients = np.array(["a", "a", "b", "c", "c", "c", "d"])  # c leaks into test
    positives = np.array([[1, 0], [1, 1], [0, 0], [1, 0], [0, 0], [1, 1], [0, 1]], dtype=bool)
    balance = split_balance(splits, patients, positives, ["x", "y"])
    assert balance["splits"]["fold-0"] == {"num_samples": 2, "num_patients": 1, "prevalence": {"x": 1.0, "y": 0.5}}
    assert balance["splits"]["fold-1"]["prevalence"] == pytest.approx({"x": 1 / 3, "y": 0.0})
    assert balance["overall"]["prevalence"] == pytest.approx({"x": 0.6, "y": 0.2})  # folds' images only
    assert balance["max_deviation"] == pytest.approx({"x": 0.4, "y": 0.3})
    assert balance["max_deviation_overall"] == pytest.approx(0.4)
    assert balance["test_deviation"] == pytest.approx({"x": 0.1, "y": 0.8})
    assert balance["size_spread"] == pytest.approx((3 - 2) / 2.5)
    assert balance["patients_in_several_splits"] == 1


def test_format_balance_shows_every_label_and_the_leak_count(dataset, balanced):
    patients, positives = dataset
    text = format_balance(split_balance(balanced, patients, positives, LABELS))
    for label in LABELS:
        assert f"\n{label} " in text
    for k in range(N_FOLDS):
        assert f"fold-{k}" in text
    assert "patients in several splits: 0" in text


def test_assignment_round_trip(tmp_path, dataset, balanced):
    patients, _ = dataset
    paths = [f"images/{i}.jpg" for i in range(patients.size)]
    target = tmp_path / "sub" / "folds.csv"
    write_assignment(target, paths, patients, balanced)
    table = read_assignment(target)
    assert list(table.columns) == ["path", "patient", "split"]
    assert table["path"].tolist() == paths
    assert table["patient"].tolist() == patients.tolist()
    assert table["split"].tolist() == balanced.tolist()
    assert [p.name for p in target.parent.iterdir()] == ["folds.csv"]  # no temporary left behind


@pytest.mark.parametrize(
    "content, message",
    [
        ("path,split\nx.png,fold-0\n", "missing column"),
        ("path,patient,split\nx.png,a,fold-0\ny.png,b,val\n", "line 3: split 'val'"),
        ("path,patient,split\nx.png,a,fold-0\ny.png,b,fold-2\n", "fold-0 .. fold-K-1"),
        ("path,patient,split\nx.png,a,fold-0\ny.png,a,fold-1\n", "patient 'a'"),
        ("path,patient,split\nx.png,a,fold-0\nx.png,b,fold-1\n", "listed twice"),
        ("path,patient,split\nx.png,,fold-0\ny.png,b,fold-1\n", "line 2: empty patient"),
    ],
)
def test_bad_assignment_files_are_user_errors(tmp_path, content, message):
    target = tmp_path / "folds.csv"
    target.write_text(content)
    with pytest.raises(UserError, match=message):
        read_assignment(target)


def test_missing_assignment_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_assignment(tmp_path / "nope.csv")


def test_uncertain_entries_are_stratified_too():

    raw = np.array([[1, -1, np.nan], [0, np.nan, -1], [-1, 1, 0]], dtype=float)
    assert stratification_matrix(raw).tolist() == [  # positives, then uncertain for labels that have any
        [True, False, False, False, True, False],
        [False, False, False, False, False, True],
        [False, True, False, True, False, False],
    ]
    rng = np.random.default_rng(5)
    n = 900
    patients = [f"p{i}" for i in range(n)]
    labels = rng.choice([1.0, 0.0, -1.0, np.nan], size=(n, 3), p=[0.3, 0.2, 0.15, 0.35])
    uncertain = labels == -1

    def worst_uncertain_deviation(matrix) -> float:
        splits = np.asarray(assign_splits(patients, matrix, 5, seed=0, balance=False))
        counts = np.array([[uncertain[splits == fold_name(k), j].sum() for j in range(3)] for k in range(5)])
        return float(np.abs(counts - uncertain.sum(axis=0) / 5).max())

    assert worst_uncertain_deviation(stratification_matrix(labels)) <= 1.0
    assert worst_uncertain_deviation(positives_matrix(labels)) > 2.0  # positives only leave them to chance
