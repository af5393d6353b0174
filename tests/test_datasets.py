"""Several prepared datasets in one run (cxrdist/data/datasets.py): real tar shards of two synthetic datasets with the same
relative paths and patient ids, harmonised labels, per-dataset AUCs, a two-process run and external validation."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from trainer_utils import (DEMO_CONFIG, REPO, TRAIN, cpu_env, explain, fast_overrides, final_ema, label_aucs, launch_cpu, records,
                           run_single, wait_for_step)

from cxrdist.data.datasets import open_datasets
from cxrdist.data.stream import StreamConfig, eval_loader, train_loader
from cxrdist.data.synth.label_table import COHORT_COLUMNS
from cxrdist.data.spec import ImageSpec
from cxrdist.errors import UserError
from cxrdist.labels.policy import NOT_ANNOTATED

NIH_STYLE = {"Pleural Effusion": "Effusion"}  # a built-in synonym: B spells it the NIH way
B_LACKS = ["Fracture", "Support Devices"]  # findings B does not annotate


def prepare_synthetic(root: Path, seed: int, n: int, folds: int, rename: dict | None = None, drop: tuple = ()) -> Path:
    from cxrdist.data.ingest.prepare import PrepareOptions, prepare
    from cxrdist.data.synth.dataset import make_synthetic_dataset

    csv = make_synthetic_dataset(root / "raw", n=n, size=96, seed=seed, workers=1, progress=False)
    table = pd.read_csv(csv, dtype={"patient": str, "study": str})
    table = table.drop(columns=list(drop)).rename(columns=rename or {})
    table.to_csv(csv, index=False)
    labels = ",".join(c for c in table.columns if c not in COHORT_COLUMNS)
    prepare(PrepareOptions(source="csv", csv=csv, images=root / "raw" / "images", out=root / "shards", folds=folds, test_fraction=0.2,
                           max_size=64, fmt="png", samples_per_shard=40, workers=1, labels=labels, progress=False))
    return root / "shards"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """a: CheXpert names; b: another hospital (other seed) with the same file names and patient ids, NIH's 'Effusion',
    two findings not annotated; e: a third for external validation; disjoint: no shared name; folds3: 3 folds."""
    base = tmp_path_factory.mktemp("datasets")
    return {
        "a": prepare_synthetic(base / "a", seed=3, n=240, folds=2),
        "b": prepare_synthetic(base / "b", seed=5, n=240, folds=2, rename=NIH_STYLE, drop=tuple(B_LACKS)),
        "e": prepare_synthetic(base / "e", seed=7, n=120, folds=2, rename=NIH_STYLE),
        "disjoint": prepare_synthetic(base / "disjoint", seed=9, n=60, folds=2,
                                      rename={name: f"Z{k}" for k, name in enumerate(_synth_labels())}),
        "folds3": prepare_synthetic(base / "folds3", seed=11, n=60, folds=3),
        "a_again": prepare_again(base / "a", base / "a_again"),
    }


def prepare_again(raw_root: Path, out: Path) -> Path:
    """a's images prepared once more with another fold seed and shard size: other shards, the same image bytes."""
    from cxrdist.data.ingest.prepare import PrepareOptions, prepare

    prepare(PrepareOptions(source="csv", csv=raw_root / "raw" / "labels.csv", images=raw_root / "raw" / "images", out=out, folds=2,
                           test_fraction=0.2, max_size=64, fmt="png", samples_per_shard=30, workers=1, seed=1, progress=False))
    return out


def _synth_labels() -> list[str]:
    from cxrdist.data.synth.label_table import LABELS

    return LABELS


def spec(paths) -> list:
    return [{"location": str(path), "name": name} for name, path in zip(("a", "b"), paths)]


def read_eval(root, manifest, split: str) -> list[dict]:
    cfg = StreamConfig(ImageSpec(32), batch_size=50, workers=0)
    rows = []
    for batch in eval_loader(root, manifest, [split], cfg, 0, 1):
        for i, key in enumerate(batch["key"]):
            rows.append({"key": key, "raw": batch["labels_raw"][i].numpy(), **{k: v[i] for k, v in batch["meta"].items()}})
    return rows


