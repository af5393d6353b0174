"""`cxrdist lodo` (cxrdist/lodo.py): leave-one-dataset-out on real tar shards of three small synthetic datasets. Every
held-out experiment is really trained (test_resnet, 64 px, 1 epoch, 2 folds) without the dataset it leaves out, then
scored on it; the summary's numbers equal scikit-learn on the written predictions and `cxrdist evaluate --external`;
running it again retrains and re-evaluates nothing; W&B (offline) gets the per-dataset AUCs of every evaluation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wandb_records as wb
from test_datasets import B_LACKS, NIH_STYLE, prepare_synthetic
from trainer_utils import DEMO_CONFIG, REPO, cpu_env, explain, fast_overrides, label_aucs

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def three_datasets(tmp_path_factory) -> dict[str, Path]:
    """a: CheXpert names; b: NIH's 'Effusion', two findings not annotated; c: a third hospital."""
    base = tmp_path_factory.mktemp("lodo-data")
    return {"a": prepare_synthetic(base / "a", seed=3, n=100, folds=2),
            "b": prepare_synthetic(base / "b", seed=5, n=100, folds=2, rename=NIH_STYLE, drop=tuple(B_LACKS)),
            "c": prepare_synthetic(base / "c", seed=7, n=100, folds=2)}


def lodo(shards, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    overrides = fast_overrides(shards, out, **{"train.epochs": 1, "experiment": "lodo"})
    cmd = [sys.executable, "-m", "cxrdist", "lodo", "--config", str(DEMO_CONFIG), "--processes", "1", "--resamples", "20", "--workers", "0",
           *extra, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800, env=env or cpu_env(1))


def shards_spec(datasets: dict[str, Path]) -> str:
    return json.dumps([{"location": str(path), "name": name} for name, path in datasets.items()])


def table_macro_auc(predictions: Path, labels: list[str] | None = None) -> tuple[float, list[str]]:
    """scikit-learn's macro AUC of a prediction CSV over `labels` (default: all) with both classes, and those labels."""
    table = pd.read_csv(predictions, dtype={"key": str, "patient": str, "dataset": str})
    labels = labels or [c.removeprefix("prob_") for c in table.columns if c.startswith("prob_")]
    scored = [label for label in labels if table[f"target_{label}"].dropna().nunique() == 2]
    return float(np.mean(label_aucs(table, scored))), scored


def outputs_stamp(runs: Path) -> dict[str, int]:
    """Every model, checkpoint and evaluation file of the held-out experiments, with its modification time."""
    files = [*runs.glob("lodo-without-*/fold-*/best/*"), *runs.glob("lodo-without-*/fold-*/checkpoints/*/*"),
             *runs.glob("lodo-without-*/ensemble/*"), *runs.glob("lodo-without-*/external/*/*")]
    return {str(path): path.stat().st_mtime_ns for path in files if path.is_file()}


@pytest.mark.slow
def test_lodo_trains_each_held_out_run_scores_it_externally_and_resumes_without_redoing(three_datasets, tmp_path):
    out = tmp_path / "runs"
    env = cpu_env(1, WANDB_MODE="offline", WANDB_DIR=tmp_path / "wandb-home", WANDB_SILENT="true")
    first = lodo(shards_spec(three_datasets), out, env=env)
    assert first.returncode == 0, explain(first)
    summary = json.loads((out / "lodo" / "lodo" / "lodo.json").read_text())
    assert list(summary["held_out"]) == list(NAMES) and summary["external_split"] == "all"

    for name in NAMES:
        others = [n for n in NAMES if n != name]
        row = summary["held_out"][name]
        experiment = out / f"lodo-without-{name}"
        assert row["trained_on"] == others and row["experiment"] == str(experiment)
        for fold in (0, 1):  # trained on the others only: their images are the validation fold, never the left-out one
            val = pd.read_csv(experiment / f"fold-{fold}" / "best" / "val_predictions.csv", dtype={"dataset": str})
            assert set(val["dataset"]) == set(others)

        written = experiment / "external" / name
        predictions = pd.read_csv(written / "predictions.csv", dtype={"dataset": str})
        assert set(predictions["dataset"]) == {name} and len(predictions) == 100  # all of it, named as in data.shards
        external_auc, shared = table_macro_auc(written / "predictions.csv")
        assert math.isclose(row["external"]["macro_auc"], external_auc, rel_tol=0, abs_tol=1e-9)
        assert row["external"]["labels"] == shared and row["external"]["num_samples"] == 100
        if name == "b":
            assert not set(B_LACKS) & set(shared)  # b does not annotate them: never scored

        internal_auc, _ = table_macro_auc(experiment / "ensemble" / "predictions.csv")
        same_labels = float(np.mean(label_aucs(pd.read_csv(experiment / "ensemble" / "predictions.csv"), shared)))
        assert math.isclose(row["internal"]["macro_auc"], internal_auc, rel_tol=0, abs_tol=1e-9)
        assert math.isclose(row["internal"]["macro_auc_shared_labels"], same_labels, rel_tol=0, abs_tol=1e-9)
        assert f"{row['external']['macro_auc']:.4f}" in first.stdout

        [log] = wb.run_files(written)  # the external evaluation's own W&B run, with its per-dataset AUC
        assert wb.run_info(log)["name"] == f"external-{name}"
        logged = wb.summary(log)
        assert logged[f"ensemble/dataset_auc/{name}"] == pytest.approx(row["external"]["macro_auc"])
        assert logged[f"ensemble/dataset_labels/{name}"] == len(shared)
    internal = json.loads((out / "lodo-without-a" / "ensemble" / "metrics.json").read_text())
    [log] = wb.run_files(out / "lodo-without-a" / "ensemble")
    logged = wb.summary(log)
    for name in ("b", "c", "pooled"):  # the internal evaluation of a two-dataset ensemble: each dataset's AUC and the pooled one
        assert logged[f"ensemble/dataset_auc/{name}"] == pytest.approx(internal["per_dataset"][name]["macro_auc"])
    table = json.loads((log.parent / "files" / logged["ensemble/per_dataset_auc/path"]).read_text())
    assert [r[0] for r in table["data"]] == ["b", "c", "pooled"]

    from cxrdist.evaluation.report.datasets import datasets_section

    section = datasets_section(out / "lodo", None)  # the report of runs/lodo shows the summary
    assert "Leave one dataset out" in section
    assert all(f"<td>{row['external']['macro_auc']:.3f}</td>" in section for row in summary["held_out"].values())

    # `cxrdist evaluate --external` on the same ensemble and dataset gives the summary's number
    again = subprocess.run([sys.executable, "-m", "cxrdist", "evaluate", "--runs", str(out / "lodo-without-b"),
                            "--external", str(three_datasets["b"]), "--split", "all", "--out", str(tmp_path / "by-hand"),
                            "--resamples", "20", "--workers", "0"],
                           capture_output=True, text=True, cwd=REPO, timeout=600, env=cpu_env(1))
    assert again.returncode == 0, explain(again)
    by_hand = json.loads((tmp_path / "by-hand" / "metrics.json").read_text())
    assert by_hand["ensemble"]["macro_auc"] == summary["held_out"]["b"]["external"]["macro_auc"]

    before = outputs_stamp(out)
    second = lodo(shards_spec(three_datasets), out)
    assert second.returncode == 0, explain(second)
    assert second.stdout.count("not relaunched") == 6 and second.stdout.count("not redone") == 6, second.stdout
    assert "training lodo" not in second.stdout
    assert outputs_stamp(out) == before  # nothing retrained, re-evaluated or rewritten
    assert json.loads((out / "lodo" / "lodo" / "lodo.json").read_text()) == summary


@pytest.mark.parametrize("shards, words", [("one", "leaving one dataset out needs a list of at least 2"),
                                           ("list-of-one", "leaving one dataset out needs a list of at least 2"),
                                           ("twice", "is listed twice")])
def test_fewer_than_two_datasets_or_a_bad_list_is_one_line_exit_2_before_any_training(three_datasets, tmp_path, shards, words):
    a = {"location": str(three_datasets["a"]), "name": "a"}
    spec = {"one": str(three_datasets["a"]), "list-of-one": json.dumps([a]), "twice": json.dumps([a, {**a, "name": "a2"}])}[shards]
    done = lodo(spec, tmp_path / "runs")
    assert done.returncode == 2 and words in done.stderr, explain(done)
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_evaluate_only_refuses_untrained_folds_in_one_line(three_datasets, tmp_path):
    done = lodo(shards_spec(three_datasets), tmp_path / "runs", "--evaluate-only")
    assert done.returncode == 2 and "lodo-without-a/fold-0 is not trained" in done.stderr, explain(done)
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_plan_lists_each_held_out_run_and_its_training_datasets(three_datasets, tmp_path):
    done = subprocess.run([sys.executable, "-m", "cxrdist", "lodo", "--config", str(DEMO_CONFIG), "--plan",
                           f"data.shards={shards_spec(three_datasets)}", "experiment=x"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, explain(done)
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert [(name, experiment) for name, experiment, _ in rows] == [(n, f"x-without-{n}") for n in NAMES]
    for name, _, override in rows:
        key, _, value = override.partition("=")
        assert key == "data.shards" and [entry["name"] for entry in json.loads(value)] == [n for n in NAMES if n != name]
