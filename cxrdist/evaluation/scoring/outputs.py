"""What evaluation writes and the report reads: prediction CSVs, per-model probabilities, metrics JSON."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cxrdist.atomic import atomic_open, atomic_path, atomic_write_json
from cxrdist.layout import CARD_FILE, ENSEMBLE_DIR


def write_predictions_csv(path: Path, ids: dict[str, list], probs: np.ndarray, labels: list[str],
                          targets: np.ndarray | None = None, mask: np.ndarray | None = None, calls: np.ndarray | None = None) -> None:
    """One layout for every prediction table: the id columns (key, path, patient: whichever are given), prob_<label>
    (each followed by call_<label> when `calls`, the (N, C) decisions at an operating point, are given), then, when
    targets are known, target_<label> (blank where `mask` leaves the label out). Written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = len(probs)
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        header = list(ids) + [name for label in labels for name in [f"prob_{label}"] + ([f"call_{label}"] if calls is not None else [])]
        if targets is not None:
            header += [f"target_{label}" for label in labels]
        writer.writerow(header)
        for i in range(rows):
            values = [repr(float(p)) for p in probs[i]]
            row = [column[i] for column in ids.values()] + ([v for pair in zip(values, calls[i]) for v in pair] if calls is not None else values)
            if targets is not None:
                row += [int(targets[i, j]) if mask is None or mask[i, j] > 0 else "" for j in range(len(labels))]
            writer.writerow(row)


def write_fold_probabilities(path: Path, keys: list[str], labels: list[str], per_model: dict[str, np.ndarray],
                             per_model_plain: dict[str, np.ndarray] | None) -> None:
    """Every model's probabilities (for fold agreement in the report); plain arrays, no pickle."""
    arrays = {
        "keys": np.asarray(keys, dtype=str),
        "labels": np.asarray(labels, dtype=str),
        "models": np.asarray(list(per_model), dtype=str),
        "probabilities": np.stack(list(per_model.values())),
    }
    if per_model_plain is not None:
        arrays["probabilities_no_tta"] = np.stack([per_model_plain[name] for name in per_model])
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def load_fold_probabilities(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


def default_out(runs: Path) -> Path:
    """runs/EXP/ensemble for an experiment directory; next to a single model's fold directory otherwise."""
    runs = Path(runs)
    if (runs / CARD_FILE).is_file():  # a best/ directory
        return runs.parent / ENSEMBLE_DIR
    return runs / ENSEMBLE_DIR