def test_two_datasets_with_colliding_names_read_as_one(datasets):
    a, b = datasets["a"], datasets["b"]
    root, manifest = open_datasets(spec([a, b]))
    _, own_a = open_datasets(str(a))
    _, own_b = open_datasets(str(b))
    assert manifest.num_folds == 2
    assert "Pleural Effusion" in manifest.labels and "Effusion" not in manifest.labels
    rows = read_eval(root, manifest, "fold-0")
    plain_a, plain_b = read_eval(a, own_a, "fold-0"), read_eval(b, own_b, "fold-0")
    # the collision is real: the same keys, paths and patient ids occur in both datasets
    assert {r["key"] for r in plain_a} & {r["key"] for r in plain_b}
    assert {r["patient"] for r in plain_a} & {r["patient"] for r in plain_b}
    assert len(rows) == len(plain_a) + len(plain_b) == manifest.num_samples(["fold-0"])
    assert len({r["key"] for r in rows}) == len(rows)
    assert {r["dataset"] for r in rows} == {"a", "b"}
    for r in rows:
        assert r["key"].startswith(r["dataset"] + "/") and r["patient"].startswith(r["dataset"] + "/")
    b_raw = {r["key"]: r["raw"] for r in plain_b}
    effusion, effusion_b = manifest.labels.index("Pleural Effusion"), own_b.labels.index("Effusion")
    for r in rows:
        lacks = [manifest.labels.index(name) for name in B_LACKS]
        if r["dataset"] == "b":
            assert all(r["raw"][j] == NOT_ANNOTATED for j in lacks)
            own = b_raw[r["key"].removeprefix("b/")]
            assert np.array_equal(r["raw"][effusion], own[effusion_b], equal_nan=True)
        else:
            assert not np.any(r["raw"] == NOT_ANNOTATED)
    # a single location keeps its keys and gets its directory name as the dataset
    assert {r["dataset"] for r in plain_a} == {"shards"} and not plain_a[0]["key"].startswith("shards/")


def test_mixing_weights_repeat_a_datasets_training_shards(datasets):
    _, even = open_datasets(spec([datasets["a"], datasets["b"]]))
    _, weighted = open_datasets([{"location": str(datasets["a"]), "name": "a", "weight": 0.5},
                                 {"location": str(datasets["b"]), "name": "b", "weight": 1.5}])
    splits = even.train_splits(0)
    count = {name: sum(s.dataset == name for s in weighted.weighted_shards(splits)) for name in ("a", "b")}
    base = {name: sum(s.dataset == name for s in even.weighted_shards(splits)) for name in ("a", "b")}
    assert count == {"a": base["a"], "b": 3 * base["b"]}
    cfg = StreamConfig(ImageSpec(32), batch_size=20, workers=0, shuffle_buffer=20)
    batches = iter(train_loader((), weighted, splits, cfg, 0, 1))
    seen = [key.split("/")[0] for _ in range(20) for key in next(batches)["key"]]
    assert seen.count("b") > 1.8 * seen.count("a")  # 3 x b's shards; a and b have about the same number of images


