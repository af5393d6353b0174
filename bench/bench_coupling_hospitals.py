"""Does the learned coupling carry a label across datasets? Two synthetic hospitals, refinement on vs off.

    python bench/bench_coupling_hospitals.py [--n 600] [--epochs 8] [--seeds 0 1 2] [--l1 1e-5] [--out DIR]

Data: two hospitals drawn like `cxrdist synth --planted-coupling 1` (cxrdist/data/synth/planted.py): "Planted
Target" (F) is a noisy copy of Pleural Effusion (G: P(F | G written 1) = 0.9, else 0.05) with no mark of its own,
plus two independent controls. Hospital a (synth seed 0) annotates every label. Hospital b (synth seed 1) has
another detector (its images re-exposed: lower contrast, a lifted floor, a harder gamma, blurred) and does not
annotate F: the column is absent from its label CSV, so F is "not annotated" there (masked in the loss, blank in
every prediction CSV, never scored by cxrdist). F's synthetic truth on b stays in b's labels_full.csv, which
only this benchmark reads. Each hospital is prepared separately (same folds count).

Per seed: `cxrdist train --fold 0 --ablate refine` on both datasets (one CPU process; EXP with the refinement,
EXP-norefine without; same seed, folds and data), then `cxrdist compare EXP-norefine EXP`. Scored on hospital
b's held-out fold 0 against the synthetic truth: F's AUC in both arms and the paired difference with its patient
bootstrap interval (compare's own functions), and the learned A[G -> F] (bench_coupling.coupling_stats). Also
recorded: F's AUC on hospital a (annotated there) and compare's fold-0 macro difference over the annotated labels.
Results: OUT/results.jsonl (one line per seed) and OUT/summary.json (mean and spread over the seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_coupling import LABELS, coupling_stats  # noqa: E402

from cxrdist.data.datasets import NAMESPACE_SEPARATOR  # noqa: E402
from cxrdist.data.shards import make_keys  # noqa: E402
from cxrdist.data.synth.planted import SOURCE, TARGET  # noqa: E402
from cxrdist.evaluation.scoring.compare import ScoredPredictions, compare_tables  # noqa: E402
from cxrdist.model.card import ModelCard  # noqa: E402
from cxrdist.layout import BEST_DIR, COMPARE_DIR, COMPARE_FILE, VAL_PREDICTIONS_FILE, fold_name  # noqa: E402

ANNOTATING, SHIFTED = "a", "b"  # dataset names (the shard directories' names): a annotates F, b does not
SYNTH_SEEDS = {ANNOTATING: 0, SHIFTED: 1}
TRUTH_FILE = "labels_full.csv"
SUFFIX = "norefine"  # --ablate refine's experiment suffix (training/launcher/launch.py ABLATIONS)


def reexpose(png: Path) -> None:
    """Hospital b's detector: the same anatomy and marks, a different look (contrast, floor, gamma, blur)."""
    pixels = np.asarray(Image.open(png), dtype=np.float32) / 255.0
    shifted = 0.2 + 0.65 * pixels**1.5
    image = Image.fromarray(np.rint(shifted * 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(0.8))
    image.save(png, format="PNG", compress_level=1)


def make_hospital(out: Path, name: str, n: int, folds: int) -> Path:
    """Synthesize and prepare one hospital; returns its shard directory (its name is the dataset's name)."""
    from cxrdist.data.ingest.prepare import PrepareOptions, prepare
    from cxrdist.data.synth.dataset import make_synthetic_dataset

    raw = out / "raw" / name
    csv = make_synthetic_dataset(raw, n=n, size=96, seed=SYNTH_SEEDS[name], workers=2, progress=False, planted_coupling=1.0)
    table = pd.read_csv(raw / TRUTH_FILE, dtype={"patient": str, "study": str})  # fraction 1: what training sees = the truth
    if name == SHIFTED:
        for path in table["path"]:
            reexpose(raw / "images" / path)
        table = table.drop(columns=[TARGET])
    table.to_csv(csv, index=False)
    labels = [label for label in LABELS if label in table.columns]
    shards = out / "shards" / name
    prepare(PrepareOptions(source="csv", csv=csv, images=raw / "images", out=shards, folds=folds, max_size=64, fmt="png",
                           samples_per_shard=200, workers=2, labels=",".join(labels), progress=False))
    return shards


def truth_by_key(raw: Path, dataset: str, label: str) -> pd.Series:
    """The synthetic truth of `label` in one hospital, indexed by the namespaced sample key cxrdist writes in CSVs.

    As written in labels_full.csv: blank (not mentioned) is a negative, -1 (uncertain) is NaN (left out of the AUC);
    the planted target is always 0 or 1."""
    table = pd.read_csv(raw / TRUTH_FILE, dtype={"patient": str, "study": str})
    keys = [dataset + NAMESPACE_SEPARATOR + key for key in make_keys(table["path"].tolist())]
    values = table[label].fillna(0).to_numpy(dtype=float)
    return pd.Series(np.where(values == -1, np.nan, values), index=keys, name=label)


def scored_against_truth(predictions: Path, dataset: str, truth: pd.Series) -> ScoredPredictions:
    """One arm's predictions of the truth's label on `dataset`'s rows of a val_predictions.csv, targets from the truth."""
    frame = pd.read_csv(predictions, dtype={"key": str, "dataset": str, "patient": str})
    rows = frame[frame["dataset"] == dataset]
    label = str(truth.name)
    unknown = sorted(set(rows["key"]) - set(truth.index))
    if unknown:
        raise RuntimeError(f"{predictions}: {len(unknown)} keys of dataset {dataset} have no synthetic truth, e.g. {unknown[0]}")
    targets = truth.reindex(rows["key"]).to_numpy()
    return ScoredPredictions(keys=rows["key"].tolist(), patients=rows["patient"].tolist(), labels=[label],
                             probs=rows[[f"prob_{label}"]].to_numpy(np.float64), targets=np.nan_to_num(targets)[:, None],
                             mask=np.isfinite(targets).astype(np.float64)[:, None])


def paired_truth_auc(runs_off: Path, runs_on: Path, dataset: str, truth: pd.Series, resamples: int, seed: int) -> dict:
    """Off (A) vs on (B) on `dataset`'s held-out fold-0 images, scored against the truth: both AUCs, B - A, interval."""
    tables = [scored_against_truth(r / fold_name(0) / BEST_DIR / VAL_PREDICTIONS_FILE, dataset, truth) for r in (runs_off, runs_on)]
    result = compare_tables(*tables, f"{truth.name} on {dataset}", resamples, seed, 0.95)
    label = result["per_label"][str(truth.name)]
    return {"auc_off": label["a"], "auc_on": label["b"], "difference": label["difference"], "interval": label["interval"],
            "images": result["samples"], "patients": result["patients"], "positives": int((tables[0].targets * tables[0].mask).sum())}


def cxrdist(args: list[str], env: dict) -> None:
    result = subprocess.run([sys.executable, "-m", "cxrdist", *args], env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"cxrdist {' '.join(args[:1])} failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def train_pair(shards: dict[str, Path], runs: Path, seed: int, epochs: int, l1: float, backbone: str, resamples: int) -> tuple[Path, Path]:
    """Both arms of one seed through `cxrdist train --ablate refine`, then `cxrdist compare`; (runs off, runs on)."""
    experiment = f"seed{seed}"
    overrides = {
        "data.shards": json.dumps([{"location": str(path), "name": name} for name, path in shards.items()]),
        "output_dir": runs, "experiment": experiment, "seed": seed, "data.img_size": 64, "data.batch_size": 16, "data.workers": 1,
        "data.shuffle_buffer": 200, "model.backbone": backbone, "model.refine.l1": l1, "train.epochs": epochs, "train.eval_every": 0,
        "train.log_every": 50, "logging.progress": "false", "logging.wandb": "disabled",
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cxrdist(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--fold", "0", "--ablate", "refine", "--processes", "1",
             *[f"{k}={v}" for k, v in overrides.items()]], env)
    on, off = runs / experiment, runs / f"{experiment}-{SUFFIX}"
    cxrdist(["compare", str(off), str(on), "--resamples", str(resamples)], env)
    return off, on


def seed_row(out: Path, off: Path, on: Path, seed: int, resamples: int) -> dict:
    """Everything recorded for one seed (see the module docstring)."""
    best = on / fold_name(0) / BEST_DIR
    if ModelCard.read(best).labels != LABELS:  # coupling_stats indexes A in LABELS' order
        raise RuntimeError(f"{best}: the model's labels are not in the order {LABELS}")
    compare = json.loads((on / COMPARE_DIR / COMPARE_FILE).read_text())
    fold = compare["folds"][fold_name(0)]
    unannotated = paired_truth_auc(off, on, SHIFTED, truth_by_key(out / "raw" / SHIFTED, SHIFTED, TARGET), resamples, seed)
    annotated = paired_truth_auc(off, on, ANNOTATING, truth_by_key(out / "raw" / ANNOTATING, ANNOTATING, TARGET), resamples, seed)
    source_at_b = paired_truth_auc(off, on, SHIFTED, truth_by_key(out / "raw" / SHIFTED, SHIFTED, SOURCE), resamples, seed)
    return {
        "seed": seed, "target_at_b": unannotated, "target_at_a": annotated, "source_at_b": source_at_b,
        **coupling_stats(best),
        "compare_macro": fold["macro"], "inert": compare["b"]["inert"].get(fold_name(0)),
    }


def summarise(rows: list[dict]) -> dict:
    """Mean, sample standard deviation and range over the seeds of the figures the report quotes."""
    figures = {
        "target_at_b_off": [r["target_at_b"]["auc_off"] for r in rows], "target_at_b_on": [r["target_at_b"]["auc_on"] for r in rows],
        "target_at_b_difference": [r["target_at_b"]["difference"] for r in rows],
        "target_at_a_difference": [r["target_at_a"]["difference"] for r in rows],
        "coupling": [r.get("coupling", 0.0) for r in rows],
        "compare_macro_difference": [r["compare_macro"]["difference"] for r in rows],
    }
    return {name: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None, "min": float(np.min(v)),
                   "max": float(np.max(v))} for name, v in figures.items()} | {"seeds": [r["seed"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-coupling-hospitals"))
    parser.add_argument("--n", type=int, default=600, help="images per hospital")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--l1", type=float, default=1e-5, help="model.refine.l1 of the arm with the refinement")
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--resamples", type=int, default=500, help="paired patient-bootstrap resamples")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    shards = {name: make_hospital(out, name, args.n, args.folds) for name in (ANNOTATING, SHIFTED)}
    print(f"data: {time.perf_counter() - tic:.0f} s", flush=True)
    rows = []
    for seed in args.seeds:
        tic = time.perf_counter()
        off, on = train_pair(shards, out / "runs", seed, args.epochs, args.l1, args.backbone, args.resamples)
        row = {**seed_row(out, off, on, seed, args.resamples), "seconds": round(time.perf_counter() - tic, 1), "n": args.n,
               "epochs": args.epochs, "l1": args.l1, "backbone": args.backbone}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out / "results.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
    summary = summarise(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
