"""W&B dashboards, tested offline: the tests read the transaction logs W&B writes (tests/wandb_records.py)
and check the keys, tables and artifacts of a training run (resumed into the same run) and of the
`ensemble` and `report` runs that `cxrdist evaluate` and `cxrdist report` add to the experiment's group."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import wandb_records as wb
from trainer_utils import REPO, cpu_env, explain, fast_overrides, records, run_single


def offline_env(tmp_path, processes: int = 1) -> dict:
    return cpu_env(processes, WANDB_MODE="offline", WANDB_DIR=tmp_path / "wandb-home", WANDB_SILENT="true")


@pytest.mark.slow
def test_training_run_logs_curves_sparsity_ema_decay_model_artifact_and_resumes_same_run(synth_shards, tmp_path):
    out = tmp_path / "runs"
    args = fast_overrides(synth_shards, out, **{"train.epochs": 1, "experiment": "dash", "logging.wandb": "offline", "logging.log_models": "true"})
    first = run_single(args, env=offline_env(tmp_path))
    assert first.returncode == 0, explain(first)
    again = run_single([*args, "train.epochs=2"], env=offline_env(tmp_path))  # resumes from the epoch-1 checkpoint
    assert again.returncode == 0, explain(again)

    run_dir = out / "dash" / "fold-0"
    logs = wb.run_files(run_dir)
    assert len(logs) == 2, logs
    infos = [wb.run_info(path) for path in logs]
    assert infos[0]["id"] == infos[1]["id"] and infos[0]["group"] == "dash" and infos[0]["name"] == "fold-0"

    steps = wb.history(logs[0])
    decays = steps["train/ema_decay"]
    assert decays == [r["ema_decay"] for r in records(run_dir, "train")][: len(decays)]
    assert 0 <= decays[0] < decays[-1] < 1  # the warm-up ramps the effective decay up
    evals = records(run_dir, "eval")
    assert steps["val/coupling_sparsity"][0] == evals[0]["sparsity"]
    assert steps["val/ema_macro_auc"][0] == pytest.approx(evals[0]["ema"]["macro_auc"])
    assert steps["couplings/_type"][0] == "image-file"
    assert any(key.startswith("val/auc/") for key in steps)

    models = [a for a in wb.artifacts(logs[0]) if a["type"] == "model"]
    assert models and models[0]["name"] == "dash-fold-0" and "best" in models[0]["aliases"]
    assert {"model.safetensors", "model.json"} <= set(models[0]["files"])
    assert wb.history(logs[1])["train/ema_decay"][0] > decays[-1]  # the resumed run goes on where it stopped


@pytest.mark.slow
def test_evaluate_logs_ensemble_run_and_report_uploads_page(trained_experiment, tmp_path):
    env = offline_env(tmp_path)
    ens, rep = tmp_path / "ensemble", tmp_path / "report"
    cmd = [sys.executable, "-m", "cxrdist"]
    evaluated = subprocess.run([*cmd, "evaluate", "--runs", str(trained_experiment), "--out", str(ens), "--workers", "0", "--resamples", "50"],
                               env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, explain(evaluated)
    metrics = json.loads((ens / "metrics.json").read_text())

    [log] = wb.run_files(ens)
    info = wb.run_info(log)
    assert (info["name"], info["group"], info["job_type"]) == ("ensemble", "ens", "evaluate")
    logged = wb.summary(log)
    assert logged["ensemble/macro_auc"] == pytest.approx(metrics["ensemble"]["macro_auc"])
    assert [logged["ensemble/macro_auc_low"], logged["ensemble/macro_auc_high"]] == pytest.approx(metrics["ensemble"]["interval"]["macro_auc"])
    assert logged["gains/tta_ensemble"] == pytest.approx(metrics["gains"]["tta_ensemble"])
    assert logged["gains/ensemble_over_mean_model"] == pytest.approx(metrics["gains"]["ensemble_over_mean_model"])
    assert -1 <= logged["ensemble/fold_agreement_mean"] <= 1
    assert set(metrics["per_dataset"]) == {"shards", "pooled"}  # one dataset, named after its directory
    for name, entry in metrics["per_dataset"].items():
        assert logged[f"ensemble/dataset_auc/{name}"] == pytest.approx(entry["macro_auc"])
        assert logged[f"ensemble/dataset_labels/{name}"] == entry["labels"]

    table = json.loads((log.parent / "files" / logged["ensemble/per_label_auc/path"]).read_text())
    assert table["columns"][:4] == ["label", "auc", "low", "high"] and len(table["data"]) == len(metrics["labels"])
    row = dict(zip(table["columns"], table["data"][metrics["labels"].index("Support Devices")]))
    assert row["auc"] == pytest.approx(metrics["ensemble"]["per_label"]["Support Devices"])
    assert [row["low"], row["high"]] == pytest.approx(metrics["ensemble"]["interval"]["per_label"]["Support Devices"])
    roc = json.loads((log.parent / "files" / logged["ensemble/roc_table/path"]).read_text())
    curves = {r[0] for r in roc["data"]}
    assert curves == {label for label, auc in metrics["ensemble"]["per_label"].items() if auc is not None}
    agreement = json.loads((log.parent / "files" / logged["ensemble/fold_agreement/path"]).read_text())
    assert agreement["columns"] == ["model", *metrics["model_names"]]

    reported = subprocess.run([*cmd, "report", "--runs", str(trained_experiment), "--out", str(rep)],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert reported.returncode == 0, explain(reported)
    [log] = wb.run_files(rep)
    assert wb.run_info(log)["group"] == "ens"
    [page] = [a for a in wb.artifacts(log) if a["type"] == "report"]
    assert page["name"] == "ens-report" and "report.html" in page["files"] and any(f.startswith("figures/") for f in page["files"])
    assert not any(f.startswith("wandb/") for f in page["files"])


def test_disabled_wandb_logs_nothing(tmp_path, monkeypatch):
    from cxrdist.evaluation.report.dashboard import log_ensemble_run

    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "ensemble"
    log_ensemble_run(tmp_path, {"labels": []}, out)
    assert not out.exists()