def info(shards) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxrdist", "info", "--config", str(REPO / "configs" / "demo.yaml"),
                           f"data.shards={json.dumps(shards)}"], capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("case, words", [
    ("twice", "listed twice"),
    ("same_contents", "hold the same shards"),
    ("weight_zero", "positive number"),
    ("weight_negative", "positive number"),
    ("weight_nan", "positive number"),
    ("folds", "different fold counts"),
    ("disjoint", "shares no label"),
    ("version", "format version"),
])
def test_bad_dataset_lists_are_one_line_exit_2(datasets, tmp_path, case, words):
    a, b = str(datasets["a"]), str(datasets["b"])
    if case == "same_contents":
        copy = tmp_path / "copy"
        shutil.copytree(a, copy)
        shards = [{"location": a, "name": "a"}, {"location": str(copy), "name": "c"}]
    elif case == "version":
        copy = tmp_path / "old"
        shutil.copytree(b, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
        shards = [{"location": a, "name": "a"}, {"location": str(copy), "name": "b"}]
    else:
        weight = {"weight_zero": 0, "weight_negative": -1, "weight_nan": "nan"}.get(case, 1)
        other = {"twice": a, "folds": str(datasets["folds3"]), "disjoint": str(datasets["disjoint"])}.get(case, b)
        shards = [{"location": a, "name": "a"}, {"location": other, "name": "b", "weight": weight}]
    result = info(shards)
    assert result.returncode == 2, explain(result)
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    if case == "twice":  # the same command with a valid list passes
        assert info([{"location": a, "name": "a"}, {"location": b, "name": "b"}]).returncode == 0


def test_two_process_run_on_two_datasets_then_external_validation(datasets, tmp_path):
    """Two ranks (world size asserted in the processes) train fold 0 on a + b; the gathered per-dataset AUCs equal
    scikit-learn's on val_predictions.csv; `cxrdist evaluate --external` scores e and refuses a and a disjoint dataset."""
    a, b = datasets["a"], datasets["b"]
    shards = json.dumps([{"location": str(a), "name": "a"}, {"location": str(b), "name": "b", "weight": 2}])
    out = tmp_path / "runs"
    result = launch_cpu(["--fold", "0", *fast_overrides(shards, out, **{"train.epochs": 1, "experiment": "multi"})], processes=2)
    assert result.returncode == 0, explain(result)
    run = out / "multi" / "fold-0"
    table = pd.read_csv(run / "val_predictions.csv", dtype={"key": str, "patient": str, "dataset": str})
    assert set(table["dataset"]) == {"a", "b"} and table["key"].is_unique
    assert table.loc[table["dataset"] == "b", [f"target_{name}" for name in B_LACKS]].isna().all().all()
    assert table.loc[table["dataset"] == "a", f"target_{B_LACKS[0]}"].notna().mean() > 0.8  # blank only where uncertain (-1)
    (last,) = records(run, "eval")[-1:]
    per_dataset = last["ema"]["per_dataset"]
    labels = [c.removeprefix("prob_") for c in table.columns if c.startswith("prob_")]
    for name in ("a", "b", "pooled"):
        rows = table if name == "pooled" else table[table["dataset"] == name]
        aucs = label_aucs(rows, labels)
        assert per_dataset[name]["labels"] == len(aucs)
        assert math.isclose(per_dataset[name]["macro_auc"], float(np.mean(aucs)), rel_tol=0, abs_tol=1e-12)
    assert per_dataset["b"]["labels"] < per_dataset["a"]["labels"] + 1 and per_dataset["pooled"]["evaluated"] == len(table)

    def evaluate(*extra) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cxrdist", "evaluate", "--runs", str(out / "multi"), "--resamples", "20",
                               "--workers", "0", *extra], capture_output=True, text=True, cwd=REPO, timeout=600)

    internal = evaluate()
    assert internal.returncode == 0, explain(internal)
    metrics = json.loads((out / "multi" / "ensemble" / "metrics.json").read_text())
    assert set(metrics["per_dataset"]) == {"a", "b", "pooled"}
    predictions = pd.read_csv(out / "multi" / "ensemble" / "predictions.csv", dtype=str)
    assert set(predictions["dataset"]) == {"a", "b"} and predictions["key"].is_unique

    external = evaluate("--external", str(datasets["e"]), "--split", "all")
    assert external.returncode == 0, explain(external)
    [written] = (out / "multi" / "external").iterdir()  # runs/EXP/external/<name>-<identity>-<split>: the internal evaluation stays
    assert written.name.startswith("shards-") and written.name.endswith("-all")
    metrics = json.loads((written / "metrics.json").read_text())
    assert metrics["external"] and metrics["num_samples"] == 120 and list(metrics["per_dataset"]) == ["shards", "pooled"]
    assert set(pd.read_csv(written / "predictions.csv", dtype=str)["dataset"]) == {"shards"}
    assert json.loads((out / "multi" / "ensemble" / "metrics.json").read_text())["external"] is False

    from cxrdist.evaluation.report.report import run_report

    page = run_report(out / "multi").read_text()
    identity = metrics["external_dataset"]["identity"]
    assert "Datasets and external validation" in page and f"external shards (all, id {identity})" in page and "internal (test)" in page
    # each dataset's own label frequencies and folds (not the combined 0.0% and dashes)
    for name in ("a", "b"):
        assert f"Fold balance, dataset {name}" in page and f"figures/label_frequency-{name}.png" in page

    for location, words in ((a, "these very shards"), (datasets["a_again"], "the same radiograph as one of the other"),
                            (datasets["disjoint"], "shares no label")):
        refused = evaluate("--external", str(location), "--split", "all", "--out", str(tmp_path / "refused"))
        assert refused.returncode == 2 and words in refused.stderr, explain(refused)
        assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "refused").exists()


