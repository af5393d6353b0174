"""`cxrdist lodo` (cxrdist/lodo.py): leave-one-dataset-out on real tar shards of three small synthetic datasets. Every
held-out experiment is really trained (test_resnet, 64 px, 1 epoch, 2 folds) without the dataset it leaves out, then
scored on it; the README's command runs as written (a copy of configs/multi.yaml, its relative locations read from its
folder); the summary's numbers equal scikit-learn on the written predictions and `cxrdist evaluate --external`, internal
and external compared over exactly the same labels; running it again retrains and re-evaluates nothing, other settings
are refused in one line, a left-out dataset prepared again is scored anew; W&B (offline) gets the per-dataset AUCs of
every evaluation."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wandb_records as wb
from test_datasets import B_LACKS, NIH_STYLE, prepare_synthetic
from trainer_utils import DEMO_CONFIG, REPO, cpu_env, explain, fast_overrides, label_aucs

NAMES = ("chexpert", "nih", "mimic")  # as configs/multi.yaml names them
MULTI_CONFIG = REPO / "configs" / "multi.yaml"


def prepare_as(data: Path, name: str, **kwargs) -> Path:
    """A synthetic dataset prepared into data/NAME-shards, where configs/multi.yaml looks for it (relative to configs/)."""
    shards = prepare_synthetic(data / "raw" / name, **kwargs)
    os.replace(shards, data / f"{name}-shards")
    return data / f"{name}-shards"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> dict:
    """A folder laid out as the README says: configs/multi.yaml (copied) and data/{chexpert,nih,mimic}-shards. nih: NIH's
    'Effusion', two findings not annotated; all three: 100 images, 2 folds, a test split."""
    base = tmp_path_factory.mktemp("lodo-checkout")
    (base / "configs").mkdir()
    shutil.copy(MULTI_CONFIG, base / "configs" / "multi.yaml")
    data = base / "data"
    datasets = {"chexpert": prepare_as(data, "chexpert", seed=3, n=100, folds=2),
                "nih": prepare_as(data, "nih", seed=5, n=100, folds=2, rename=NIH_STYLE, drop=tuple(B_LACKS)),
                "mimic": prepare_as(data, "mimic", seed=7, n=100, folds=2)}
    return {"root": base, "datasets": datasets}


@pytest.fixture(scope="module")
def three_datasets(checkout) -> dict[str, Path]:
    return checkout["datasets"]


def small(**extra) -> list[str]:
    """configs/multi.yaml (SE-ResNeXt101 at 380 px, bf16, checkpoints every 1000 steps) made small and fast."""
    values = {key: value for key, value in (item.split("=", 1) for item in fast_overrides("unused", Path("unused")))
              if key not in ("data.shards", "output_dir")}
    values.update({"model.pretrained": "false", "train.mixed_precision": "no", "train.checkpoint_every": 0, "train.compile": "false",
                   "train.epochs": 1, **extra})
    return [f"{key}={value}" for key, value in values.items()]


def readme_lodo(root: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The README's command, `cxrdist lodo --config configs/multi.yaml [--processes 2] [key=value ...]`, run in `root`."""
    cmd = [sys.executable, "-m", "cxrdist", "lodo", "--config", "configs/multi.yaml", "--processes", "1", "--resamples", "20",
           "--workers", "0", *small(), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=1800, env=env or cpu_env(1))


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
    files = [*runs.glob("*-without-*/fold-*/best/*"), *runs.glob("*-without-*/fold-*/checkpoints/*/*"),
             *runs.glob("*-without-*/ensemble/*"), *runs.glob("*-without-*/external/*/*")]
    return {str(path): path.stat().st_mtime_ns for path in files if path.is_file()}


