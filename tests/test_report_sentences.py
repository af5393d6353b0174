"""#32 item 1: what the report, the console and `predict` say about a result is computed from that result: calibration
notes name the cause they measured, the header says whether the refinement did anything, intervals from few positives are
flagged, a Grad-CAM panel says what it shows and a map outside the chest is flagged, No Finding gets no map, and `predict`
writes each finding's operating-point decision beside its probability."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from cxrdist.cli import main
from cxrdist.evaluation.clinical.calibration import fit_temperature, sigmoid
from cxrdist.evaluation.clinical.calibration_causes import label_stats, temperature_cause
from cxrdist.evaluation.clinical.clinical_metrics import clinical_metrics
from cxrdist.evaluation.prediction.saliency import CHEST_REGION, MASS_OUTSIDE, PEAK_OUTSIDE, chest_flag, chest_fraction, findings_to_explain
from cxrdist.evaluation.report.clinical import calibration_notes
from cxrdist.evaluation.report.saliency_grid import coverage_sentence, panel_notes, saliency_examples
from cxrdist.evaluation.scoring.bootstrap import FEW_CASES


def miscalibrated(seed: int = 0, n: int = 3000) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{label: (targets, probabilities)}, one per way a temperature fit ends at a bound of its range."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(n)
    rare = (rng.random(n) < 0.08).astype(float)
    half = (rng.random(n) < 0.5).astype(float)
    few = np.zeros(n)
    few[:4] = 1
    return {
        # ranks the cases well, but every probability sits above 0.5 at 8% prevalence (Asymmetric Loss's absent findings)
        "Shifted": (rare, sigmoid(0.25 + 0.6 * rare + 0.15 * noise)),
        # knows nothing: random probabilities around the prevalence
        "Noise": (half, sigmoid(2.0 * noise)),
        # ranks perfectly, but all probabilities within 0.001 of 0.5
        "Narrow": (half, sigmoid(0.002 * (2 * half - 1) + 0.0002 * noise)),
        # 4 positives (with probabilities above 0.5, which would be a shift with more of them)
        "Rare": (few, sigmoid(0.5 + 0.3 * noise)),
    }


def test_a_temperature_at_its_bound_is_explained_by_the_cause_measured_out_of_fold():
    cases = miscalibrated()
    causes = {label: temperature_cause(label_stats(y, p), fit_temperature(y, p)) for label, (y, p) in cases.items()}
    assert {label: c[0] for label, c in causes.items()} == {"Shifted": "shift", "Noise": "spread", "Narrow": "spread", "Rare": "too few positives"}
    y, p = cases["Shifted"]
    assert f"mean out-of-fold probability is {p.mean():.2f} at {100 * y.mean():.1f}% prevalence" in causes["Shifted"][1]
    assert "barely rank" not in causes["Shifted"][1]  # its out-of-fold AUC is high: the old note's cause was wrong
    assert "barely rank" in causes["Noise"][1] and "too narrow" in causes["Narrow"][1]
    assert f"{int(cases['Rare'][0].sum())} among the {len(cases['Rare'][0]):,} out-of-fold images" in causes["Rare"][1]
    assert temperature_cause(label_stats(y, p), 1.3) is None  # not at a bound: nothing to explain


def test_the_report_note_says_the_cause_from_metrics_json():
    cases = miscalibrated(1)
    labels = list(cases)
    targets = np.stack([y for y, _ in cases.values()], axis=1)
    probs = np.stack([p for _, p in cases.values()], axis=1)
    mask = np.ones_like(targets)
    result = clinical_metrics((targets, probs, mask), targets, probs, mask, labels, np.arange(len(targets)), resamples=20)
    calibration = json.loads(json.dumps(result["calibration"]))  # as read back from metrics.json
    notes = calibration_notes(calibration)
    shifted = re.search(r"<div class=\"note\">Shifted: (.*?)</div>", notes).group(1)
    stats = calibration["out_of_fold_labels"]["Shifted"]
    assert shifted.startswith("shift:") and f"{stats['mean_probability']:.2f} at {100 * stats['prevalence']:.1f}% prevalence" in shifted
    assert "Noise: spread" in notes and "Narrow: spread" in notes and "Rare: too few positives" in notes
    del calibration["out_of_fold_labels"]  # a metrics.json from before: the bound is said, no cause is claimed
    assert "at the bound" in calibration_notes(calibration) and "shift" not in calibration_notes(calibration)


def test_the_header_says_whether_the_refinement_did_anything(trained_experiment):
    from cxrdist.evaluation.report.report import find_fold_runs, refinement_phrase

    folds = find_fold_runs(trained_experiment)
    for fold in folds:
        fold.coupling = np.zeros((fold.card.num_labels, fold.card.num_labels), np.float32)
    assert refinement_phrase(folds).startswith("label-graph refinement on but inert: A is exactly zero in every fold")
    folds[1].coupling[2, 3] = 0.5
    assert refinement_phrase(folds) == "label-graph refinement on; inert (A exactly zero) in fold-0"
    folds[0].coupling[3, 2] = 0.5
    assert refinement_phrase(folds) == "label-graph refinement on and active in every fold"


def section_html(page: str, anchor: str) -> str:
    return page[page.index(f'<section id="{anchor}">'):].split("</section>", 1)[0]


def test_intervals_from_few_positives_are_flagged(evaluated_experiment, tmp_path):
    from cxrdist.evaluation.report.report import run_report

    runs, metrics = evaluated_experiment
    page = run_report(runs, tmp_path / "report").read_text()
    predictions = pd.read_csv(runs / "ensemble" / "predictions.csv")
    auc = section_html(page, "auc")
    flagged = set()
    for label in metrics["labels"]:
        row = re.search(rf'<tr><td class="l">{re.escape(label)}</td>(.*?)</tr>', auc).group(1)
        if "†" in row:
            flagged.add(label)
    cases = {label: min((predictions[f"target_{label}"] == 1).sum(), (predictions[f"target_{label}"] == 0).sum()) for label in metrics["labels"]}
    expected = {label for label, n in cases.items() if 0 < n < FEW_CASES}
    assert expected and flagged == expected  # this small test split has findings with few positives
    assert f"fewer than {FEW_CASES} positives or negatives" in auc


def test_a_map_mostly_outside_the_chest_region_is_flagged():
    u0, u1, v0, v1 = CHEST_REGION
    uniform = np.ones((100, 100))
    assert chest_fraction(uniform) == pytest.approx((u1 - u0) * (v1 - v0), abs=0.01) and chest_flag(uniform) == ""
    corner = np.zeros((100, 100))
    corner[:12, 86:] = 1.0  # Lung Opacity's map in the issue peaked at (0.945, 0.008)
    inside = sum(1 for r in range(12) for c in range(86, 100) if u0 <= (c + 0.5) / 100 <= u1 and v0 <= (r + 0.5) / 100 <= v1)
    assert chest_fraction(corner) == pytest.approx(inside / (12 * 14)) and inside / (12 * 14) < 0.5 and chest_flag(corner) == MASS_OUTSIDE
    centre = np.zeros((100, 100))
    centre[30:60, 30:70] = 1.0
    assert chest_fraction(centre) == 1.0 and chest_flag(centre) == ""
    edge_peak = centre * 0.5
    edge_peak[0, 50] = 1.0  # most of the mass inside, the hottest point on the top edge
    assert chest_flag(edge_peak) == PEAK_OUTSIDE


def test_no_finding_gets_no_map():
    labels = ["No Finding", "Cardiomegaly", "Edema"]
    probs = np.array([[0.9, 0.7, 0.6], [0.8, 0.2, 0.9]])
    assert findings_to_explain(probs, 0.5, 3, labels) == [[1, 2], [2]]
    assert {j for _, j, _ in saliency_examples(probs, None, labels, 16)} == {1, 2}
    assert "covers 2 of the 2 findings" in coverage_sentence([(0, 1, None), (1, 2, None)], labels, "test")
    assert "No Finding has no map" in coverage_sentence([(0, 1, None), (1, 2, None)], labels, "test")


def test_a_panel_says_what_it_shows():
    labels = ["Cardiomegaly", "Pneumothorax", "Edema"]
    probs = np.array([[0.9, 0.6, 0.2], [0.3, 0.7, 0.8], [0.1, 0.2, 0.3]])
    targets = np.array([[1, 0, 0], [0, 0, 1], [0, 0, np.nan]])  # no Pneumothorax positive in this split
    examples = saliency_examples(probs, targets, labels, 2)
    assert [labels[j] for _, j, _ in examples] == ["Cardiomegaly", "Edema"]  # the grid's cap: 2 of 3
    sentence = coverage_sentence(examples, labels, "test")
    assert "covers 2 of the 3 findings" in sentence and "not shown: Pneumothorax" in sentence
    examples = saliency_examples(probs, targets, labels, 3)
    maps = [np.ones((8, 8))] * len(examples)
    notes = panel_notes(examples, labels, targets, maps, [""] * len(examples), "test")
    row = next(row for row, j, _ in examples if labels[j] == "Pneumothorax")
    assert "Pneumothorax: no image of the test split where it is present (0 positives)" in notes
    assert f"where it is {'absent' if targets[row, 1] == 0 else 'not scored'}" in notes


def test_predict_writes_the_decision_beside_each_probability(evaluated_experiment, synth_shards, tmp_path, capsys):
    runs, metrics = evaluated_experiment
    images = sorted((synth_shards.parent / "raw" / "images").rglob("*.png"))[:6]
    out = tmp_path / "preds.csv"
    assert main(["predict", "--runs", str(runs), "--images", *map(str, images), "--out", str(out), "--workers", "0",
                 "--operating-point", "spec@sens90"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    labels = metrics["labels"]
    assert list(table.columns) == ["path", "operating_point"] + [c for label in labels for c in (f"prob_{label}", f"call_{label}")]
    assert set(table["operating_point"]) == {"spec@sens90"}
    for label in labels:
        threshold = metrics["operating_points"]["per_label"][label]["spec@sens90"]["threshold"]
        expected = [] if threshold is None else np.where(table[f"prob_{label}"] >= threshold, "positive", "negative").tolist()
        assert table[f"call_{label}"].tolist() == (expected or [""] * len(table))
    assert "spec@sens90" in capsys.readouterr().out
    # one fold's model: the ensemble's thresholds are not its own, so no decisions, and it says why
    assert main(["predict", "--runs", str(runs / "fold-0"), "--images", str(images[0]), "--out", str(tmp_path / "one.csv"),
                 "--workers", "0"]) == 0
    assert not any(c.startswith("call_") for c in pd.read_csv(tmp_path / "one.csv").columns)
    assert "probabilities only, no operating-point decisions" in capsys.readouterr().err
