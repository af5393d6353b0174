"""Operating points and calibration in `cxrdist evaluate`'s metrics.json, from the written files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxrdist.evaluation.clinical.calibration import calibration_summary, fit_platts, fit_temperatures
from cxrdist.evaluation.clinical.operating_points import choose_thresholds, rates


def val_predictions(path, labels):
    """(targets, probabilities, mask) as training wrote them (blank target = left out): the oracle for the out-of-fold set,
    which evaluate derives from the shards' raw labels instead."""
    table = pd.read_csv(path)
    raw_targets = table[[f"target_{label}" for label in labels]].to_numpy(dtype=np.float64)
    probs = table[[f"prob_{label}" for label in labels]].to_numpy(dtype=np.float64)
    return np.nan_to_num(raw_targets), probs, (~np.isnan(raw_targets)).astype(np.float64)


def test_thresholds_come_from_the_out_of_fold_predictions_and_apply_to_the_test_split(evaluated_experiment):
    runs, metrics = evaluated_experiment
    labels = metrics["labels"]
    on_disk = json.loads((runs / "ensemble" / "metrics.json").read_text())
    assert on_disk["operating_points"] == metrics["operating_points"]
    parts = [val_predictions(runs / name / "best" / "val_predictions.csv", labels) for name in ("fold-0", "fold-1")]
    oof = [np.concatenate([p[i] for p in parts]) for i in range(3)]
    assert metrics["operating_points"]["out_of_fold_images"] == len(oof[0])
    chosen = choose_thresholds(*oof, labels)

    table = pd.read_csv(runs / "ensemble" / "predictions.csv")
    checked = 0
    for label in labels:
        known = table[f"target_{label}"].notna().to_numpy()
        y, s = table[f"target_{label}"].to_numpy()[known], table[f"prob_{label}"].to_numpy()[known]
        for name, point in metrics["operating_points"]["per_label"][label].items():
            assert point["threshold"] == (pytest.approx(chosen[label][name]) if chosen[label][name] is not None else None)
            if point["sensitivity"] is None:
                continue
            sens, spec = rates(y, s, point["threshold"])
            assert (point["sensitivity"], point["specificity"]) == (pytest.approx(sens[0]), pytest.approx(spec[0]))
            checked += 1
    assert checked >= 4 * 5  # at least five labels have both classes in the test split and out of fold

    temperatures = fit_temperatures(*oof, labels)
    assert metrics["calibration"]["temperature"] == pytest.approx(temperatures)
    platt = fit_platts(*oof, labels)
    assert set(metrics["calibration"]["platt"]) == set(labels)
    for label in labels:
        assert metrics["calibration"]["platt"][label] == (None if platt[label] is None else pytest.approx(platt[label]))
        assert platt[label] is None or platt[label][0] >= 0  # never reverses a label's ranking
    probs = table[[f"prob_{label}" for label in labels]].to_numpy()
    targets = np.nan_to_num(table[[f"target_{label}" for label in labels]].to_numpy())
    mask = table[[f"target_{label}" for label in labels]].notna().to_numpy()
    expected = calibration_summary(targets, probs, mask, labels)
    assert metrics["calibration"]["ensemble"]["macro_ece"] == pytest.approx(expected["macro_ece"], abs=1e-9)
    assert metrics["calibration"]["ensemble"]["macro_brier"] == pytest.approx(expected["macro_brier"], abs=1e-9)


def test_report_shows_operating_points_calibration_and_saliency(evaluated_experiment, tmp_path):
    from PIL import Image

    from cxrdist.evaluation.report.report import run_report

    runs, metrics = evaluated_experiment
    page = run_report(runs, tmp_path / "report").read_text()
    assert ">Operating points<" in page and ">Calibration<" in page and ">Where the model looked<" in page
    label = next(label for label, p in metrics["operating_points"]["per_label"].items() if p["sens@spec90"]["sensitivity"] is not None)
    assert f"{100 * metrics['operating_points']['per_label'][label]['sens@spec90']['sensitivity']:.1f}%" in page
    for name in ("reliability.png", "saliency.png"):
        assert f'src="figures/{name}"' in page
        with Image.open(tmp_path / "report" / "figures" / name) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_reliability_diagrams_show_each_bins_image_count():
    from cxrdist.evaluation.clinical.calibration import label_calibration
    from cxrdist.evaluation.report.clinical import reliability_figure

    rng = np.random.default_rng(4)
    scores = {"Consolidation": rng.beta(0.6, 3.0, 700), "Pneumonia": rng.random(90), "Edema": rng.beta(4.0, 1.0, 300)}
    per_label = {label: label_calibration(rng.random(len(s)) < s, s) for label, s in scores.items()}
    fig = reliability_figure(per_label, None, None, columns=2)
    count_axes = [ax for ax in fig.axes if ax.patches]  # reading order: one under each diagram
    assert len(count_axes) == len(scores)
    for ax, s in zip(count_axes, scores.values()):
        counts, edges = np.histogram(s, bins=10, range=(0.0, 1.0))
        drawn = sorted((round(bar.get_x(), 9), bar.get_height()) for bar in ax.patches)
        assert drawn == [(round(edges[b], 9), counts[b]) for b in np.flatnonzero(counts)]
        assert [t.get_text() for t in ax.texts] == [str(n) for n in counts[counts > 0]]


def test_each_saliency_panel_gets_its_own_image_when_the_positives_allow():
    from cxrdist.evaluation.report.saliency_grid import saliency_examples

    LABELS = ["Consolidation", "Pneumonia", "Edema"]
    # Consolidation and Pneumonia co-occur: image 0 is the most probable for both, image 1 is positive for both too.
    probs = np.array([[0.95, 0.90, 0.1], [0.70, 0.60, 0.2], [0.10, 0.20, 0.8], [0.05, 0.10, 0.3]])
    targets = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, np.nan]])
    examples = saliency_examples(probs, targets, LABELS, 3)
    assert [j for _, j, _ in examples] == [0, 1, 2]  # most confident label first
    assert sorted(row for row, _, _ in examples[:2]) == [0, 1] and examples[2][0] == 2
    assert all(shared is None for _, _, shared in examples)
    # Taking each label's most probable positive in turn would give label 0 image 0, label 1's only positive.
    targets = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    assert saliency_examples(probs, targets, LABELS, 2) == [(1, 0, None), (0, 1, None)]
    # One positive image for both: allowed, and said (the less probable label shows the image of the other).
    targets = np.array([[1, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]])
    assert saliency_examples(probs, targets, LABELS, 2) == [(0, 0, None), (0, 1, 0)]
    # No targets, or a label without a positive: its most probable images, still one per label.
    for t in (None, np.zeros_like(targets)):
        examples = saliency_examples(probs, t, LABELS, 3)
        assert len({row for row, _, _ in examples}) == 3 and all(shared is None for _, _, shared in examples)
