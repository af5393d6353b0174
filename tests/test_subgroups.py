"""The subgroup audit's numbers against oracles: scikit-learn for every group's AUC, and a brute-force patient bootstrap
(tests/bootstrap_reference.py's (resamples x images) weights, the same seed, weighted AUCs restricted to the group) for
its intervals and its paired gap to the rest; the underdiagnosis rate against a hand count; the small-group rule, the
intersections, the family-wise flag, and W&B keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
from bootstrap_reference import reference_patient_weights
from sklearn.metrics import roc_auc_score

from cxrdist.data.attributes import AttributeSpec, age_group, age_value, sex_value
from cxrdist.errors import UserError
from cxrdist.evaluation.clinical.subgroup_rates import NO_FINDING, evaluation_audit
from cxrdist.evaluation.scoring import bootstrap
from cxrdist.evaluation.scoring.bootstrap import weighted_auc
from cxrdist.evaluation.scoring.subgroups import MIN_CASES, TOO_FEW, subgroup_audit, wandb_values

LABELS = ["No Finding", "Edema", "Pleural Effusion", "Rare"]
SPECS = [AttributeSpec("sex", "sex", "test", values={"F": 1, "M": 1}), AttributeSpec("age", "age", "test", bins=[18, 40, 60, 80]),
         AttributeSpec("site", "category", "test", values={"a/b c": 1, "d": 1})]


def cohort(n_patients: int = 300, seed: int = 0, planted: float = 0.0):
    """(targets, scores, mask, patients, attributes): 1-4 images per patient, ties, masked entries, unknown values, a rare
    label; with `planted`, Edema's scores for women are that much noise (a gap the audit must find)."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 5, n_patients)
    patient = np.repeat(np.arange(n_patients), per_patient)
    n = len(patient)
    sex = np.array(["F", "M", None], dtype=object)[rng.choice(3, n_patients, p=[0.48, 0.48, 0.04])][patient]
    age = rng.uniform(5, 95, n_patients)[patient] + np.concatenate([np.arange(k) for k in per_patient])
    site = np.array(["a/b c", "d"], dtype=object)[rng.integers(0, 2, n_patients)][patient]
    targets = (rng.random((n, len(LABELS))) < [0.3, 0.3, 0.4, 0.008]).astype(float)
    targets[:, 0] = (targets[:, 1:3].sum(axis=1) == 0)  # No Finding: no other finding
    scores = np.round(rng.random(targets.shape) + 0.8 * targets, 2)  # ties
    women = sex == "F"
    scores[women, 1] = np.round(rng.random(women.sum()) + (0.8 - planted) * targets[women, 1], 2)
    mask = (rng.random(targets.shape) < 0.9).astype(float)
    attributes = [{"sex": s, "age": float(a), "site": t} for s, a, t in zip(sex, age, site)]
    return targets, scores, mask, [f"p{k}" for k in patient], attributes


def brute_force(targets, scores, mask, patients, members, resamples, seed):
    """(resamples, labels) AUCs over `members` from explicit per-image weights (the frozen reference draws)."""
    weights = reference_patient_weights(patients, resamples, seed)
    return np.stack([weighted_auc(targets[:, j], scores[:, j], weights * mask[:, j] * members) for j in range(targets.shape[1])], axis=1)


def percentile(values: np.ndarray) -> list[float]:
    return list(np.percentile(values[np.isfinite(values)], [2.5, 97.5]))


