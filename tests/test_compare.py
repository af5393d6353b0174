"""`cxrdist compare` and `cxrdist train --ablate refine`: the paired difference and its paired bootstrap
against a hand computation and sklearn, and the commands end to end on the session's trained runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxrdist.cli import main
from cxrdist.evaluation.scoring.bootstrap import patient_weights
from cxrdist.evaluation.scoring.compare import (
    ScoredPredictions, compare_tables, paired_difference, paired_resample_aucs, read_scored_predictions,
)
from cxrdist.evaluation.scoring.outputs import write_predictions_csv
from cxrdist.training.config import load_config

LABELS = ["A", "B"]
# 4 images of 3 patients (p1 has images 0 and 1); label B's image 3 is left out (uncertain): its written target must not count.
TARGETS = np.array([[1, 0], [0, 1], [1, 1], [0, 1]], dtype=float)
MASK = np.array([[1, 1], [1, 1], [1, 1], [1, 0]], dtype=float)
SCORES_A = np.array([[0.9, 0.1], [0.2, 0.6], [0.3, 0.05], [0.4, 0.99]])
SCORES_B = np.array([[0.9, 0.3], [0.2, 0.6], [0.5, 0.7], [0.4, 0.0]])
PATIENTS = ["p1", "p1", "p2", "p3"]
# Fixed resamples of the 3 patients, as image weights: {p1,p1,p3}, {p2,p3,p3}, {p1,p2,p3}, {p1,p2,p2}.
WEIGHTS = np.array([[2, 2, 0, 1], [0, 0, 1, 2], [1, 1, 1, 1], [1, 1, 2, 0]], dtype=float)


def test_paired_difference_matches_a_hand_computation():
    # Full set. Label A: positives {0.9, 0.3} vs negatives {0.2, 0.4}: arm A wins 3 of 4 pairs (0.75), arm B 4 of 4 (1.0).
    # Label B (image 3 left out): negative {0.1 / 0.3} vs positives {0.6, 0.05 / 0.6, 0.7}: A 1 of 2 (0.5), B 2 of 2 (1.0).
    result = paired_difference(TARGETS, MASK, SCORES_A, SCORES_B, LABELS, WEIGHTS, level=0.5)
    assert result["per_label"]["A"]["a"] == pytest.approx(0.75) and result["per_label"]["A"]["b"] == pytest.approx(1.0)
    assert result["per_label"]["B"]["a"] == pytest.approx(0.5) and result["per_label"]["B"]["b"] == pytest.approx(1.0)
    assert result["macro"]["a"] == pytest.approx(0.625) and result["macro"]["b"] == pytest.approx(1.0)
    assert result["macro"]["difference"] == pytest.approx(0.375)
    # Per resample, B - A. Label A: {p1,p1,p3}: both 1 -> 0; {p2,p3,p3}: 0.3<0.4 vs 0.5>0.4 -> 1; full -> 0.25; {p1,p2,p2}: both 1 -> 0.
    # Label B: 0; NaN (no negative); 0.5; 1 - 1/3 (A: 0.6>0.1 weight 1, 0.05<0.1 weight 2).
    # Macro (mean over labels scored in the resample): 0; 1; 0.375; 1 - (1 + 1/3)/2 = 1/3.
    auc_a, auc_b = paired_resample_aucs(TARGETS, MASK, SCORES_A, SCORES_B, WEIGHTS)
    np.testing.assert_allclose(auc_b - auc_a, [[0, 0], [1, np.nan], [0.25, 0.5], [0, 2 / 3]], atol=1e-12)
    # 25th / 75th percentiles (numpy's linear interpolation) of the sorted differences:
    # macro [0, 1/3, 0.375, 1] -> 0.75 * 1/3 = 0.25 and 0.375 + 0.25 * 0.625 = 0.53125
    assert result["macro"]["interval"] == pytest.approx([0.25, 0.53125])
    # label A [0, 0, 0.25, 1] -> 0 and 0.25 + 0.25 * 0.75; label B (NaN dropped) [0, 0.5, 2/3] -> 0.25 and 0.5 + 0.5 / 6
    assert result["per_label"]["A"]["interval"] == pytest.approx([0.0, 0.4375])
    assert result["per_label"]["B"]["interval"] == pytest.approx([0.25, 0.5 + 0.5 / 6])
    assert result["resamples"] == 4


def test_resampled_aucs_equal_sklearn_on_the_repeated_images():
    rng = np.random.default_rng(1)
    n, c = 60, 3
    targets = (rng.random((n, c)) < 0.4).astype(float)
    mask = (rng.random((n, c)) < 0.85).astype(float)
    scores_a, scores_b = rng.random((n, c)).round(1), rng.random((n, c))  # rounding makes ties
    weights = patient_weights([f"p{i // 3}" for i in range(n)], 5, seed=7)
    auc_a, auc_b = paired_resample_aucs(targets, mask, scores_a, scores_b, weights)
    for r in range(5):
        for j in range(c):
            repeat = (weights[r] * mask[:, j]).astype(int)
            y = np.repeat(targets[:, j], repeat)
            assert auc_a[r, j] == pytest.approx(roc_auc_score(y, np.repeat(scores_a[:, j], repeat)), abs=1e-12)
            assert auc_b[r, j] == pytest.approx(roc_auc_score(y, np.repeat(scores_b[:, j], repeat)), abs=1e-12)


def table(scores: np.ndarray, order: list[int] | None = None, patients: list[str] | None = PATIENTS) -> ScoredPredictions:
    order = order or list(range(len(scores)))
    return ScoredPredictions([f"k{i}" for i in order], None if patients is None else [patients[i] for i in order], list(LABELS),
                             scores[order], TARGETS[order], MASK[order])


def test_compare_tables_pairs_by_key_and_resamples_the_same_patients_for_both_arms():
    # B's rows in another order: they are paired by key, and the patients are drawn once for both arms.
    result = compare_tables(table(SCORES_A), table(SCORES_B, order=[3, 1, 0, 2]), "here", resamples=300, seed=5, level=0.9)
    expected = paired_difference(TARGETS, MASK, SCORES_A, SCORES_B, LABELS, patient_weights(PATIENTS, 300, 5), level=0.9)
    assert result["macro"] == expected["macro"] and result["per_label"] == expected["per_label"]
    assert result["patients"] == 3 and result["unit"] == "patient" and result["samples"] == 4
    # Identical arms: every paired resample differs by exactly 0 (an unpaired bootstrap would not).
    same = compare_tables(table(SCORES_A), table(SCORES_A), "here", resamples=100, seed=0, level=0.95)
    assert same["macro"]["interval"] == [0.0, 0.0] and same["per_label"]["B"]["interval"] == [0.0, 0.0]


@pytest.mark.parametrize("change, message", [
    (lambda t: ScoredPredictions(t.keys[:3], t.patients[:3], t.labels, t.probs[:3], t.targets[:3], t.mask[:3]), "different images"),
    (lambda t: ScoredPredictions(t.keys, t.patients, ["A", "C"], t.probs, t.targets, t.mask), "different labels"),
    (lambda t: ScoredPredictions(t.keys, t.patients, t.labels, t.probs, t.targets, np.ones_like(t.mask)), "different targets"),
])
def test_arms_that_do_not_match_are_refused(change, message):
    from cxrdist.errors import UserError

    with pytest.raises(UserError, match=message):
        compare_tables(table(SCORES_A), change(table(SCORES_B)), "fold-0", resamples=10, seed=0, level=0.95)


def test_prediction_tables_round_trip_with_left_out_targets(tmp_path):
    path = tmp_path / "p.csv"
    write_predictions_csv(path, {"key": ["k0", "k1", "k2", "k3"], "patient": PATIENTS}, SCORES_A, LABELS, TARGETS, MASK)
    read = read_scored_predictions(path)
    assert read.keys == ["k0", "k1", "k2", "k3"] and read.patients == PATIENTS and read.labels == LABELS
    np.testing.assert_array_equal(read.mask, MASK)
    np.testing.assert_array_equal(read.targets * read.mask, TARGETS * MASK)
    np.testing.assert_allclose(read.probs, SCORES_A, rtol=0, atol=0)


# ---------------------------------------------------------------- end to end on the session's trained runs


def perturb(csv: Path, seed: int) -> None:
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    for column in [c for c in frame.columns if c.startswith("prob_")]:
        frame[column] = [repr(float(np.clip(float(v) + rng.normal(0, 0.2), 0, 1))) for v in frame[column]]
    frame.to_csv(csv, index=False)


def sklearn_macro(csv: Path) -> float:
    frame = pd.read_csv(csv)
    aucs = []
    for label in [c[5:] for c in frame.columns if c.startswith("prob_")]:
        known = frame[f"target_{label}"].notna()
        if frame.loc[known, f"target_{label}"].nunique() == 2:
            aucs.append(roc_auc_score(frame.loc[known, f"target_{label}"], frame.loc[known, f"prob_{label}"]))
    return float(np.mean(aucs))


def test_compare_cli_on_two_arms(evaluated_experiment, tmp_path, capsys):
    runs_a, runs_b = tmp_path / "ens-a", tmp_path / "ens-b"
    for copy in (runs_a, runs_b):
        shutil.copytree(evaluated_experiment[0], copy, ignore=shutil.ignore_patterns("checkpoints", "report", "compare"))
    for k, csv in enumerate(sorted(runs_b.glob("fold-*/best/val_predictions.csv")) + [runs_b / "ensemble" / "predictions.csv"]):
        perturb(csv, seed=k)
    for runs in (runs_a, runs_b):  # a table from before the patient column: the patients come from the fold's shards
        csv = runs / "fold-0" / "best" / "val_predictions.csv"
        pd.read_csv(csv, dtype=str, keep_default_na=False).drop(columns="patient").to_csv(csv, index=False)

    assert main(["compare", str(runs_a), str(runs_b), "--resamples", "200"]) == 0
    stdout = capsys.readouterr().out
    result = json.loads((runs_b / "compare" / "compare.json").read_text())
    assert set(result["folds"]) == {"fold-0", "fold-1"} and result["test"] is not None
    for name in ("fold-0", "fold-1"):
        macro = result["folds"][name]["macro"]
        assert macro["a"] == pytest.approx(sklearn_macro(runs_a / name / "best" / "val_predictions.csv"), abs=1e-12)
        assert macro["b"] == pytest.approx(sklearn_macro(runs_b / name / "best" / "val_predictions.csv"), abs=1e-12)
        assert macro["difference"] == pytest.approx(macro["b"] - macro["a"])
        assert macro["interval"][0] <= macro["difference"] <= macro["interval"][1]
        assert result["folds"][name]["unit"] == "patient" and result["folds"][name]["patients"] < result["folds"][name]["samples"]
    test = result["test"]["macro"]
    assert test["a"] == pytest.approx(sklearn_macro(runs_a / "ensemble" / "predictions.csv"), abs=1e-12)
    assert test["b"] == pytest.approx(sklearn_macro(runs_b / "ensemble" / "predictions.csv"), abs=1e-12)
    improved = sum(result["folds"][n]["macro"]["difference"] > 0 for n in ("fold-0", "fold-1"))
    assert result["fold_summary"]["improved"] == improved
    assert f"B improved the macro AUC on {improved} of 2 folds" in stdout and "fold-0" in stdout and "test" in stdout

    from cxrdist.evaluation.report.report import run_report

    page = run_report(runs_b, out=tmp_path / "report").read_text()
    assert "Does the refinement help?" in page and f"B improved {improved} of 2 folds" in page


def test_compare_cli_refuses_mismatched_arms_in_one_line(trained_experiment, tmp_path, capsys):
    runs_b = tmp_path / "ens-b"
    shutil.copytree(trained_experiment, runs_b, ignore=shutil.ignore_patterns("checkpoints", "report", "compare", "ensemble"))
    csv = runs_b / "fold-1" / "best" / "val_predictions.csv"
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame.iloc[1:].to_csv(csv, index=False)
    assert main(["compare", str(trained_experiment), str(runs_b), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fold-1" in err and "different images" in err
    assert not (tmp_path / "cmp").exists()


# ---------------------------------------------------------------- cxrdist train --ablate refine


def test_train_ablate_refine_launches_both_arms_on_the_same_folds_and_seed(synth_shards, tmp_path, monkeypatch):
    from trainer_utils import DEMO_CONFIG, fast_overrides

    launched = []
    from cxrdist.training.launcher import launch

    monkeypatch.setattr(launch, "run_forwarding_signals", lambda cmd, env: launched.append(cmd) or 0)  # the one place a launcher starts
    overrides = fast_overrides(synth_shards, tmp_path, experiment="abl")
    assert main(["train", "--config", str(DEMO_CONFIG), "--fold", "all", "--ablate", "refine", *overrides]) == 0
    configs = []
    for cmd in launched:
        script = cmd.index("--config")
        fold = int(cmd[script + 3]) if cmd[script + 2] == "--fold" else None
        configs.append(load_config(Path(cmd[script + 1]), cmd[script + 4:], fold=fold))
    assert [(c.experiment, c.fold, c.model.refine.enabled) for c in configs] == [
        ("abl", 0, True), ("abl", 1, True), ("abl", 2, True), ("abl-norefine", 0, False), ("abl-norefine", 1, False), ("abl-norefine", 2, False)]
    assert len({(c.seed, c.data.shards, c.train.epochs, c.model.backbone) for c in configs}) == 1


def test_train_ablate_refine_refuses_a_config_without_refinement(tmp_path, capsys):
    from trainer_utils import DEMO_CONFIG

    code = main(["train", "--config", str(DEMO_CONFIG), "--ablate", "refine", "model.refine.enabled=false", f"output_dir={tmp_path}"])
    assert code == 2 and "already false" in capsys.readouterr().err
