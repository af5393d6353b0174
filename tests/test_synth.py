"""Synthetic radiographs: determinism, the generic CSV, label statistics, and that the marks are learnable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cxrdist.data.synth.dataset import make_synthetic_dataset
from cxrdist.data.synth.label_table import PATHOLOGIES, sample_cohort, sample_labels
from cxrdist.data.synth.render import render_image
from cxrdist.errors import UserError
from cxrdist.labels import CHEXPERT_LABELS


def _raw_csv(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort():
    return sample_cohort(4000, seed=0)


@pytest.fixture(scope="module")
def labels(cohort) -> pd.DataFrame:
    """4000 rows; label columns as floats (blank = NaN, never equal to anything)."""
    return cohort.table.astype({name: float for name in CHEXPERT_LABELS})


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    csv = make_synthetic_dataset(out, n=40, size=64, seed=1, workers=1, progress=False)
    return out, csv


def test_same_seed_gives_the_same_bytes_whatever_the_worker_count(small_dataset, tmp_path):
    out, csv = small_dataset
    again = make_synthetic_dataset(tmp_path / "again", n=40, size=64, seed=1, workers=2, progress=False)
    assert again.read_bytes() == csv.read_bytes()
    first, second = _files(out / "images"), _files(tmp_path / "again" / "images")
    assert len(first) == 40 and first == second


def test_another_seed_gives_other_labels_and_images(small_dataset, tmp_path):
    out, csv = small_dataset
    other = make_synthetic_dataset(tmp_path / "other", n=40, size=64, seed=2, workers=1, progress=False)
    assert other.read_bytes() != csv.read_bytes()
    name = "patient00001/study1/view1_frontal.png"
    assert (tmp_path / "other" / "images" / name).read_bytes() != (out / "images" / name).read_bytes()


def test_csv_is_the_generic_format_with_paths_relative_to_images(small_dataset):
    out, csv = small_dataset
    assert csv == out / "labels.csv"
    table = _raw_csv(csv)
    assert list(table.columns) == ["path", "patient", "study", "view", "sex", "age", *CHEXPERT_LABELS]
    assert len(table) == 40
    assert set(np.unique(table[CHEXPERT_LABELS].to_numpy())) <= {"1", "0", "-1", ""}
    assert set(table["view"]) <= {"PA", "AP", "LATERAL"}
    for row in table.itertuples():
        assert row.path.startswith(f"{row.patient}/{row.study}/")
        assert (out / "images" / row.path).is_file()
    assert sorted(p.name for p in out.iterdir()) == ["images", "labels.csv"]  # no temporary file left


def test_csv_equals_sample_labels(small_dataset):
    _, csv = small_dataset
    written = pd.read_csv(csv, dtype={name: "Int64" for name in CHEXPERT_LABELS})
    pd.testing.assert_frame_equal(written, sample_labels(40, seed=1), check_dtype=False)


def test_images_are_8bit_grayscale_of_the_requested_size(small_dataset):
    out, _ = small_dataset
    with Image.open(out / "images" / "patient00001" / "study1" / "view1_frontal.png") as image:
        assert image.format == "PNG" and image.mode == "L" and image.size == (64, 64)
    cohort = sample_cohort(5, seed=0)
    pixels = render_image(cohort, 0, size=48, seed=0)
    assert pixels.dtype == np.uint8 and pixels.shape == (48, 48)
    assert pixels.std() > 10  # an image, not a flat field


def test_rerun_overwrites_only_its_own_files(small_dataset, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "labels.csv").write_text("stale")
    make_synthetic_dataset(out, n=3, size=32, seed=0, progress=False)
    assert (out / "notes.txt").read_text() == "keep me"
    assert len(_raw_csv(out / "labels.csv")) == 3
    assert sorted(p.name for p in out.iterdir()) == ["images", "labels.csv", "notes.txt"]


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "--n 0"),
    ({"size": 8}, "--size 8"),
    ({"seed": -1}, "--seed -1"),
    ({"workers": 0}, "--workers 0"),
])
def test_bad_arguments_are_user_errors(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        make_synthetic_dataset(tmp_path / "x", **{"n": 5, "size": 32, "progress": False, **kwargs})


def test_out_that_is_a_file_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        make_synthetic_dataset(tmp_path / "file", n=2, size=32, progress=False)


def test_smaller_n_is_a_prefix(labels):
    smaller = sample_labels(500, seed=0).astype({name: float for name in CHEXPERT_LABELS})
    pd.testing.assert_frame_equal(smaller, labels.iloc[:500])


# Positive (1) rates, loosely around CheXpert's.
PREVALENCE = {
    "No Finding": (0.07, 0.2),
    "Enlarged Cardiomediastinum": (0.02, 0.08),
    "Cardiomegaly": (0.07, 0.17),
    "Lung Opacity": (0.4, 0.62),
    "Lung Lesion": (0.02, 0.07),
    "Edema": (0.17, 0.32),
    "Consolidation": (0.04, 0.11),
    "Pneumonia": (0.015, 0.06),
    "Atelectasis": (0.1, 0.22),
    "Pneumothorax": (0.05, 0.13),
    "Pleural Effusion": (0.32, 0.48),
    "Pleural Other": (0.008, 0.04),
    "Fracture": (0.015, 0.05),
    "Support Devices": (0.4, 0.6),
}


@pytest.mark.parametrize("name", CHEXPERT_LABELS)
def test_prevalence_is_roughly_chexperts(labels, name):
    lo, hi = PREVALENCE[name]
    assert lo <= (labels[name] == 1).mean() <= hi


def test_uncertain_and_blank_rates(labels):
    uncertain = {name: (labels[name] == -1).mean() for name in CHEXPERT_LABELS}
    blank = {name: labels[name].isna().mean() for name in CHEXPERT_LABELS}
    assert uncertain["No Finding"] == 0
    for name in PATHOLOGIES + ["Support Devices"]:
        assert 0.002 <= uncertain[name] <= 0.15, name
    for name in ("Atelectasis", "Edema", "Consolidation"):
        assert uncertain[name] > uncertain["Pneumothorax"] and uncertain[name] >= 0.05
    for name in ("Lung Lesion", "Pleural Other", "Fracture", "Pneumonia"):
        assert blank[name] > 0.85  # rare labels: mostly not mentioned
    assert (labels["Pneumothorax"] == 0).mean() > 0.1  # explicit negatives exist


def test_no_finding_only_without_any_pathology(labels):
    assert set(labels["No Finding"].dropna()) == {1}
    clean = labels["No Finding"] == 1
    assert clean.sum() > 100
    mentioned = labels.loc[clean, PATHOLOGIES]
    assert not ((mentioned == 1) | (mentioned == -1)).any().any()
    assert (labels.loc[clean, "Support Devices"] == 1).any()  # devices do not count as a pathology


def test_patients_have_several_studies_and_views(labels):
    per_patient = labels.groupby("patient").size()
    assert per_patient.max() <= 6 and 2.0 <= per_patient.mean() <= 3.0
    assert (per_patient > 1).mean() > 0.5
    per_study = labels.groupby(["patient", "study"])
    assert per_study.size().isin([1, 2]).all()
    assert 0.05 <= (labels["view"] == "LATERAL").mean() <= 0.25
    assert set(labels.loc[labels["path"].str.contains("view1"), "view"]) == {"PA", "AP"}
    # both views of a study carry the study's labels
    assert (per_study[CHEXPERT_LABELS].nunique(dropna=False) <= 1).all().all()


def test_findings_are_coupled_and_persistent(cohort, labels):
    positive = (labels[CHEXPERT_LABELS] == 1).astype(float)
    corr = positive.corr()
    assert corr.loc["Edema", "Cardiomegaly"] > 0.05  # independent labels: 0 +- 0.02 at this n
    assert corr.loc["Edema", "Pleural Effusion"] > 0.05
    assert corr.loc["Pneumothorax", "Support Devices"] > 0.03
    implying = ["Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis"]
    implied = (labels[implying] == 1).any(axis=1)
    assert labels.loc[implied, "Lung Opacity"].isin([1, -1]).all()
    # chronic findings are drawn in all of a patient's images or in none
    for name in ("Cardiomegaly", "Lung Lesion", "Fracture"):
        shown = pd.Series(cohort.signs[:, CHEXPERT_LABELS.index(name)] > 0).groupby(cohort.patient_index)
        assert (shown.nunique() == 1).all(), name
        assert shown.any().sum() > 10, name


def test_marks_follow_the_labels(cohort):
    table, signs = cohort.table.astype({name: float for name in CHEXPERT_LABELS}), cohort.signs
    for k, name in enumerate(CHEXPERT_LABELS):
        if name in ("No Finding", "Lung Opacity"):
            continue
        assert (signs[(table[name] == 1).to_numpy(), k] == 1).all(), name
        absent = (table[name].isna() | (table[name] == 0)).to_numpy()
        assert (signs[absent, k] == 0).all(), name
        uncertain = signs[(table[name] == -1).to_numpy(), k]
        assert ((uncertain == 0) | ((uncertain >= 0.35) & (uncertain <= 0.65))).all(), name
    assert (signs[:, 0] == 0).all()


@pytest.fixture(scope="module")
def big_cohort():
    return sample_cohort(6000, seed=5)


@pytest.mark.parametrize("name", ["Cardiomegaly", "Pleural Effusion", "Edema", "Support Devices"])
def test_marks_are_learnable_from_32px_pixels(big_cohort, name):
    """A logistic regression on 32 px thumbnails of ~130 train images separates ~70 held-out patients' images."""
    cohort = big_cohort
    values = cohort.table[name].astype(float)
    k = CHEXPERT_LABELS.index(name)
    positive = np.flatnonzero((values == 1).to_numpy())[:100]
    negative = np.flatnonzero((cohort.signs[:, k] == 0) & values.isna().to_numpy())[:100]
    chosen = np.concatenate([positive, negative])
    pixels = np.stack([
        np.asarray(Image.fromarray(render_image(cohort, int(i), size=64, seed=5)).resize((32, 32), Image.BILINEAR))
        for i in chosen
    ]).reshape(len(chosen), -1).astype(float)
    pixels = (pixels - pixels.mean(1, keepdims=True)) / pixels.std(1, keepdims=True)  # undo exposure
    target = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    held_out = cohort.patient_index[chosen] % 3 == 0  # whole patients
    model = LogisticRegression(C=0.05, max_iter=2000).fit(pixels[~held_out], target[~held_out])
    auc = roc_auc_score(target[held_out], model.predict_proba(pixels[held_out])[:, 1])
    assert auc > 0.8, f"{name}: held-out AUC {auc:.3f}"