def test_group_aucs_intervals_and_gaps_equal_sklearn_and_a_brute_force_bootstrap():
    targets, scores, mask, patients, attributes = cohort()
    result = subgroup_audit(LABELS, targets, scores, mask, patients, attributes, SPECS, resamples=120, seed=5)
    sex = np.array([a["sex"] or "unknown" for a in attributes])
    groups = result["attributes"]["sex"]["groups"]
    assert list(groups) == ["F", "M", "unknown"] and not groups["unknown"]["reported"]
    for name in ("F", "M"):
        members, entry = sex == name, groups[name]
        assert entry["images"] == members.sum() and entry["patients"] == len(set(np.array(patients)[members]))
        inside = brute_force(targets, scores, mask, patients, members, 120, 5)
        rest = brute_force(targets, scores, mask, patients, ~members, 120, 5)
        for j, label in enumerate(LABELS[:3]):
            keep = members & (mask[:, j] > 0)
            assert math.isclose(entry["per_label"][label], roc_auc_score(targets[keep, j], scores[keep, j]), abs_tol=1e-12)
            assert math.isclose(entry["prevalence"][label], targets[keep, j].mean(), abs_tol=1e-12)
            np.testing.assert_allclose(entry["interval"]["per_label"][label], percentile(inside[:, j]), rtol=0, atol=1e-12)
            other = ~members & (mask[:, j] > 0)
            gap = entry["gap"]["per_label"][label]
            expected = roc_auc_score(targets[keep, j], scores[keep, j]) - roc_auc_score(targets[other, j], scores[other, j])
            assert math.isclose(gap["value"], expected, abs_tol=1e-12)
            np.testing.assert_allclose(gap["interval"], percentile(inside[:, j] - rest[:, j]), rtol=0, atol=1e-12)
        scored = [j for j, label in enumerate(LABELS) if entry["per_label"][label] is not None]  # both classes in the group
        assert math.isclose(entry["macro_auc"], np.mean([entry["per_label"][LABELS[j]] for j in scored]), abs_tol=1e-12)
        np.testing.assert_allclose(entry["interval"]["macro_auc"], percentile(np.nanmean(inside[:, scored], axis=1)), rtol=0, atol=1e-12)
        assert entry["gap"]["per_label"]["Rare"] is None  # fewer than MIN_CASES patients with the finding: no gap


def test_age_groups_and_intersections_match_a_hand_grouping():
    targets, scores, mask, patients, attributes = cohort(seed=1)
    result = subgroup_audit(LABELS, targets, scores, mask, patients, attributes, SPECS, resamples=20, intersections=[("sex", "age")])
    ages = [age_group(a["age"], [18, 40, 60, 80]) for a in attributes]
    groups = result["attributes"]["age"]["groups"]
    assert list(groups) == ["0-17", "18-39", "40-59", "60-79", "80+"]
    for name, entry in groups.items():
        members = np.array(ages) == name
        if entry["reported"]:
            keep = members & (mask[:, 2] > 0)
            assert math.isclose(entry["per_label"]["Pleural Effusion"], roc_auc_score(targets[keep, 2], scores[keep, 2]), abs_tol=1e-12)
    crossed = result["attributes"]["sex × age"]
    assert crossed["kind"] == "intersection" and "F × 40-59" in crossed["groups"] and "unknown × 0-17" in crossed["groups"]
    assert sum(e.get("images", 0) for e in crossed["groups"].values()) <= len(targets)


def test_small_groups_are_too_few_patients_and_never_a_number():
    targets, scores, mask, patients, attributes = cohort(seed=2)
    result = subgroup_audit(LABELS, targets, scores, mask, patients, attributes, SPECS, resamples=20, min_patients=40)
    unknown = result["attributes"]["sex"]["groups"]["unknown"]
    assert unknown == {"reported": False, "note": f"{TOO_FEW} (fewer than 40)"}
    small = [(a, g) for a, info in result["attributes"].items() for g, e in info["groups"].items() if not e["reported"]]
    assert ("age", "0-17") in small or ("age", "80+") in small  # patients per age bin: ~50, some under 40
    keys = wandb_values(result, "val")
    assert not [k for k in keys if k.endswith("/unknown")] and "val/subgroup_auc/sex/F" in keys
    with pytest.raises(UserError, match="at least 1 patient"):
        subgroup_audit(LABELS, targets, scores, mask, patients, attributes, SPECS, min_patients=0)


def test_attribute_values_are_escaped_in_wandb_keys():
    targets, scores, mask, patients, attributes = cohort(seed=3)
    keys = wandb_values(subgroup_audit(LABELS, targets, scores, mask, patients, attributes, SPECS, resamples=20), "ensemble")
    assert "ensemble/subgroup_auc/site/a%2Fb%20c" in keys and not [k for k in keys if "a/b" in k]


@pytest.mark.parametrize("pair, words", [(("sex", "sex"), "crossed with itself"), (("sex", "race"), "no attribute 'race'")])
def test_a_bad_intersection_is_one_clear_error(pair, words):
    targets, scores, mask, patients, attributes = cohort(n_patients=60)
    with pytest.raises(UserError, match=words):
        subgroup_audit(LABELS, targets, scores, mask, patients, attributes, SPECS, resamples=5, intersections=[pair])


