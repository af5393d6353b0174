"""Operating points and calibration against scikit-learn and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_curve

from cxrdist.evaluation.clinical.calibration import (
    apply_platt,
    apply_temperature,
    calibration_summary,
    expected_calibration_error,
    MAX_PLATT_SLOPE,
    fit_platt,
    fit_temperature,
    logit,
    platt_note,
    reliability_bins,
)
from cxrdist.evaluation.clinical.operating_points import (
    applied_operating_points,
    choose_thresholds,
    operating_points,
    rates,
    threshold_for_sensitivity,
    threshold_for_specificity,
)


def test_thresholds_by_hand():
    # scores of 4 negatives and 4 positives; a threshold t calls score >= t positive
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.9])
    # specificity >= 0.75 allows one false positive: lowest such t is 0.4 (calls 0.6 and 0.4,0.5,0.7,0.9): sens 1.0
    assert threshold_for_specificity(y, s, 0.75) == 0.4
    assert rates(y, s, 0.4) == (pytest.approx([1.0]), pytest.approx([0.75]))
    # specificity 1.0: t = 0.7 (above the 0.6 negative): sens 0.5
    assert threshold_for_specificity(y, s, 1.0) == 0.7
    # sensitivity >= 0.75: highest t is 0.5 (0.5, 0.7, 0.9 called; plus the 0.6 negative): spec 0.75
    assert threshold_for_sensitivity(y, s, 0.75) == 0.5
    assert rates(y, s, 0.5) == (pytest.approx([0.75]), pytest.approx([0.75]))
    assert threshold_for_sensitivity(np.ones(3), np.ones(3), 0.9) is None


def test_thresholds_agree_with_roc_curve():
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.3
    s = np.round(rng.normal(size=500) + y, 2)  # with ties
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)  # keep every point: collinear ones can be the best
    for level in (0.9, 0.95):
        t = threshold_for_specificity(y, s, level)
        sens, spec = rates(y, s, t)
        assert spec[0] >= level
        assert sens[0] == pytest.approx(tpr[fpr <= 1 - level].max())  # best sensitivity at that specificity
        t = threshold_for_sensitivity(y, s, level)
        sens, spec = rates(y, s, t)
        assert sens[0] >= level
        assert spec[0] == pytest.approx(1 - fpr[tpr >= level].min())


def test_threshold_is_chosen_on_one_set_and_applied_to_another():
    rng = np.random.default_rng(1)
    n = 400
    y_oof, y_test = rng.random((n, 2)) < 0.4, rng.random((n, 2)) < 0.4
    s_oof, s_test = rng.normal(size=(n, 2)) + y_oof, rng.normal(size=(n, 2)) + 2 * y_test + 0.5  # test shifted
    labels = ["a", "b"]
    mask = np.ones((n, 2))
    mask[:50, 1] = 0  # label b: the first 50 images are ignored
    chosen = choose_thresholds(y_oof, s_oof, mask, labels)
    assert chosen["a"]["sens@spec90"] == threshold_for_specificity(y_oof[:, 0], s_oof[:, 0], 0.9)
    assert chosen["b"]["spec@sens95"] == threshold_for_sensitivity(y_oof[50:, 1], s_oof[50:, 1], 0.95)
    groups = np.repeat(np.arange(n // 2), 2).astype(str)  # two images per patient
    result = operating_points((y_oof, s_oof, mask), (y_test, s_test, mask), labels, groups, n_resamples=200)
    point = result["per_label"]["b"]["sens@spec90"]
    sens, spec = rates(y_test[50:, 1], s_test[50:, 1], chosen["b"]["sens@spec90"])
    assert point["threshold"] == chosen["b"]["sens@spec90"]
    assert (point["sensitivity"], point["specificity"]) == (pytest.approx(sens[0]), pytest.approx(spec[0]))
    assert point["sensitivity_interval"][0] <= point["sensitivity"] <= point["sensitivity_interval"][1]
    assert result["out_of_fold"]["a"]["sens@spec90"]["specificity"] >= 0.9  # met by construction where chosen
    assert result["out_of_fold"]["a"]["sens@spec90"]["sensitivity_interval"] is None


def test_bootstrap_rates_resample_patients():
    y = np.array([1, 1, 0, 0])
    s = np.array([0.9, 0.1, 0.2, 0.8])
    groups = ["p", "p", "q", "q"]  # every resample takes each patient's images together
    out = applied_operating_points({"x": {"sens@spec90": 0.5}}, y[:, None], s[:, None], None, ["x"], groups, n_resamples=50)
    point = out["x"]["sens@spec90"]
    assert (point["sensitivity"], point["specificity"]) == (0.5, 0.5)
    assert point["sensitivity_interval"] == [0.5, 0.5]  # a resample with patient p at all always has sensitivity 1/2


def test_reliability_and_ece_against_sklearn():
    rng = np.random.default_rng(2)
    p = rng.random(1000)
    y = rng.random(1000) < p**2
    table = reliability_bins(y, p, bins=10)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(table["observed"], observed)
    np.testing.assert_allclose(table["predicted"], predicted)
    # by hand: two bins, (0.1, 0.3) with 1 of 2 positive and (0.9) with 1 of 1
    assert expected_calibration_error(np.array([0, 1, 1]), np.array([0.1, 0.3, 0.9]), bins=2) == pytest.approx((2 * 0.3 + 1 * 0.1) / 3)
    summary = calibration_summary(y[:, None], p[:, None], None, ["x"])
    assert summary["per_label"]["x"]["brier"] == pytest.approx(brier_score_loss(y, p))


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(3)
    z = rng.normal(scale=2.0, size=20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-z))  # calibrated at T=1
    overconfident = 1 / (1 + np.exp(-3 * z))  # logits 3x too large
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.05)
    inside = np.abs(3 * z) < 12  # logit() clips probabilities to [1e-7, 1 - 1e-7]
    np.testing.assert_allclose(logit(apply_temperature(overconfident[:, None], [t]))[inside, 0], 3 * z[inside] / t, atol=1e-6)
    assert expected_calibration_error(y, apply_temperature(overconfident[:, None], [t])[:, 0]) < expected_calibration_error(y, overconfident)


def test_platt_scaling_recovers_a_known_scale_and_shift_that_a_temperature_cannot():
    """Probabilities whose logits are 2x too large AND shifted down by 1.5 (what ASL's easy-negative
    down-weighting does): Platt recovers a = 0.5, b = 0.75; a temperature alone leaves them miscalibrated."""
    rng = np.random.default_rng(4)
    z = rng.normal(scale=2.0, size=40000)
    y = rng.random(40000) < 1 / (1 + np.exp(-z))  # calibrated on z
    shifted = 1 / (1 + np.exp(-(2 * z - 1.5)))
    a, b = fit_platt(y, shifted)
    assert (a, b) == (pytest.approx(0.5, rel=0.05), pytest.approx(0.75, abs=0.08))
    platt = apply_platt(shifted[:, None], [(a, b)])[:, 0]
    temperature = apply_temperature(shifted[:, None], [fit_temperature(y, shifted)])[:, 0]
    assert expected_calibration_error(y, platt) < 0.02 < expected_calibration_error(y, temperature)
    assert fit_platt(np.zeros(10), shifted[:10]) is None
    # Scores that rank the wrong way out of fold: the fit may not reverse them; it falls back to the positive rate.
    assert fit_platt(~y, shifted) == (0.0, pytest.approx(np.log(np.mean(~y) / np.mean(y))))
    np.testing.assert_array_equal(apply_platt(shifted[:5, None], [None])[:, 0], apply_platt(shifted[:5, None], [(1.0, 0.0)])[:, 0])


def test_platt_on_separated_scores_is_the_capped_slope_with_its_best_intercept_and_says_so():
    # two images, logits -1 (negative) and +1 (positive): separated, so no maximum-likelihood fit exists; by symmetry
    # the best intercept for any slope is 0, so the bounded fit is (MAX_PLATT_SLOPE, 0)
    y, p = np.array([0.0, 1.0]), 1 / (1 + np.exp(-np.array([-1.0, 1.0])))
    a, b = fit_platt(y, p)
    assert a == MAX_PLATT_SLOPE and b == pytest.approx(0.0, abs=1e-6)
    assert "separate the classes" in platt_note(y, p) and f"capped at {MAX_PLATT_SLOPE:g}" in platt_note(y, p)
    # logits 0, 1 (negatives) and 2 (positive): separated; the best b for a = 10, against a brute-force grid of the log loss
    z = np.array([0.0, 1.0, 2.0])
    y = np.array([0.0, 0.0, 1.0])
    a, b = fit_platt(y, 1 / (1 + np.exp(-z)))
    grid = np.linspace(-30, 0, 300001)
    losses = np.logaddexp(0, 10 * z[0] + grid) + np.logaddexp(0, 10 * z[1] + grid) + np.logaddexp(0, -(10 * z[2] + grid))
    assert a == MAX_PLATT_SLOPE and b == pytest.approx(grid[np.argmin(losses)], abs=1e-3)


def test_platt_on_overlapping_scores_is_the_free_fit_without_a_note():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.4
    p = 1 / (1 + np.exp(-(rng.normal(size=400) + y)))
    assert fit_platt(y, p)[0] < MAX_PLATT_SLOPE and platt_note(y, p) is None


def test_an_unreachable_operating_point_says_so_in_words():
    # 3 negatives, 2 positives; the top score is a negative: any finite threshold calls it, a false-positive rate of
    # 1/3 > 0.10, so specificity 90% is reachable only by calling no image positive
    y = np.array([0, 1, 1, 0, 0])[:, None]
    s = np.array([0.9, 0.8, 0.7, 0.2, 0.1])[:, None]
    thresholds = choose_thresholds(y, s, None, ["L"], levels=(0.9,))
    applied = applied_operating_points(thresholds, y, s, None, ["L"], np.arange(5), n_resamples=10)["L"]
    unreachable = applied["sens@spec90"]
    assert unreachable["reachable"] is False and unreachable["threshold"] is None and unreachable["sensitivity"] is None
    assert unreachable["note"].startswith("not reachable: ") and "specificity >= 90%" in unreachable["note"]
    reached = applied["spec@sens90"]  # highest threshold with sensitivity >= 0.9 is 0.7: it also calls the 0.9 negative
    assert reached["threshold"] == 0.7 and reached["specificity"] == pytest.approx(2 / 3) and "reachable" not in reached


def test_metrics_and_report_say_when_a_point_is_not_reachable_and_a_platt_fit_was_capped(tmp_path):
    from cxrdist.evaluation.clinical.clinical_metrics import clinical_metrics
    from cxrdist.evaluation.report.clinical import clinical_section

    y = np.array([[0, 0], [1, 1], [1, 1], [0, 0], [0, 1]], dtype=np.float64)
    s = np.array([[0.9, 0.1], [0.8, 0.8], [0.7, 0.7], [0.2, 0.2], [0.1, 0.6]])  # label B: separated scores
    metrics = clinical_metrics((y, s, np.ones_like(y)), y, s, np.ones_like(y), ["A", "B"], np.arange(5), resamples=10)
    assert set(metrics["calibration"]["platt_notes"]) == {"B"}
    assert metrics["calibration"]["platt"]["B"][0] == MAX_PLATT_SLOPE
    assert metrics["operating_points"]["per_label"]["A"]["sens@spec90"]["reachable"] is False
    html = clinical_section({**metrics, "split": "test"}, tmp_path)
    assert "not reachable" in html and "A, sens@spec90: not reachable: " in html
    assert "Platt scaling, B: the out-of-fold scores separate the classes" in html