def test_planted_coupling_statistics(cohort):
    """cxrdist/data/synth/planted.py: the target is a noisy copy of the source (0.9 / 0.05, per study), written only
    for about F of the patients (-1 elsewhere, never hiding the truth in labels_full), the controls independent."""
    from cxrdist.data.synth.planted import CONTROLS, P_CONTROL, P_TARGET_GIVEN_SOURCE, P_TARGET_OTHERWISE, SOURCE, TARGET, plant_coupling

    seen, full = plant_coupling(cohort.table, labelled_fraction=0.25, seed=1)
    source = full[SOURCE].fillna(0).to_numpy() == 1
    target = full[TARGET].to_numpy().astype(int)
    assert set(np.unique(target)) == {0, 1}
    assert target[source].mean() == pytest.approx(P_TARGET_GIVEN_SOURCE, abs=0.03)
    assert target[~source].mean() == pytest.approx(P_TARGET_OTHERWISE, abs=0.02)
    for name in CONTROLS:
        control = full[name].to_numpy().astype(int)
        assert control.mean() == pytest.approx(P_CONTROL, abs=0.03)
        assert abs(np.corrcoef(control, source)[0, 1]) < 0.05 and abs(np.corrcoef(control, target)[0, 1]) < 0.05
    written = seen[TARGET].to_numpy().astype(int)
    labelled = written != -1
    np.testing.assert_array_equal(written[labelled], target[labelled])
    by_patient = pd.Series(labelled).groupby(full["patient"].to_numpy()).agg(["min", "max"])
    assert (by_patient["min"] == by_patient["max"]).all()  # a patient is labelled on all images or none
    assert by_patient["min"].mean() == pytest.approx(0.25, abs=0.04)
    by_study = pd.Series(target).groupby((full["patient"].astype(str) + "/" + full["study"].astype(str)).to_numpy()).nunique()
    assert (by_study == 1).all()  # one report per study
    # The original labels are untouched, and the same seed plants the same labels.
    pd.testing.assert_frame_equal(seen[cohort.table.columns], cohort.table)
    again, _ = plant_coupling(cohort.table, labelled_fraction=0.25, seed=1)
    pd.testing.assert_frame_equal(again, seen)