@pytest.mark.slow
def test_lodo_as_the_readme_writes_it_trains_scores_compares_and_resumes_without_redoing(checkout, tmp_path):
    root = checkout["root"]
    out = root / "runs"  # output_dir: runs, relative to where the command runs
    env = cpu_env(1, WANDB_MODE="offline", WANDB_DIR=tmp_path / "wandb-home", WANDB_SILENT="true")
    started = time.monotonic()
    first = readme_lodo(root, env=env)
    print(f"lodo, 3 datasets x 2 folds of ~40 training images, 1 epoch: {time.monotonic() - started:.0f} s")
    assert first.returncode == 0, explain(first)
    summary = json.loads((out / "multi" / "lodo" / "lodo.json").read_text())
    assert list(summary["held_out"]) == list(NAMES) and summary["external_split"] == "all"

    for name in NAMES:
        others = [n for n in NAMES if n != name]
        row = summary["held_out"][name]
        experiment = out / f"multi-without-{name}"
        assert row["trained_on"] == others and row["experiment"] == str(experiment)
        for fold in (0, 1):  # trained on the others only: their images are the validation fold, never the left-out one
            val = pd.read_csv(experiment / f"fold-{fold}" / "best" / "val_predictions.csv", dtype={"dataset": str})
            assert set(val["dataset"]) == set(others)

        written = Path(row["external"]["metrics"]).parent  # external/NAME-ID-all
        assert written.parent == experiment / "external" and written.name == f"{name}-{row['external']['identity']}-all"
        predictions = pd.read_csv(written / "predictions.csv", dtype={"dataset": str})
        assert set(predictions["dataset"]) == {name} and len(predictions) == 100  # all of it, named as in data.shards
        external_auc, scored = table_macro_auc(written / "predictions.csv")
        assert math.isclose(row["external"]["macro_auc"], external_auc, rel_tol=0, abs_tol=1e-9)
        assert row["external"]["labels"] == scored and row["external"]["num_samples"] == 100
        if name == "nih":
            assert not set(B_LACKS) & set(scored)  # it does not annotate them: never scored

        internal_auc, internal_scored = table_macro_auc(experiment / "ensemble" / "predictions.csv")
        assert math.isclose(row["internal"]["macro_auc"], internal_auc, rel_tol=0, abs_tol=1e-9)
        compared = [label for label in scored if label in internal_scored]  # the same labels on both sides, and only those
        assert row["compared"]["labels"] == compared
        for side, predictions_file in (("external", written / "predictions.csv"), ("internal", experiment / "ensemble" / "predictions.csv")):
            aucs = label_aucs(pd.read_csv(predictions_file), compared)
            assert len(aucs) == len(compared)
            assert math.isclose(row["compared"][f"{side}_macro_auc"], float(np.mean(aucs)), rel_tol=0, abs_tol=1e-9)
        assert f"{row['external']['macro_auc']:.4f}" in first.stdout

        [log] = wb.run_files(written)  # the external evaluation's own W&B run, with its per-dataset AUC
        assert wb.run_info(log)["name"] == f"external-{name}"
        logged = wb.summary(log)
        assert logged[f"ensemble/dataset_auc/{name}"] == pytest.approx(row["external"]["macro_auc"])
        assert logged[f"ensemble/dataset_labels/{name}"] == len(scored)
    internal = json.loads((out / "multi-without-chexpert" / "ensemble" / "metrics.json").read_text())
    [log] = wb.run_files(out / "multi-without-chexpert" / "ensemble")
    logged = wb.summary(log)
    for name in ("nih", "mimic", "pooled"):  # the internal evaluation of a two-dataset ensemble: each dataset's AUC and the pooled one
        assert logged[f"ensemble/dataset_auc/{name}"] == pytest.approx(internal["per_dataset"][name]["macro_auc"])
    table = json.loads((log.parent / "files" / logged["ensemble/per_dataset_auc/path"]).read_text())
    assert [r[0] for r in table["data"]] == list(internal["per_dataset"]) and set(internal["per_dataset"]) == {"nih", "mimic", "pooled"}

    from cxrdist.evaluation.report.datasets import datasets_section

    section = datasets_section(out / "multi", None)  # the report of runs/multi shows the summary
    assert "Leave one dataset out" in section
    assert all(f"<td>{row['external']['macro_auc']:.3f}</td>" in section for row in summary["held_out"].values())

    # `cxrdist evaluate --external` on the same ensemble and dataset gives the summary's number
    again = subprocess.run([sys.executable, "-m", "cxrdist", "evaluate", "--runs", str(out / "multi-without-nih"),
                            "--external", str(checkout["datasets"]["nih"]), "--split", "all", "--out", str(tmp_path / "by-hand"),
                            "--resamples", "20", "--workers", "0"],
                           capture_output=True, text=True, cwd=REPO, timeout=600, env=cpu_env(1))
    assert again.returncode == 0, explain(again)
    by_hand = json.loads((tmp_path / "by-hand" / "metrics.json").read_text())
    assert by_hand["ensemble"]["macro_auc"] == summary["held_out"]["nih"]["external"]["macro_auc"]

    before = outputs_stamp(out)
    second = readme_lodo(root)
    assert second.returncode == 0, explain(second)
    assert second.stdout.count("not relaunched") == 6 and second.stdout.count("not redone") == 6, second.stdout
    assert "training multi" not in second.stdout
    assert outputs_stamp(out) == before  # nothing retrained, re-evaluated or rewritten
    assert json.loads((out / "multi" / "lodo" / "lodo.json").read_text()) == summary

    # other training settings: the finished folds are not passed off as this run's
    other = readme_lodo(root, "train.lr=0.001")
    errors = [line for line in other.stderr.splitlines() if "error:" in line]
    assert other.returncode == 2 and len(errors) == 1 and "train.lr=0.0002, now 0.001" in errors[0], explain(other)
    assert "multi-without-chexpert/fold-0" in errors[0] and outputs_stamp(out) == before
    union = sorted({label for name in NAMES for label in json.loads((out / f"multi-without-{name}" / "fold-0" / "best" / "model.json")
                                                                          .read_text())["labels"]})
    reordered = readme_lodo(root, f"data.vocabulary={json.dumps(union)}")  # the same data, the model's labels in another order
    errors = [line for line in reordered.stderr.splitlines() if "error:" in line]
    assert reordered.returncode == 2 and len(errors) == 1 and "trained on other data" in errors[0], explain(reordered)
    allowed = readme_lodo(root, "train.lr=0.001", "train.resume_changes=allow")
    assert allowed.returncode == 0 and allowed.stdout.count("reused although trained under other settings") == 6, explain(allowed)

    # the left-out dataset prepared again at the same place (new images and folds): scored anew, into its own folder
    from cxrdist.lodo import Settings, evaluate_held_out, plan
    from cxrdist.training.config import load_config

    old = summary["held_out"]["mimic"]["external"]
    prepare_as(root / "data", "mimic-again", seed=8, n=60, folds=2)
    shutil.rmtree(checkout["datasets"]["mimic"])
    os.replace(root / "data" / "mimic-again-shards", checkout["datasets"]["mimic"])
    cfg = load_config(root / "configs" / "multi.yaml", small())
    [run] = [r for r in plan(cfg.data.shards, cfg.experiment) if r.held_out.name == "mimic"]
    said = []
    row = evaluate_held_out(Settings(root / "configs" / "multi.yaml", small(), resamples=20, workers=0), run, out, said.append)
    assert any("lodo: evaluating multi-without-mimic: external mimic (all)" in line for line in said), said
    assert row["external"]["num_samples"] == 60 and row["external"]["identity"] != old["identity"]
    assert Path(old["metrics"]).is_file()  # the old result stays, in its own folder
