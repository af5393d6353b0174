"""Names on disk, in one place: split names and the layout of a run directory.

    OUTPUT_DIR/EXPERIMENT/fold-K/{config.yaml, metrics.jsonl, val_predictions.csv, checkpoints/, best/}
    best/{model.safetensors, model.json, val_predictions.csv}
    OUTPUT_DIR/EXPERIMENT/ensemble/{predictions.csv, metrics.json, fold_probabilities.npz}
    OUTPUT_DIR/EXPERIMENT/report/{report.html, figures/}
    OUTPUT_DIR/EXPERIMENT/compare/compare.json  (`cxrdist compare OTHER EXPERIMENT`)
    OUTPUT_DIR/EXPERIMENT-without-NAME/...      (`cxrdist lodo`: an experiment on every dataset but NAME)
    OUTPUT_DIR/EXPERIMENT/lodo/lodo.json        (`cxrdist lodo`: external vs internal AUC per left-out dataset)
"""

from __future__ import annotations

import re
from pathlib import Path

FOLD_PREFIX = "fold-"
TEST_SPLIT = "test"
_FOLD = re.compile(r"fold-(0|[1-9]\d*)")

# one fold's run directory
CONFIG_FILE = "config.yaml"
METRICS_LOG = "metrics.jsonl"
VAL_PREDICTIONS_FILE = "val_predictions.csv"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
# a trained model (best/)
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
SHARED_CHECK_FILE = ".shared-check"  # in a fold's run directory while the ranks check that they all see it
RUN_LOCK_FILE = ".lock"  # held by the training run's rank 0 (training/cluster/run_lock.py)
# an experiment directory
ENSEMBLE_DIR = "ensemble"
REPORT_DIR = "report"
PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"
FOLD_PROBABILITIES_FILE = "fold_probabilities.npz"
COMPARE_DIR = "compare"
EXTERNAL_DIR = "external"  # runs/EXP/external/<dataset name>/: `cxrdist evaluate --external` (predictions.csv, metrics.json)
COMPARE_FILE = "compare.json"
LODO_DIR = "lodo"
LODO_FILE = "lodo.json"
HELD_OUT_INFIX = "-without-"


def fold_name(k: int) -> str:
    return f"{FOLD_PREFIX}{k}"


def fold_index(name: str) -> int | None:
    """K for "fold-K", None for any other name (e.g. "test")."""
    match = _FOLD.fullmatch(name)
    return int(match.group(1)) if match else None


def is_fold(name: str) -> bool:
    return fold_index(name) is not None


def fold_sort_key(name: str) -> tuple[int, str]:
    """fold-2 before fold-10; other names last."""
    k = fold_index(name)
    return (k, name) if k is not None else (1 << 30, name)


def run_dir(output_dir: Path | str, experiment: str, fold: int) -> Path:
    return Path(output_dir) / experiment / fold_name(fold)


def held_out_experiment(experiment: str, dataset: str) -> str:
    """The experiment of a leave-one-dataset-out run: EXPERIMENT trained on every dataset but `dataset`."""
    return f"{experiment}{HELD_OUT_INFIX}{dataset}"


def lodo_summary_file(output_dir: Path | str, experiment: str) -> Path:
    return Path(output_dir) / experiment / LODO_DIR / LODO_FILE


def fold_run_dirs(experiment_dir: Path) -> list[Path]:
    """The fold-K directories of an experiment, in fold order."""
    return sorted((d for d in Path(experiment_dir).iterdir() if d.is_dir() and is_fold(d.name)), key=lambda d: fold_sort_key(d.name))


def fold_best_dirs(experiment_dir: Path) -> list[Path]:
    """The fold-K/best directories of an experiment that hold a trained model (its card), in fold order."""
    return [d / BEST_DIR for d in fold_run_dirs(experiment_dir) if (d / BEST_DIR / CARD_FILE).is_file()]