def test_synth_with_a_planted_coupling_writes_both_tables(tmp_path):
    from cxrdist.data.synth.planted import CONTROLS, TARGET

    csv = make_synthetic_dataset(tmp_path / "s", n=24, size=32, seed=2, workers=1, progress=False, planted_coupling=0.5)
    seen, full = _raw_csv(csv), _raw_csv(tmp_path / "s" / "labels_full.csv")
    assert list(seen.columns) == list(full.columns) and {TARGET, *CONTROLS} <= set(seen.columns)
    assert set(full[TARGET]) <= {"0", "1"} and "-1" in set(seen[TARGET])
    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match="planted-coupling"):
            make_synthetic_dataset(tmp_path / f"bad{bad}", n=8, size=32, seed=2, workers=1, progress=False, planted_coupling=bad)


def test_sex_and_age_are_per_patient_and_change_no_label(cohort):
    table = cohort.table
    assert table.groupby("patient")["sex"].nunique().max() == 1 and set(table["sex"]) == {"F", "M"}
    first = table.groupby("patient")["age"].transform("min")
    assert ((table["age"] - first) == table["study"].str.removeprefix("study").astype(int) - 1).all()
    assert table["age"].between(18, 94).all() and 0.45 < (table["sex"] == "F").mean() < 0.55
    for name in ("Pleural Effusion", "Edema", "Cardiomegaly"):  # independent of sex: prevalences alike
        by_sex = table[name].astype(float).eq(1).groupby(table["sex"]).mean()
        assert abs(by_sex["F"] - by_sex["M"]) < 0.04