def test_a_planted_gap_is_flagged_and_null_cohorts_flag_at_most_the_family_rate():
    targets, scores, mask, patients, attributes = cohort(n_patients=400, seed=4, planted=0.6)
    result = subgroup_audit(LABELS, targets, scores, mask, patients, attributes, SPECS, resamples=300)
    flagged = {(f["attribute"], f["group"], f["metric"]) for f in result["flagged"]}
    assert ("sex", "F", "AUC Edema") in flagged and not [f for f in flagged if f[0] in ("age", "site")]
    assert result["attributes"]["sex"]["groups"]["F"]["gap"]["per_label"]["Edema"]["value"] < -0.1
    runs = 20  # the same audit of 20 cohorts without the plant: a flag in any is a false positive (family-wise rate <= 5%)
    with_a_flag = sum(bool(subgroup_audit(LABELS, *cohort(n_patients=200, seed=100 + k), SPECS, resamples=200)["flagged"]) for k in range(runs))
    assert with_a_flag <= 3, f"{with_a_flag} of {runs} null audits flagged a gap"  # Binomial(20, 0.05): P(>= 4) = 1.6%


def test_underdiagnosis_rate_and_gap_equal_a_hand_count():
    targets, scores, mask, patients, attributes = cohort(seed=6)
    thresholds = {label: {"sens@spec90": 0.9, "spec@sens90": 0.4} for label in LABELS}
    operating_points = {"points": ["sens@spec90", "spec@sens90"],
                        "per_label": {label: {p: {"threshold": t} for p, t in points.items()} for label, points in thresholds.items()}}
    result = evaluation_audit(LABELS, targets, scores, mask, patients, attributes, SPECS, None, operating_points, resamples=100, seed=2)
    assert "false-positive rate of 'No Finding'" in result["underdiagnosis_definition"]
    sex = np.array([a["sex"] or "unknown" for a in attributes])
    has = (mask[:, 0] > 0) & (targets[:, 0] == 0)
    weights = reference_patient_weights(patients, 100, 2)
    for point, threshold in thresholds[NO_FINDING].items():
        called = scores[:, 0] >= threshold
        for name in ("F", "M"):
            members = sex == name
            entry = result["attributes"]["sex"]["groups"][name]["underdiagnosis"][point]
            inside, rest = has & members, has & ~members
            assert math.isclose(entry["rate"], (called & inside).sum() / inside.sum(), abs_tol=1e-12)
            resampled = (weights * (called & inside)).sum(axis=1) / (weights * inside).sum(axis=1)
            other = (weights * (called & rest)).sum(axis=1) / (weights * rest).sum(axis=1)
            np.testing.assert_allclose(entry["interval"], percentile(resampled), rtol=0, atol=1e-12)
            assert math.isclose(entry["gap"]["value"], (called & inside).sum() / inside.sum() - (called & rest).sum() / rest.sum(), abs_tol=1e-12)
            np.testing.assert_allclose(entry["gap"]["interval"], percentile(resampled - other), rtol=0, atol=1e-12)
        sensitivity = result["attributes"]["sex"]["groups"]["F"]["operating_points"][point]["Edema"]["sensitivity"]
        keep = (sex == "F") & (mask[:, 1] > 0) & (targets[:, 1] > 0)
        assert math.isclose(sensitivity, (scores[keep, 1] >= threshold).mean(), abs_tol=1e-12)


def test_underdiagnosis_without_no_finding_is_any_finding_called_by_no_label():
    targets, scores, mask, patients, attributes = cohort(seed=7)
    labels, targets, scores, mask = LABELS[1:], targets[:, 1:], scores[:, 1:], mask[:, 1:]
    thresholds = {"Edema": 0.9, "Pleural Effusion": 0.7, "Rare": None}  # Rare: unreachable, never called
    operating_points = {"points": ["sens@spec90"], "per_label": {label: {"sens@spec90": {"threshold": t}} for label, t in thresholds.items()}}
    result = evaluation_audit(labels, targets, scores, mask, patients, attributes, SPECS, None, operating_points, resamples=20)
    assert "has no 'No Finding'" in result["underdiagnosis_definition"]
    has = ((mask > 0) & (targets > 0)).any(axis=1)
    called = (scores[:, 0] < 0.9) & (scores[:, 1] < 0.7)
    members = np.array([a["sex"] == "M" for a in attributes])
    rate = result["attributes"]["sex"]["groups"]["M"]["underdiagnosis"]["sens@spec90"]["rate"]
    assert math.isclose(rate, (called & has & members).sum() / (has & members).sum(), abs_tol=1e-12)
    assert MIN_CASES == 10


