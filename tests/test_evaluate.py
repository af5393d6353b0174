"""`cxrdist evaluate` on a really trained two-fold run, and the patient bootstrap against sklearn."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxrdist.data.datasets import load_manifest
from cxrdist.data.shards import read_shard_samples
from cxrdist.data.stream import eval_loader
from cxrdist.errors import UserError
from cxrdist.evaluation.scoring.bootstrap import auc_intervals, patient_weights, weighted_auc
from cxrdist.evaluation.prediction.ensemble import FoldModel, run_evaluate, split_notes, stream_config
from cxrdist.evaluation.scoring.outputs import load_fold_probabilities
from cxrdist.evaluation.scoring.gathered import predict, probabilities
from cxrdist.model.card import ModelCard
from cxrdist.model.export import load_model
from trainer_utils import LAUNCH, cpu_env, explain, free_port

REPO = Path(__file__).resolve().parents[1]


def probs_table(path: Path, labels: list[str]) -> pd.DataFrame:
    table = pd.read_csv(path).set_index("key")
    return table[[f"prob_{label}" for label in labels]]


# ---------------------------------------------------------------- the ensemble on the test split


def test_metrics_equal_sklearn_on_the_written_predictions(evaluated_experiment, synth_shards):
    runs, metrics = evaluated_experiment
    out = runs / "ensemble"
    table = pd.read_csv(out / "predictions.csv")
    manifest = load_manifest(synth_shards)
    labels = manifest.labels
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert len(table) == metrics["num_samples"] == manifest.num_samples(["test"])

    # Every test sample once, with the path and patient of its shard json.
    meta = {key: info for shard in manifest.split("test").shards for key, _, info in read_shard_samples(synth_shards / shard.file)}
    assert sorted(table["key"]) == sorted(meta) and table["key"].is_unique
    assert all(table["path"] == [meta[k]["path"] for k in table["key"]])
    assert all(table["patient"] == [meta[k]["patient"] for k in table["key"]])

    aucs = {}
    for label in labels:
        known = table[f"target_{label}"].notna()
        y = table.loc[known, f"target_{label}"]
        aucs[label] = roc_auc_score(y, table.loc[known, f"prob_{label}"]) if y.nunique() == 2 else None
    for label in labels:
        assert metrics["ensemble"]["per_label"][label] == pytest.approx(aucs[label], abs=1e-12)
    valid = [v for v in aucs.values() if v is not None]
    assert metrics["ensemble"]["macro_auc"] == pytest.approx(np.mean(valid), abs=1e-12)
    assert metrics["skipped"] == [label for label, v in aucs.items() if v is None]

    # The ensemble is the mean of the fold models' probabilities, and each fold's AUC is its own.
    folds = load_fold_probabilities(out / "fold_probabilities.npz")
    assert list(folds["models"]) == metrics["model_names"] == ["fold-0", "fold-1"]
    assert list(folds["keys"]) == list(table["key"])
    ensemble = table[[f"prob_{label}" for label in labels]].to_numpy()
    np.testing.assert_allclose(ensemble, folds["probabilities"].mean(axis=0), rtol=0, atol=1e-15)
    for f, name in enumerate(folds["models"]):
        for j, label in enumerate(labels):
            known = table[f"target_{label}"].notna().to_numpy()
            y = table[f"target_{label}"].to_numpy()[known]
            if len(np.unique(y)) == 2:
                assert metrics["models"][name]["per_label"][label] == pytest.approx(roc_auc_score(y, folds["probabilities"][f][known, j]), abs=1e-12)
    mean_fold = np.mean([metrics["models"][n]["macro_auc"] for n in folds["models"]])
    assert metrics["gains"]["ensemble_over_mean_model"] == pytest.approx(metrics["ensemble"]["macro_auc"] - mean_fold, abs=1e-12)
    assert metrics["gains"]["tta_ensemble"] == pytest.approx(metrics["ensemble"]["macro_auc"] - metrics["ensemble_no_tta"]["macro_auc"], abs=1e-12)
    for label, interval in metrics["ensemble"]["interval"]["per_label"].items():
        assert (interval is None) == (aucs[label] is None)
        if interval is not None:
            assert 0 <= interval[0] <= interval[1] <= 1


def test_tta_view_is_the_streams_mirrored_image(evaluated_experiment, synth_shards):
    """TTA = mean of the sigmoid of each view's refined logits; the mirror view equals the stream's hflip=True."""
    runs, _ = evaluated_experiment
    folds = load_fold_probabilities(runs / "ensemble" / "fold_probabilities.npz")
    model, card = load_model(runs / "fold-1" / "best")
    manifest = load_manifest(synth_shards)
    mirrored = predict({"m": model}, eval_loader(synth_shards, manifest, ["test"], stream_config(card, 16, 0), 0, 1, hflip=True), "cpu").sorted()
    assert mirrored.keys == list(folds["keys"])
    p_mirror = probabilities(mirrored.logits["m"])
    p_plain = folds["probabilities_no_tta"][1]
    np.testing.assert_allclose(folds["probabilities"][1], (p_plain + p_mirror) / 2, rtol=0, atol=1e-6)
    assert np.abs(p_mirror - p_plain).max() > 1e-4  # the mirror view really is a different input


def test_an_ensemble_of_one_model_is_that_model(evaluated_experiment, tmp_path):
    runs, full = evaluated_experiment
    single = run_evaluate(runs / "fold-0", split="test", tta=True, out=tmp_path, batch_size=32, workers=1, resamples=50)
    folds = load_fold_probabilities(runs / "ensemble" / "fold_probabilities.npz")
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert list(table["key"]) == list(folds["keys"])
    np.testing.assert_allclose(table[[f"prob_{l}" for l in single["labels"]]].to_numpy(), folds["probabilities"][0], rtol=0, atol=1e-6)
    assert single["model_names"] == ["fold-0"]
    assert single["ensemble"]["macro_auc"] == pytest.approx(full["models"]["fold-0"]["macro_auc"], abs=1e-9)
    assert single["ensemble"]["per_label"] == pytest.approx(single["models"]["fold-0"]["per_label"])
    assert single["gains"]["ensemble_over_mean_model"] == 0.0


def test_without_tta_evaluate_reproduces_the_training_validation_predictions(trained_experiment, tmp_path):
    best = trained_experiment / "fold-0" / "best"
    metrics = run_evaluate(best, split="fold-0", tta=False, out=tmp_path, batch_size=64, workers=0, resamples=20)
    labels = metrics["labels"]
    ours, theirs = probs_table(tmp_path / "predictions.csv", labels), probs_table(best / "val_predictions.csv", labels)
    assert sorted(ours.index) == sorted(theirs.index)
    np.testing.assert_allclose(ours.loc[theirs.index].to_numpy(), theirs.to_numpy(), rtol=0, atol=1e-6)
    card = ModelCard.read(best)
    assert metrics["ensemble"]["macro_auc"] == pytest.approx(card.metrics["ema"]["macro_auc"], abs=1e-6)
    assert metrics["notes"] == [] and metrics["tta"] is False and "ensemble_no_tta" not in metrics


def test_a_fold_split_used_for_training_is_flagged():
    models = [FoldModel(f"fold-{k}", Path("."), None, {}) for k in range(3)]
    assert split_notes("test", models) == []
    assert split_notes("fold-0", models[:1]) == []
    (note,) = split_notes("fold-0", models)
    assert "fold-1, fold-2" in note and "optimistic" in note


@pytest.mark.slow
def test_two_processes_give_the_single_process_predictions(evaluated_experiment, tmp_path):
    runs, _ = evaluated_experiment
    script = tmp_path / "evaluate.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nfrom cxrdist.evaluation.prediction.ensemble import run_evaluate\n"
        "run_evaluate(Path(sys.argv[1]), split='test', out=Path(sys.argv[2]), batch_size=32, workers=0, resamples=200)\n"
    )
    cmd = LAUNCH + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port()), str(script), str(runs), str(tmp_path / "ddp")]
    result = subprocess.run(cmd, env=cpu_env(2), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, explain(result)
    single = pd.read_csv(runs / "ensemble" / "predictions.csv")
    ddp = pd.read_csv(tmp_path / "ddp" / "predictions.csv")
    assert list(ddp["key"]) == list(single["key"])
    pd.testing.assert_frame_equal(ddp.drop(columns=[c for c in ddp if c.startswith("prob_")]),
                                  single.drop(columns=[c for c in single if c.startswith("prob_")]))
    # Per-image float32 network outputs may differ in the last bits with a different batch composition.
    np.testing.assert_allclose(ddp.filter(like="prob_").to_numpy(), single.filter(like="prob_").to_numpy(), rtol=0, atol=1e-6)
    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    single_metrics = json.loads((runs / "ensemble" / "metrics.json").read_text())
    assert ddp_metrics["world_size"] == 2
    assert ddp_metrics["ensemble"]["macro_auc"] == pytest.approx(single_metrics["ensemble"]["macro_auc"], abs=1e-9)


def test_user_errors(evaluated_experiment, tmp_path):
    runs, _ = evaluated_experiment
    with pytest.raises(UserError, match="no trained fold models"):
        run_evaluate(tmp_path)
    with pytest.raises(UserError, match="split 'validation' is not in the manifest"):
        run_evaluate(runs, split="validation", out=tmp_path)


# ---------------------------------------------------------------- the patient bootstrap


def test_weighted_auc_equals_sklearn_on_repeated_images():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # many ties
    w = rng.integers(0, 4, (20, 60))
    expected = [roc_auc_score(np.repeat(y, wi), np.repeat(s, wi)) for wi in w]
    np.testing.assert_allclose(weighted_auc(y, s, w), expected, rtol=0, atol=1e-12)
    assert np.isnan(weighted_auc(np.ones(5), np.arange(5.0), np.ones((1, 5))))[0]


def test_patient_weights_draw_whole_patients():
    groups = ["a", "a", "a", "b", "c", "c"]
    w = patient_weights(groups, 500, seed=1)
    assert w.shape == (500, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 4] == w[:, 5]).all()
    # Each resample draws three patients: total weight = 3 per patient slot.
    assert (w[:, [0, 3, 4]].sum(axis=1) == 3).all()
    assert (w[:, 0] == 0).any() and (w[:, 0] == 3).any()


def test_intervals_skip_one_class_labels_and_cover_a_perfect_label():
    rng = np.random.default_rng(2)
    n = 200
    groups = [f"p{i // 2}" for i in range(n)]
    perfect = rng.integers(0, 2, n)
    targets = np.stack([perfect, np.zeros(n), rng.integers(0, 2, n)], axis=1).astype(float)
    scores = np.stack([perfect + rng.random(n) * 0.5, rng.random(n), rng.random(n)], axis=1)
    result = auc_intervals(targets, scores, ["perfect", "absent", "noise"], None, groups, n_resamples=300, seed=0)
    assert result["per_label"]["perfect"] == [1.0, 1.0]
    assert result["per_label"]["absent"] is None
    low, high = result["per_label"]["noise"]
    assert low < roc_auc_score(targets[:, 2], scores[:, 2]) < high and 0.3 < low < high < 0.7
    assert result["patients"] == 100 and result["unit"] == "patient"
    lo_m, hi_m = result["macro_auc"]
    assert (1.0 + low) / 2 - 0.05 < lo_m < hi_m < (1.0 + high) / 2 + 0.05  # the macro averages perfect and noise only