def test_a_planted_gap_weakens_one_finding_for_one_group_only(cohort):
    from cxrdist.data.synth.label_table import LABELS
    from cxrdist.data.synth.planted_gap import parse_gap, plant_gap

    gap = parse_gap("Pleural Effusion:sex=F:0.25")
    signs = plant_gap(cohort, gap)
    women, k = (cohort.table["sex"] == "F").to_numpy(), LABELS.index("Pleural Effusion")
    np.testing.assert_allclose(signs[women, k], 0.25 * cohort.signs[women, k])
    unchanged = np.ones_like(signs, dtype=bool)
    unchanged[women, k] = False
    assert np.array_equal(signs[unchanged], cohort.signs[unchanged])
    assert parse_gap("Edema:age=60-90:0").members(cohort).sum() == cohort.table["age"].between(60, 90).sum()
    for bad in ("Pleural Effusion:sex:0.3", "No Finding:sex=F:0.3", "Edema:race=x:0.3", "Edema:sex=F:1.5", "Edema:age=90-60:0.5"):
        with pytest.raises(UserError, match="planted-gap"):
            parse_gap(bad)


def test_a_planted_shortcut_marks_ap_films_and_tracks_the_finding(cohort, tmp_path):
    from cxrdist.data.synth.planted_gap import P_MARKER_IF_PRESENT, P_MARKER_OTHERWISE, shortcut_markers

    marked = shortcut_markers(cohort, "Support Devices", seed=0)
    table = cohort.table
    ap, present = (table["view"] == "AP").to_numpy(), (table["Support Devices"].fillna(0) == 1).to_numpy()
    assert not marked[~ap].any()
    assert abs(marked[ap & present].mean() - P_MARKER_IF_PRESENT) < 0.05 and abs(marked[ap & ~present].mean() - P_MARKER_OTHERWISE) < 0.05
    csv = make_synthetic_dataset(tmp_path / "s", n=30, size=64, seed=0, workers=1, progress=False, planted_shortcut="Support Devices")
    plain = make_synthetic_dataset(tmp_path / "p", n=30, size=64, seed=0, workers=1, progress=False)
    rows = _raw_csv(csv)
    for i, path in enumerate(rows["path"]):
        pixels = np.asarray(Image.open(tmp_path / "s" / "images" / path))
        same = (tmp_path / "s" / "images" / path).read_bytes() == (plain.parent / "images" / path).read_bytes()
        assert same != bool(marked[i]) and (pixels[2, 2:7] == 245).all() == bool(marked[i])  # the tag's top edge at 64 px