def test_sigterm_then_resume_across_datasets_is_bitwise_equal(datasets, tmp_path):
    """One process trains 2 epochs on a + b (weighted); stopped mid-epoch and resumed, it ends with the same EMA weights."""
    shards = json.dumps([{"location": str(datasets["a"]), "name": "a"}, {"location": str(datasets["b"]), "name": "b", "weight": 2}])
    common = {"train.epochs": 2, "experiment": "multi"}
    reference = tmp_path / "ref"
    result = run_single(fast_overrides(shards, reference, **common))
    assert result.returncode == 0, explain(result)
    resumed = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, str(TRAIN), "--config", str(DEMO_CONFIG), *fast_overrides(shards, resumed, **common)],
                            env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(resumed / "multi" / "fold-0", 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, f"{out}\n{err}"
    result = run_single(fast_overrides(shards, resumed, **common))
    assert result.returncode == 0 and "resumed from" in result.stdout + result.stderr, explain(result)
    a, b = final_ema(reference / "multi" / "fold-0"), final_ema(resumed / "multi" / "fold-0")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_open_datasets_refuses_a_missing_location(tmp_path):
    with pytest.raises(UserError, match="no such shard directory"):
        open_datasets([str(tmp_path / "nothing"), str(tmp_path / "other")])


def test_two_dataset_demo_runs_end_to_end(tmp_path):
    """`cxrdist demo --two-datasets`: prepare three hospitals, train every fold on two, evaluate, validate externally, report;
    its hospitals named alike everywhere, each fold table introduced by its hospital, a quiet console (one launch line, the EMA
    schedule and the inert-refinement note once, no DeepSpeed guess, no advice against its own config), and a second run
    that redoes nothing."""
    command = [sys.executable, "-m", "cxrdist", "demo", "--two-datasets", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1500, env=cpu_env(2))
    assert result.returncode == 0, explain(result)
    experiment = tmp_path / "runs" / "two-datasets"
    internal = json.loads((experiment / "ensemble" / "metrics.json").read_text())
    [external] = [json.loads(path.read_text()) for path in (experiment / "external").glob("hospital-c-*-all/metrics.json")]
    assert list(internal["per_dataset"]) == ["hospital-a", "hospital-b", "pooled"] and list(external["per_dataset"]) == ["hospital-c", "pooled"]
    assert "Datasets and external validation" in (experiment / "report" / "report.html").read_text()
    out = result.stdout
    for name in ("hospital-a", "hospital-b", "hospital-c"):  # each fold table follows the line that names its hospital
        assert out.index(f"-- {name}:") < out.index(f"its folds and test split ({name})") < out.index("max dev pp", out.index(f"-- {name}:"))
    console = result.stdout + result.stderr
    assert console.count("+ accelerate launch") == 1 and console.count("EMA decay") == 1
    assert "Setting accelerator to CPU" not in console and "ema_warmup" not in console
    inert = [line for line in console.splitlines() if "refinement is inert" in line]
    assert len(inert) <= 1 and all(line.startswith("cxrdist: folds 0, 1: ") for line in inert)

    images = sorted((tmp_path / "synth").rglob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in [*images, experiment / "ensemble" / "metrics.json", experiment / "report" / "report.html"]}
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, env=cpu_env(2))
    assert again.returncode == 0, explain(again)
    assert "+ accelerate launch" not in again.stdout + again.stderr
    assert again.stdout.count("(reusing ") == 8  # 3 datasets, 2 folds, 2 evaluations, the report
    assert images and {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_deepspeed_zero2_trains_two_datasets_and_resumes(datasets, tmp_path):
    """The multi-dataset stream under DeepSpeed ZeRO-2 (2 processes, world size asserted inside): namespaced keys, the
    gathered per-dataset AUCs equal scikit-learn's on val_predictions.csv, and a second start resumes the same run."""
    pytest.importorskip("deepspeed")
    from trainer_utils import launch_deepspeed

    shards = json.dumps([{"location": str(datasets["a"]), "name": "a"}, {"location": str(datasets["b"]), "name": "b"}])
    out = tmp_path / "runs"

    def launch(epochs: int) -> subprocess.CompletedProcess:
        return launch_deepspeed(["--fold", "0", *fast_overrides(shards, out, **{"train.epochs": epochs, "experiment": "ds"})])

    first = launch(1)
    assert first.returncode == 0, explain(first)
    run = out / "ds" / "fold-0"
    assert {r["world_size"] for r in records(run, "train")} == {2}
    table = pd.read_csv(run / "val_predictions.csv", dtype={"key": str, "patient": str, "dataset": str})
    assert set(table["dataset"]) == {"a", "b"} and table["key"].is_unique
    assert table.loc[table["dataset"] == "b", [f"target_{name}" for name in B_LACKS]].isna().all().all()
    per_dataset = records(run, "eval")[-1]["ema"]["per_dataset"]
    labels = [c.removeprefix("prob_") for c in table.columns if c.startswith("prob_")]
    for name in ("a", "b"):
        aucs = label_aucs(table[table["dataset"] == name], labels)
        assert math.isclose(per_dataset[name]["macro_auc"], float(np.mean(aucs)), rel_tol=0, abs_tol=1e-12)
    steps = [r["step"] for r in records(run, "train")]

    resumed = launch(2)
    assert resumed.returncode == 0, explain(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr, explain(resumed)
    after = [r["step"] for r in records(run, "train")]
    assert after[-1] == 2 * steps[-1] and sorted(set(after)) == after
