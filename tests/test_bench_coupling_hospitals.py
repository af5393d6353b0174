"""bench/bench_coupling_hospitals.py at a tiny size (one seed, one epoch), so the cross-hospital coupling benchmark
never rots: F's truth is hidden from hospital b's training targets, and the figures it reports are the ones an
independent reading of what it wrote gives (sklearn on the prediction CSVs joined with the synthetic truth through
the shards' own key -> path, the coupling from the best model's weights)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open
from sklearn.metrics import roc_auc_score
from trainer_utils import REPO, cpu_env

from cxrdist.data.datasets import load_manifest
from cxrdist.data.stream import read_shards
from cxrdist.data.synth.planted import SOURCE, TARGET
from cxrdist.model.card import ModelCard

pytestmark = pytest.mark.slow


def truth_through_shards(out, dataset: str, label: str) -> dict[str, float]:
    """Namespaced key -> the synthetic truth of `label`, matched through the paths the shards record (blank = 0;
    -1, uncertain, left out)."""
    shards = out / "shards" / dataset
    manifest = load_manifest(shards)
    truth = pd.read_csv(out / "raw" / dataset / "labels_full.csv").set_index("path")[label].fillna(0)
    samples = read_shards(shards, manifest.shards(list(manifest.splits)))
    found = {f"{dataset}/{sample.key}": float(truth[json.loads(sample.meta)["path"]]) for sample in samples}
    return {key: value for key, value in found.items() if value != -1}


def sklearn_auc(predictions, dataset: str, truth: dict[str, float], label: str) -> float:
    frame = pd.read_csv(predictions, dtype={"key": str})
    rows = frame[(frame["dataset"] == dataset) & frame["key"].isin(truth)]
    return roc_auc_score([truth[k] for k in rows["key"]], rows[f"prob_{label}"])


def test_tiny_benchmark_hides_the_target_at_b_and_reports_what_it_wrote(tmp_path):
    out = tmp_path / "bench"
    env = cpu_env(1)
    env.pop("CXRDIST_EXPECT_WORLD_SIZE")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench_coupling_hospitals.py"), "--out", str(out), "--n", "90",
                             "--folds", "2", "--epochs", "1", "--seeds", "3", "--resamples", "20"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    [row] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["seed"] == 3

    # F is hidden from hospital b's training: not among its prepared labels, blank in every target column written for b.
    assert TARGET not in load_manifest(out / "shards" / "b").labels and TARGET in load_manifest(out / "shards" / "a").labels
    off, on = out / "runs" / "seed3-norefine", out / "runs" / "seed3"
    for runs in (off, on):
        predictions = pd.read_csv(runs / "fold-0" / "best" / "val_predictions.csv", dtype={"key": str}, keep_default_na=False)
        at_b = predictions[predictions["dataset"] == "b"]
        assert len(at_b) > 0 and (at_b[f"target_{TARGET}"] == "").all()
        assert (predictions.loc[predictions["dataset"] == "a", f"target_{TARGET}"] != "").all()
    # ... but its truth there exists, with both classes on b's held-out fold.
    truth_b = truth_through_shards(out, "b", TARGET)
    assert set(truth_b.values()) == {0.0, 1.0}

    # The reported AUCs are sklearn's on the written predictions against the synthetic truth.
    for key, runs in (("auc_off", off), ("auc_on", on)):
        predictions = runs / "fold-0" / "best" / "val_predictions.csv"
        assert row["target_at_b"][key] == pytest.approx(sklearn_auc(predictions, "b", truth_b, TARGET), abs=1e-12)
        assert row["target_at_a"][key] == pytest.approx(sklearn_auc(predictions, "a", truth_through_shards(out, "a", TARGET), TARGET), abs=1e-12)
        assert row["source_at_b"][key] == pytest.approx(sklearn_auc(predictions, "b", truth_through_shards(out, "b", SOURCE), SOURCE), abs=1e-12)
    at_b = row["target_at_b"]
    assert at_b["difference"] == pytest.approx(at_b["auc_on"] - at_b["auc_off"], abs=1e-12)
    assert at_b["interval"][0] <= at_b["interval"][1]

    # The coupling is the best model's A[Pleural Effusion -> Planted Target], in the model's own label order.
    best = on / "fold-0" / "best"
    labels = list(ModelCard.read(best).labels)
    with safe_open(str(best / "model.safetensors"), framework="pt") as handle:
        a = handle.get_tensor("refine.weight").float().numpy()
    assert row["coupling"] == pytest.approx(float(a[labels.index(SOURCE), labels.index(TARGET)]), abs=1e-7)
    with safe_open(str(off / "fold-0" / "best" / "model.safetensors"), framework="pt") as handle:
        assert "refine.weight" not in handle.keys()

    # compare's own figures are carried over, and the summary is computed from the rows.
    compare = json.loads((on / "compare" / "compare.json").read_text())
    assert row["compare_macro"] == compare["folds"]["fold-0"]["macro"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [3] and summary["target_at_b_difference"]["mean"] == pytest.approx(at_b["difference"])
    assert np.isfinite(summary["coupling"]["mean"])