def test_without_attributes_there_is_no_audit_and_one_note():
    targets, scores, mask, patients, _ = cohort(n_patients=50)
    result = subgroup_audit(LABELS, targets, scores, mask, patients, [{}] * len(targets), [])
    assert result["attributes"] == {} and len(result["notes"]) == 1 and "no subgroup audit" in result["notes"][0]


def test_values_are_read_as_documented():
    assert [age_value(t) for t in ("58", "058Y", "6M", " 3w ", "10D", "", "NaN", "unknown")] == [58.0, 58.0, 0.5, 0.057, 0.027, None, None, None]
    with pytest.raises(ValueError):
        age_value("fifty")
    assert [sex_value(t) for t in ("Female", "male", "F", "M", "Unknown", "", "other")] == ["F", "M", "F", "M", None, None, "other"]
    assert [age_group(a, [18, 40, 60, 80]) for a in (0, 17.9, 18, 59.5, 80, 120, None)] == ["0-17", "0-17", "18-39", "40-59", "80+", "80+", "unknown"]


def test_group_and_rest_resamples_equal_brute_force_on_awkward_labels():
    """Ties between classes, every image tied, labels left out or of one class, more positive than negative levels (the
    swapped ranking): each group's and its rest's AUC in every resample equal weighted AUCs from explicit weights, and
    the whole's equal the evaluation's bootstrap bit for bit."""
    from test_bootstrap import awkward_labels

    from cxrdist.evaluation.scoring.subgroup_bootstrap import draws, group_resample_aucs

    targets, scores, mask, patients = awkward_labels(n=500, seed=3)
    rng = np.random.default_rng(0)
    by_patient = {p: rng.integers(0, 3) for p in sorted(set(patients))}
    members = np.array([[by_patient[p] == k for p in patients] for k in range(3)] + [[i % 2 == 0 for i in range(len(patients))]])
    patient_no, n_patients, blocks = draws(patients, 60, seed=8)
    point, resampled, whole = group_resample_aucs(targets, scores, mask, members, patient_no, n_patients, blocks)
    assert np.array_equal(whole, bootstrap.bootstrap_aucs(targets, scores, mask, patients, 60, seed=8), equal_nan=True)
    weights = reference_patient_weights(patients, 60, 8)
    for k, member in enumerate(members):
        for side, rows in enumerate((member, ~member)):
            for j in range(targets.shape[1]):
                expected = weighted_auc(targets[:, j], scores[:, j], weights * mask[:, j] * rows)
                np.testing.assert_allclose(resampled[:, side, k, j], expected, rtol=0, atol=1e-12)
                once = weighted_auc(targets[:, j], scores[:, j], mask[:, j] * rows)[0]
                assert (math.isnan(once) and math.isnan(point[side, k, j])) or math.isclose(point[side, k, j], once, abs_tol=1e-12)


def test_report_section_escapes_values_names_no_file_after_them_and_hides_small_groups(tmp_path):
    from cxrdist.evaluation.report.audit import audit_section

    targets, scores, mask, patients, attributes = cohort(n_patients=300, seed=4, planted=0.6)
    hostile = '<img src=x onerror="alert(1)">'
    attributes = [{**a, "site": hostile if a["site"] == "d" else "../../etc"} for a in attributes]
    specs = [SPECS[0], AttributeSpec("site", "category", "test", values={hostile: 1, "../../etc": 1})]
    thresholds = {"points": ["sens@spec90"], "per_label": {label: {"sens@spec90": {"threshold": 0.9}} for label in LABELS}}
    audit = evaluation_audit(LABELS, targets, scores, mask, patients, attributes, specs, None, thresholds, resamples=50, min_patients=30)
    html = audit_section({"subgroups": audit, "ensemble": {"macro_auc": 0.9}}, tmp_path)
    assert hostile not in html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "too few patients" in html and ">Who the model fails<" in html and "is 0." in html  # a flagged gap in words
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subgroups-0.png", "subgroups-1.png"]


