"""Partial or optimistic inputs are said on the console (stderr, one line each), not only in files:
folds missing from an ensemble, a split that is training data for some fold, an export without thresholds."""

from __future__ import annotations

import json

from cxrdist.cli import main
from cxrdist.evaluation.prediction.coverage import coverage_note, missing_folds


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": warning: " in line]


def test_missing_folds_names_each_fold_and_why(tmp_path):
    (tmp_path / "fold-0" / "best").mkdir(parents=True)
    (tmp_path / "fold-1").mkdir()  # started, never finished a best model
    (tmp_path / "ensemble").mkdir()  # not a fold
    assert missing_folds(tmp_path, ["fold-0"], 3) == {"fold-1": "no finished best model", "fold-2": "never trained: no directory"}
    assert missing_folds(tmp_path, ["fold-0", "fold-1"], 2) == {}
    assert missing_folds(tmp_path, ["fold-0"], None) == {"fold-1": "no finished best model"}
    note = coverage_note(tmp_path, ["fold-0"], 3)
    assert note == "ensemble of 1 of 3 folds (fold-0); missing: fold-1 (no finished best model), fold-2 (never trained: no directory)"
    assert coverage_note(tmp_path, ["fold-0", "fold-1", "fold-2"], 3) is None


def test_evaluate_says_the_missing_fold_and_the_optimistic_split(trained_experiment, tmp_path, capsys):
    # trained_experiment: folds 0 and 1 trained, the dataset has 3
    code = main(["evaluate", "--runs", str(trained_experiment), "--split", "fold-0", "--no-tta", "--out", str(tmp_path),
                 "--batch-size", "64", "--workers", "0", "--resamples", "20"])
    assert code == 0
    lines = warnings_of(capsys.readouterr().err)
    assert len(lines) == 2, lines
    assert lines[0] == ("cxrdist evaluate: warning: ensemble of 2 of 3 folds (fold-0, fold-1); missing: fold-2 (never trained: no directory)")
    assert lines[1].startswith("cxrdist evaluate: warning: fold-0 is training data for fold-1") and "optimistic" in lines[1]
    notes = json.loads((tmp_path / "metrics.json").read_text())["notes"]
    assert [f"cxrdist evaluate: warning: {n}" for n in notes] == lines


def test_one_fold_chosen_on_purpose_is_not_a_partial_ensemble(trained_experiment, tmp_path, capsys):
    code = main(["evaluate", "--runs", str(trained_experiment / "fold-1"), "--split", "test", "--no-tta", "--out", str(tmp_path),
                 "--batch-size", "64", "--workers", "0", "--resamples", "20"])
    assert code == 0 and warnings_of(capsys.readouterr().err) == []


def test_export_without_evaluation_says_there_are_no_thresholds(trained_experiment, tmp_path, capsys):
    out = tmp_path / "model.pt"
    code = main(["export", "--runs", str(trained_experiment), "--format", "torchscript", "--out", str(out),
                 "--metrics", str(tmp_path / "absent.json")])
    assert code == 0
    lines = warnings_of(capsys.readouterr().err)
    assert len(lines) == 2, lines
    assert "ensemble of 2 of 3 folds" in lines[0] and "fold-2 (never trained" in lines[0]
    assert "run `cxrdist evaluate` first" in lines[1] and "thresholds are null" in lines[1]
    sidecar = json.loads((tmp_path / "model.pt.json").read_text())
    assert sidecar["thresholds"] is None and any("ensemble of 2 of 3 folds" in n for n in sidecar["notes"])