@pytest.mark.parametrize("shards, words", [("one", "leaving one dataset out needs a list of at least 2"),
                                           ("list-of-one", "leaving one dataset out needs a list of at least 2"),
                                           ("twice", "is listed twice")])
def test_fewer_than_two_datasets_or_a_bad_list_is_one_line_exit_2_before_any_training(three_datasets, tmp_path, shards, words):
    a = {"location": str(three_datasets["chexpert"]), "name": "a"}
    spec = {"one": str(three_datasets["chexpert"]), "list-of-one": json.dumps([a]), "twice": json.dumps([a, {**a, "name": "a2"}])}[shards]
    done = lodo(spec, tmp_path / "runs")
    assert done.returncode == 2 and words in done.stderr, explain(done)
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_evaluate_only_refuses_untrained_folds_in_one_line(three_datasets, tmp_path):
    done = lodo(shards_spec(three_datasets), tmp_path / "runs", "--evaluate-only")
    assert done.returncode == 2 and "lodo-without-chexpert/fold-0 is not trained" in done.stderr, explain(done)
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


def test_internal_and_external_are_compared_over_exactly_the_labels_scored_in_both():
    """B has no AUC internally (one class in the training datasets' test split), D none externally: the comparison averages
    A and C on both sides, and says 2 (hand-computed: external (0.9 + 0.8) / 2, internal (0.6 + 0.95) / 2)."""
    from cxrdist.data.datasets import DatasetEntry
    from cxrdist.lodo import HeldOutRun, summary_row, summary_table

    run = HeldOutRun(DatasetEntry("c", Path("/c")), (DatasetEntry("a", Path("/a")),), "e-without-c")
    external = {"split": "all", "num_samples": 10, "out": "/runs/e-without-c/external/c", "external_dataset": {"identity": "abc"},
                "ensemble": {"macro_auc": 0.8, "per_label": {"A": 0.9, "B": 0.7, "C": 0.8, "D": None}}}
    internal = {"split": "test", "num_samples": 5, "out": "/runs/e-without-c/ensemble",
                "ensemble": {"macro_auc": 0.35 + 0.4, "per_label": {"A": 0.6, "B": None, "C": 0.95, "D": 0.7}}}
    row = summary_row(run, Path("/runs/e-without-c"), external, internal)
    assert row["compared"]["labels"] == ["A", "C"]
    assert row["compared"]["external_macro_auc"] == pytest.approx(0.85, abs=1e-12)
    assert row["compared"]["internal_macro_auc"] == pytest.approx(0.775, abs=1e-12)
    text = summary_table({"experiment": "e", "external_split": "all", "internal_split": "test", "held_out": {"c": row}})
    assert text.splitlines()[-1].split() == ["c", "a", "0.8000", "3", "0.7500", "3", "2", "0.8500", "0.7750"]
