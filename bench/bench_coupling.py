"""Does the learned label coupling add anything? The planted-coupling benchmark, refinement on vs off.

    python bench/bench_coupling.py [--n 900] [--epochs 8] [--seeds 0 1] [--l1 1e-3 1e-4 1e-5] [--out DIR]

Data: `cxrdist synth --planted-coupling F` (cxrdist/data/synth/planted.py): "Planted Target" is a noisy copy
of Pleural Effusion with no mark of its own, labelled for a fraction F of the patients (-1 elsewhere,
left out of the loss by the training policy "ignore"), plus two independent controls. Training sees
that table; the held-out fold-0 is scored against the fully labelled table (labels_full.csv, the same
images and fold assignment). For each seed: the ablation (model.refine.enabled=false) and the
refinement at every `--l1`, same seed, same folds. Reported per run: the target's AUC on the held-out
fold, the macro AUC over the original labels, the learned coupling Pleural Effusion -> Planted Target,
its rank among the couplings into the target and among all couplings, and the fraction of exact zeros
among the couplings with no reason to exist (into or out of a control, or into the target from
another label). One process per run on the CPU; results as JSON lines in OUT/results.jsonl.
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
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxrdist.data.synth.planted import CONTROLS, SOURCE, TARGET  # noqa: E402
from cxrdist.labels import CHEXPERT_LABELS  # noqa: E402
from cxrdist.layout import BEST_DIR, fold_name  # noqa: E402

LABELS = [*CHEXPERT_LABELS, TARGET, *CONTROLS]


def make_data(out: Path, n: int, fraction: float, folds: int) -> tuple[Path, Path]:
    from cxrdist.data.ingest.prepare import PrepareOptions, prepare
    from cxrdist.data.synth.dataset import make_synthetic_dataset

    raw = out / "raw"
    csv = make_synthetic_dataset(raw, n=n, size=96, seed=11, workers=2, progress=False, planted_coupling=fraction)
    common = dict(source="csv", images=raw / "images", folds=folds, max_size=64, fmt="png", samples_per_shard=200, workers=2,
                  labels=",".join(LABELS), progress=False)
    assignment = out / "folds.csv"
    prepare(PrepareOptions(csv=raw / "labels_full.csv", out=None, folds_only=assignment, **common))
    prepare(PrepareOptions(csv=csv, out=out / "train-shards", folds_from=assignment, **common))
    prepare(PrepareOptions(csv=raw / "labels_full.csv", out=out / "eval-shards", folds_from=assignment, **common))
    return out / "train-shards", out / "eval-shards"


def train(shards: Path, runs: Path, name: str, seed: int, epochs: int, refine: bool, l1: float, backbone: str) -> Path:
    overrides = {
        "data.shards": shards, "output_dir": runs, "experiment": name, "seed": seed, "fold": 0, "data.img_size": 64,
        "data.batch_size": 16, "data.workers": 1, "data.shuffle_buffer": 200, "data.label_policy": "ignore",
        "model.backbone": backbone, "model.refine.enabled": str(refine).lower(), "model.refine.l1": l1,
        "train.epochs": epochs, "train.lr": 3e-3, "train.warmup_steps": 20, "train.ema_decay": 0.98, "train.eval_every": 0,
        "train.log_every": 50, "logging.progress": "false", "logging.wandb": "disabled",
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "cxrdist" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           *[f"{k}={v}" for k, v in overrides.items()]]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"training {name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return runs / name


def coupling_stats(best: Path) -> dict:
    with safe_open(str(best / "model.safetensors"), framework="pt") as handle:
        if "refine.weight" not in handle.keys():
            return {}
        a = handle.get_tensor("refine.weight").float().numpy()
    s, t = LABELS.index(SOURCE), LABELS.index(TARGET)
    controls = [LABELS.index(c) for c in CONTROLS]
    off = ~np.eye(len(LABELS), dtype=bool)
    unsupported = np.zeros_like(off)
    unsupported[controls, :] = unsupported[:, controls] = True
    unsupported[:, t] = True
    unsupported[s, t] = False
    unsupported &= off
    into_target = np.abs(a[:, t])
    into_target[t] = -1
    magnitude = np.where(off, np.abs(a), -1)
    value = float(a[s, t])
    return {
        "coupling": value,
        # A pruned (zero) coupling has no rank: it ties with every other zero.
        "rank_into_target": int((into_target > abs(value)).sum()) + 1 if abs(value) > 1e-6 else None,
        "rank_overall": int((magnitude > abs(value)).sum()) + 1 if abs(value) > 1e-6 else None,
        "nonzero": int((np.abs(a[off]) > 1e-6).sum()),
        "couplings": int(off.sum()),
        "unsupported_zero_fraction": float((np.abs(a[unsupported]) <= 1e-6).mean()),
    }


def score(run: Path, eval_shards: Path) -> dict:
    from cxrdist.evaluation.prediction.ensemble import run_evaluate

    # eval-shards hold the same images and folds as the training shards, fully labelled: another dataset identity on purpose
    metrics = run_evaluate(run, split=fold_name(0), tta=False, out=run / "eval-full", batch_size=64, workers=0, shards=eval_shards, resamples=10,
                           check_dataset=False)
    per_label = metrics["ensemble"]["per_label"]
    original = [per_label[label] for label in CHEXPERT_LABELS if per_label.get(label) is not None]
    return {"target_auc": per_label[TARGET], "macro_auc_original": float(np.mean(original)), "macro_auc_all": metrics["ensemble"]["macro_auc"],
            "control_aucs": [per_label[c] for c in CONTROLS]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-coupling"))
    parser.add_argument("--n", type=int, default=900)
    parser.add_argument("--fraction", type=float, default=0.1, help="labelled fraction of the planted target (patients)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--l1", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5])
    parser.add_argument("--backbone", default="test_resnet")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    train_shards, eval_shards = make_data(args.out, args.n, args.fraction, args.folds)
    results = args.out / "results.jsonl"
    arms = [("off", False, 0.0)] + [(f"l1={l1:g}", True, l1) for l1 in args.l1]
    for seed in args.seeds:
        for arm, refine, l1 in arms:
            tic = time.perf_counter()
            run = train(train_shards, args.out / "runs", f"{arm}-seed{seed}", seed, args.epochs, refine, l1, args.backbone)
            row = {"arm": arm, "seed": seed, "l1": l1, "refine": refine, **score(run, eval_shards), **coupling_stats(run / fold_name(0) / BEST_DIR),
                   "seconds": round(time.perf_counter() - tic, 1), "n": args.n, "fraction": args.fraction, "epochs": args.epochs,
                   "backbone": args.backbone}
            print(json.dumps(row), flush=True)
            with open(results, "a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