@pytest.mark.parametrize("exact_below", [2**24, 0])  # the reference's float32 sums, and its float64 counts
def test_group_and_rest_resamples_equal_the_previous_implementation_bit_for_bit(monkeypatch, exact_below):
    """tests/subgroup_reference.py (one sparse product per group) against today's compiled pass (group_ranks.py): groups
    that overlap and groups of one attribute, ties between and within classes, every image tied, a label of one class,
    left-out entries, integer mask weights; 150 resamples (a block of 128, then 22) in passes of COLUMNS."""
    from subgroup_reference import reference_group_resample_aucs
    from test_bootstrap import awkward_labels

    from cxrdist.evaluation.scoring.subgroup_bootstrap import draws, group_resample_aucs

    import subgroup_reference

    monkeypatch.setattr(subgroup_reference, "FLOAT32_EXACT", exact_below)
    targets, scores, mask, patients = awkward_labels(n=1500, seed=11)
    rng = np.random.default_rng(11)
    # Positives on 11 levels, negatives spread but absent between some of them and tied with one (0.5): positive levels
    # with no negative between them, next to a tied level; then the same with the classes' roles swapped.
    positive = rng.random(len(patients)) < 0.3
    spread = np.where(rng.random(len(patients)) < 0.5, rng.uniform(0, 0.3, len(patients)), rng.uniform(0.8, 1, len(patients)))
    level = np.where(positive, np.round(rng.random(len(patients)), 1), np.where(rng.random(len(patients)) < 0.1, 0.5, spread))
    targets = np.c_[targets, positive, ~positive].astype(float)
    scores, mask = np.c_[scores, level, level], np.c_[mask, rng.random((len(patients), 2)) < 0.9].astype(float)
    site = {p: rng.integers(0, 4) for p in sorted(set(patients))}
    view = rng.integers(0, 3, len(patients))
    members = np.array([[site[p] == k for p in patients] for k in range(3)] + [view == k for k in range(3)] + [rng.random(len(patients)) < 0.2])
    patient_no, n_patients, blocks = draws(patients, 150, seed=4)
    for weights in (mask, mask * rng.integers(1, 4, mask.shape)):
        got = group_resample_aucs(targets, scores, weights, members, patient_no, n_patients, blocks)[:2]
        expected = reference_group_resample_aucs(targets, scores, weights, members, patient_no, n_patients, blocks)
        for new, old in zip(got, expected):
            assert np.array_equal(new, old, equal_nan=True)
        assert np.isfinite(got[1]).mean() > 0.5  # most groups and labels have an AUC


def test_group_tallies_equal_a_count_per_group_and_patient():
    """group_tallies' cell sums and (patient, group) pairs against a per-group bincount and Python sets: three groupings
    (one with an empty group) over patients with images in several groups, several boolean columns at once."""
    from types import SimpleNamespace

    from cxrdist.evaluation.scoring.group_tallies import group_sums, patients_by_group, tallies

    rng = np.random.default_rng(3)
    n, n_patients = 600, 90
    patients = rng.integers(0, n_patients, n)
    groupings = [SimpleNamespace(name=name, groups=[str(k) for k in range(k)], of_image=rng.integers(0, used, n))
                 for name, k, used in (("a", 3, 3), ("b", 5, 4), ("c", 2, 2))]
    columns = rng.random((n, 4)) < [0.5, 0.1, 0.02, 0.0]
    t = tallies(groupings, patients, n_patients)
    for g in groupings:
        k = len(g.groups)
        expected = np.stack([np.bincount(g.of_image, weights=c, minlength=k) for c in columns.T], axis=1)
        assert np.array_equal(group_sums(t, g.name, k, t.cells @ columns.astype(np.float64)), expected)
        inside, outside = patients_by_group(t, g.name, k, columns)
        for j in range(columns.shape[1]):
            seen = {(p, grp) for p, grp, c in zip(patients, g.of_image, columns[:, j]) if c}
            for i in range(k):
                assert inside[i, j] == len({p for p, grp in seen if grp == i})
                assert outside[i, j] == len({p for p, grp in seen if grp != i})


def test_the_evaluation_interval_taken_from_the_audit_pass_is_the_bootstrap_s():
    """`cxrdist evaluate` takes its overall interval from the audit's pass (one pass, not two): the same intervals."""
    from cxrdist.evaluation.clinical.subgroup_rates import audit_aucs

    targets, scores, mask, patients, attributes = cohort(n_patients=300, seed=5)
    audit = audit_aucs(LABELS, targets, scores, mask, patients, attributes, SPECS, None, resamples=120, seed=3)
    assert np.array_equal(audit.whole, bootstrap.bootstrap_aucs(targets, scores, mask, patients, 120, seed=3), equal_nan=True)
    reused = bootstrap.auc_intervals(targets, scores, LABELS, mask, patients, 120, seed=3, resampled=audit.whole)
    assert reused == bootstrap.auc_intervals(targets, scores, LABELS, mask, patients, 120, seed=3)
    assert reused["macro_auc"] is not None
