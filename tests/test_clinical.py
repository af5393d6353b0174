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
