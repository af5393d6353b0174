"""What a clinical team asks beyond AUC: operating points and calibration, in metrics.json.

Thresholds and temperatures are fitted on the out-of-fold predictions: each fold model's
predictions on the fold it was validated on (its best/val_predictions.csv, written by training),
pooled, and scored against that fold's raw labels from the shards through the same `scored_targets`
as the evaluated split. They are then applied to the evaluated split's ensemble probabilities. The out-of-fold
predictions are single models without TTA; the evaluated ones are the TTA ensemble, which is a
little less spread out, so the out-of-fold figures are reported next to the applied ones.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist.data.location import display, join
from cxrdist.data.manifest import Manifest
from cxrdist.data.shards import iter_tar_members
from cxrdist.data.stream import parse_labels
from cxrdist.data.datasets import DatasetShard
from cxrdist.errors import UserError
from cxrdist.evaluation.clinical.calibration import apply_platt, apply_temperature, calibration_summary, fit_platts, fit_temperatures, platt_notes
from cxrdist.evaluation.clinical.calibration_causes import out_of_fold_stats
from cxrdist.evaluation.clinical.operating_points import operating_points
from cxrdist.evaluation.scoring.bootstrap import DEFAULT_RESAMPLES
from cxrdist.layout import VAL_PREDICTIONS_FILE
from cxrdist.labels.policy import apply_policy

OutOfFold = tuple[np.ndarray, np.ndarray, np.ndarray]  # targets, probabilities, mask (N, C) each


def scored_targets(raw: np.ndarray, policy: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(targets, mask), float32 (N, C), that the evaluated split and the out-of-fold set are both scored against:
    the raw labels (1 / 0 / -1 / NaN) under `policy`, the per-label form of the fixed evaluation rule
    (cxrdist/labels/eval_targets.py) that `cxrdist evaluate` scores its AUCs with, whatever the models trained with."""
    targets, mask = apply_policy(raw, policy)
    return targets.numpy(), mask.numpy()


def split_raw_labels(root, manifest: Manifest, split: str) -> dict[str, np.ndarray]:
    """{key: raw labels} of a split, from the shards' json members (the image data is skipped, not read)."""
    found: dict[str, np.ndarray] = {}
    for shard in manifest.split(split).shards:
        path = shard.location if isinstance(shard, DatasetShard) else join(root, shard.file)
        members = ((s.key, None, s.meta) for s in shard.samples()) if isinstance(shard, DatasetShard) else iter_tar_members(path, only="json")
        try:
            for key, _, data in members:
                found[key] = parse_labels(json.loads(data), len(manifest.labels))
        except (tarfile.TarError, OSError, ValueError, KeyError) as err:
            raise UserError(f"{display(path)}: unreadable shard ({err}); re-run `cxrdist prepare`") from None
    return found


def read_val_predictions(path: Path, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(keys, probabilities (N, C)) of one model's val_predictions.csv."""
    table = pd.read_csv(path, dtype={"key": str})
    missing = [c for c in ["key"] + [f"prob_{label}" for label in labels] if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing columns {', '.join(missing[:3])}")
    return table["key"].tolist(), table[[f"prob_{label}" for label in labels]].to_numpy(dtype=np.float64)


def load_out_of_fold(models: Sequence, root: Path, manifest: Manifest, policy: Sequence[str]) -> OutOfFold | None:
    """The pooled out-of-fold predictions: every fold model's probabilities on the fold it was validated on (its
    best/val_predictions.csv), scored against that fold's raw labels from the shards; None if a model has no such file."""
    paths = [Path(m.directory) / VAL_PREDICTIONS_FILE for m in models]
    if not paths or not all(p.is_file() for p in paths):
        return None
    probs, raw = [], []
    for model, path in zip(models, paths):
        keys, model_probs = read_val_predictions(path, manifest.labels)
        known = split_raw_labels(root, manifest, model.name)
        unknown = [key for key in keys if key not in known]
        if unknown:
            raise UserError(f"{path}: {len(unknown)} keys (first {unknown[0]!r}) are not in split {model.name} of {display(root)}")
        probs.append(model_probs)
        raw.append(np.array([known[key] for key in keys], dtype=np.float32).reshape(len(keys), len(manifest.labels)))
    targets, mask = scored_targets(np.concatenate(raw), policy)
    return targets, np.concatenate(probs), mask


def clinical_metrics(
    oof: OutOfFold | None,
    targets: np.ndarray,
    probs: np.ndarray,
    mask: np.ndarray,
    labels: Sequence[str],
    groups: Sequence,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict:
    """{"calibration": ..., "operating_points": ... or None}: the evaluated ensemble's calibration, and,
    when out-of-fold predictions exist, thresholds and temperatures fitted on them and applied here."""
    result: dict = {"calibration": {"ensemble": calibration_summary(targets, probs, mask, labels)}, "operating_points": None}
    if oof is None:
        result["calibration"]["note"] = "no val_predictions.csv in the models' best/ directories: no operating points or temperatures"
        return result
    temperatures, platt = fit_temperatures(*oof, labels), fit_platts(*oof, labels)
    result["calibration"].update(
        temperature=temperatures,
        temperature_scaled=calibration_summary(targets, apply_temperature(probs, [temperatures[label] for label in labels]), mask, labels),
        platt=platt,  # {label: [a, b]}: sigmoid(a * logit(p) + b)
        platt_notes=platt_notes(*oof, labels),  # {label: why its slope sits on the cap}, only for those labels
        platt_scaled=calibration_summary(targets, apply_platt(probs, [platt[label] for label in labels]), mask, labels),
        out_of_fold=calibration_summary(*oof, labels),
        out_of_fold_images=len(oof[0]),
        out_of_fold_labels=out_of_fold_stats(*oof, labels),  # what a temperature at its bound is explained by (calibration_causes.py)
    )
    result["operating_points"] = operating_points(oof, (targets, probs, mask), labels, groups, resamples, seed)
    result["operating_points"]["out_of_fold_images"] = len(oof[0])
    return result
