"""`cxrdist evaluate`: the fold ensemble with horizontal-flip TTA on a prepared split.

Every fold model's refined logits are turned into probabilities per view (the image and its mirror
image), the views are averaged per model (TTA), and the models' probabilities are averaged (the
ensemble). One pass over the data serves every model and both views: the mirror view is the
decoded, resized, normalised batch flipped along its width, which is exactly what the eval stream's
`hflip=True` produces (normalisation is per pixel, so it commutes with the flip).

Runs in one process or under `accelerate launch` (every rank predicts its disjoint share of the
split; the keyed predictions are gathered and checked against the manifest, as in training).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cxrdist.data.manifest import Manifest, fold_name, load_manifest
from cxrdist.data.shards import read_shard_samples
from cxrdist.data.stream import StreamConfig, eval_loader, eval_num_samples
from cxrdist.errors import UserError
from cxrdist.evaluation.bootstrap import DEFAULT_RESAMPLES, auc_intervals
from cxrdist.evaluation.clinical import clinical_metrics, load_out_of_fold
from cxrdist.evaluation.gathered import Predictions, check_complete, gather_predictions, predict, probabilities
from cxrdist.evaluation.metrics import auc_summary
from cxrdist.model.export import CARD_FILE, load_model
from cxrdist.model.network import CXRNet, place_model
from cxrdist.policy import apply_policy

HFLIP = "/hflip"
ENSEMBLE_DIR = "ensemble"
PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"
FOLD_PROBABILITIES_FILE = "fold_probabilities.npz"


# ---------------------------------------------------------------- the fold models


@dataclass
class FoldModel:
    name: str  # "fold-0", ...
    directory: Path  # the best/ directory
    model: CXRNet
    card: dict


def model_dirs(runs: Path) -> list[Path]:
    """The trained models under `runs`: EXP/fold-*/best, or one fold directory, or one best/ directory."""
    runs = Path(runs)
    if not runs.is_dir():
        raise UserError(f"{runs}: no such runs directory")
    if (runs / CARD_FILE).is_file():
        return [runs]
    if (runs / "best" / CARD_FILE).is_file():
        return [runs / "best"]
    found = [card.parent for card in runs.glob(f"fold-*/best/{CARD_FILE}")]
    if not found:
        raise UserError(f"{runs}: no trained fold models (expected fold-K/best/{CARD_FILE}; has training finished?)")
    return sorted(found, key=lambda d: fold_sort_key(d.parent.name))


def fold_sort_key(name: str) -> tuple[int, str]:
    match = re.fullmatch(r"fold-(\d+)", name)
    return (int(match.group(1)), name) if match else (1 << 30, name)


def load_fold_models(runs: Path, device: torch.device | str = "cpu") -> list[FoldModel]:
    """Every fold's best model, on `device`, in eval mode; they must share one label list."""
    models = []
    for directory in model_dirs(runs):
        model, card = load_model(directory, "cpu")
        name = fold_name(card["fold"]) if card.get("fold") is not None else directory.parent.name
        models.append(FoldModel(name, directory, place_model(model, device).eval(), card))
    labels = models[0].card["labels"]
    for other in models[1:]:
        if other.card["labels"] != labels:
            raise UserError(f"{other.directory}: its labels differ from those of {models[0].directory}; an ensemble needs one label list")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise UserError(f"{runs}: several models claim the same fold ({', '.join(names)})")
    return models


def label_policy(models: list[FoldModel]) -> list[str]:
    """The uncertainty policy the models were trained with, one per label (the targets for AUC)."""
    labels = models[0].card["labels"]
    policies = {tuple(m.card["label_policy"][label] for label in labels) for m in models}
    if len(policies) > 1:
        raise UserError("the fold models were trained with different label policies; evaluate them separately")
    return list(policies.pop())


def preprocessing_key(card: dict) -> tuple:
    return int(card["img_size"]), int(card["in_chans"]), tuple(card["mean"]), tuple(card["std"])


def stream_config(card: dict, batch_size: int, workers: int) -> StreamConfig:
    img_size, in_chans, mean, std = preprocessing_key(card)
    return StreamConfig(img_size=img_size, in_chans=in_chans, mean=mean, std=std, batch_size=batch_size, workers=workers)


def groups_by_preprocessing(models: list[FoldModel]) -> list[list[FoldModel]]:
    """Models that see the same input tensor (image size, channels, normalisation) share one pass."""
    groups: dict[tuple, list[FoldModel]] = {}
    for m in models:
        groups.setdefault(preprocessing_key(m.card), []).append(m)
    return list(groups.values())


def shards_root(models: list[FoldModel], override: Path | None = None) -> Path:
    """The prepared shard directory the models were trained on (or `override`)."""
    if override is not None:
        root = Path(override)
    else:
        roots = {Path(m.card["shards"]).resolve() for m in models}
        if len(roots) > 1:
            raise UserError(f"the fold models were trained on different shard directories ({', '.join(map(str, sorted(roots)))}); pass the one to use")
        root = roots.pop()
    if not (root / "manifest.json").is_file():
        raise UserError(f"{root}: the models' shard directory has no manifest.json (moved? pass the shard directory explicitly)")
    return root


# ---------------------------------------------------------------- views and averaging


class Flipped(nn.Module):
    """The model applied to the horizontally mirrored image (refinement included)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.flip(x, dims=[-1]))


def view_modules(models: list[FoldModel], tta: bool) -> dict[str, nn.Module]:
    """{"fold-0": model, "fold-0/hflip": mirrored model, ...}: the names under which logits are kept."""
    modules: dict[str, nn.Module] = {}
    for m in models:
        modules[m.name] = m.model
        if tta:
            modules[m.name + HFLIP] = Flipped(m.model)
    return modules


def model_probabilities(logits: dict[str, np.ndarray], name: str, tta: bool) -> np.ndarray:
    """One model's float64 probabilities: sigmoid of each view's refined logits, averaged over views."""
    views = [logits[name]] + ([logits[name + HFLIP]] if tta else [])
    return np.mean([probabilities(v) for v in views], axis=0)


def ensemble_probabilities(per_model: dict[str, np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(list(per_model.values())), axis=0)


# ---------------------------------------------------------------- running the split


@dataclass
class SingleProcess:
    """What evaluation needs of an Accelerator when there is one process: no process group, no global state."""

    device: torch.device
    num_processes: int = 1
    process_index: int = 0
    is_main_process: bool = True


def make_accelerator():
    """An Accelerator under `accelerate launch` with several processes, else a plain single-process stand-in."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleProcess(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(kwargs_handlers=handlers)


def progress_batches(loader, total: int, enabled: bool, desc: str):
    with tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True) as bar:
        for batch in loader:
            bar.update(len(batch["key"]) + int(batch.get("corrupt", 0)))
            yield batch


class DevicePlacer:
    """Moves a batch to the device once, however many models and views read it."""

    def __init__(self, device) -> None:
        self.device, self.source, self.placed = device, None, None

    def __call__(self, images: torch.Tensor, _model=None) -> torch.Tensor:
        if images is not self.source:
            self.source, self.placed = images, images.to(self.device, non_blocking=True)
        return self.placed


def predict_split(models: list[FoldModel], root: Path, manifest: Manifest, split: str, tta: bool, batch_size: int, workers: int, accelerator) -> Predictions:
    """Gathered, complete, key-sorted logits of every model and view over the split."""
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    merged: Predictions | None = None
    for group in groups_by_preprocessing(models):
        cfg = stream_config(group[0].card, batch_size, workers)
        loader = eval_loader(root, manifest, [split], cfg, rank, world)
        batches = progress_batches(loader, eval_num_samples(manifest, [split], rank, world), accelerator.is_main_process, f"evaluate {split}")
        local = predict(view_modules(group, tta), batches, device, prepare_input=DevicePlacer(device))
        preds = gather_predictions(accelerator, local)
        check_complete(preds, manifest.num_samples([split]))
        if merged is None:
            merged = preds
        else:
            if preds.keys != merged.keys:
                raise RuntimeError("two preprocessing passes over the same split saw different samples")
            merged.logits.update(preds.logits)
    return merged


def split_metadata(root: Path, manifest: Manifest, split: str) -> dict[str, dict]:
    """key -> the sample's json (path, patient, study, view, labels), read from the split's shards."""
    meta = {}
    for shard in manifest.split(split).shards:
        for key, _image, info in read_shard_samples(Path(root) / shard.file):
            meta[key] = info
    return meta


# ---------------------------------------------------------------- metrics


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) else float(a - b)


def ensemble_metrics(
    per_model: dict[str, np.ndarray],
    per_model_plain: dict[str, np.ndarray] | None,
    raw: np.ndarray,
    labels: list[str],
    policy: list[str],
    groups: list[str],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict:
    """AUCs of the ensemble and of every model (with TTA, and without when `per_model_plain` is given),
    patient-bootstrap intervals for the ensemble, and the gains of ensembling and of TTA."""
    targets_t, mask_t = apply_policy(raw, policy)
    targets, mask = targets_t.numpy(), mask_t.numpy()

    def summary(probs: np.ndarray) -> dict:
        return auc_summary(targets, probs, labels, mask)

    ensemble = summary(ensemble_probabilities(per_model))
    ensemble["interval"] = auc_intervals(targets, ensemble_probabilities(per_model), labels, mask, groups, resamples, seed=seed)
    folds = {name: summary(probs) for name, probs in per_model.items()}
    result = {
        "ensemble": ensemble,
        "models": folds,
        "skipped": ensemble["skipped"],
        "gains": {
            "ensemble_over_mean_model": _difference(ensemble["macro_auc"], _mean([f["macro_auc"] for f in folds.values()])),
            "ensemble_over_best_model": _difference(ensemble["macro_auc"], max((f["macro_auc"] for f in folds.values() if math.isfinite(f["macro_auc"])), default=None)),
            "tta_per_model": None,
            "tta_mean_model": None,
            "tta_ensemble": None,
        },
    }
    if per_model_plain is not None:
        plain = {name: summary(probs) for name, probs in per_model_plain.items()}
        plain_ensemble = summary(ensemble_probabilities(per_model_plain))
        result["ensemble_no_tta"] = plain_ensemble
        result["models_no_tta"] = plain
        per = {name: _difference(folds[name]["macro_auc"], plain[name]["macro_auc"]) for name in folds}
        result["gains"].update(
            tta_per_model=per,
            tta_mean_model=_mean(list(per.values())),
            tta_ensemble=_difference(ensemble["macro_auc"], plain_ensemble["macro_auc"]),
        )
    return result


def split_notes(split: str, models: list[FoldModel]) -> list[str]:
    """Warnings about a split some models were trained on (a fold-K split)."""
    if not split.startswith("fold-"):
        return []
    trained_on = [m.name for m in models if m.name != split]
    if not trained_on:
        return []
    return [f"{split} is training data for {', '.join(trained_on)}: their AUCs and the ensemble's on it are optimistic"]


def json_ready(value):
    """NaN/inf -> null, tuples -> lists, numpy scalars -> Python (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return _finite_or_none(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value


# ---------------------------------------------------------------- writing


def write_predictions(path: Path, keys: list[str], meta: dict[str, dict], probs: np.ndarray, raw: np.ndarray, labels: list[str], policy: list[str]) -> None:
    """key, path, patient, prob_<label> (ensemble), target_<label> (blank where the policy ignores it)."""
    targets, mask = (t.numpy() for t in apply_policy(raw, policy))
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "path", "patient"] + [f"prob_{l}" for l in labels] + [f"target_{l}" for l in labels])
        for i, key in enumerate(keys):
            info = meta.get(key, {})
            target = [int(targets[i, j]) if mask[i, j] > 0 else "" for j in range(len(labels))]
            writer.writerow([key, info.get("path", ""), info.get("patient", "")] + [repr(float(p)) for p in probs[i]] + target)
    os.replace(tmp, path)


def write_fold_probabilities(path: Path, keys: list[str], labels: list[str], per_model: dict[str, np.ndarray], per_model_plain: dict[str, np.ndarray] | None) -> None:
    """Every model's probabilities (for fold agreement in the report); plain arrays, no pickle."""
    arrays = {
        "keys": np.asarray(keys, dtype=str),
        "labels": np.asarray(labels, dtype=str),
        "models": np.asarray(list(per_model), dtype=str),
        "probabilities": np.stack(list(per_model.values())),
    }
    if per_model_plain is not None:
        arrays["probabilities_no_tta"] = np.stack([per_model_plain[name] for name in per_model])
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def load_fold_probabilities(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def write_json(path: Path, data: dict) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def default_out(runs: Path) -> Path:
    """runs/EXP/ensemble for an experiment directory; next to a single model's fold directory otherwise."""
    runs = Path(runs)
    if (runs / CARD_FILE).is_file():  # a best/ directory
        return runs.parent / ENSEMBLE_DIR
    return runs / ENSEMBLE_DIR


# ---------------------------------------------------------------- entry point


def run_evaluate(
    runs: Path,
    split: str = "test",
    tta: bool = True,
    out: Path | None = None,
    batch_size: int = 64,
    workers: int = 2,
    shards: Path | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict:
    """Evaluate the fold ensemble on `split`; on the main process write predictions.csv,
    fold_probabilities.npz and metrics.json to `out` (default runs/ensemble) and return the metrics
    (an empty dict on the other ranks)."""
    if batch_size < 1 or workers < 0:
        raise UserError(f"batch size must be >= 1 and workers >= 0 (got {batch_size}, {workers})")
    accelerator = make_accelerator()
    models = load_fold_models(runs, accelerator.device)
    labels, policy = models[0].card["labels"], label_policy(models)
    root = shards_root(models, shards)
    manifest = load_manifest(root)
    manifest.split(split)
    if manifest.labels != labels:
        raise UserError(f"{root}: the manifest's labels differ from the models' labels")
    preds = predict_split(models, root, manifest, split, tta, batch_size, workers, accelerator)
    if not accelerator.is_main_process:
        return {}
    per_model = {m.name: model_probabilities(preds.logits, m.name, tta) for m in models}
    per_model_plain = {m.name: model_probabilities(preds.logits, m.name, False) for m in models} if tta else None
    meta = split_metadata(root, manifest, split)
    groups = [str(meta.get(key, {}).get("patient") or key) for key in preds.keys]
    metrics = ensemble_metrics(per_model, per_model_plain, preds.raw, labels, policy, groups, resamples, seed)
    targets, mask = (t.numpy() for t in apply_policy(preds.raw, policy))
    oof = load_out_of_fold([m.directory for m in models], labels)
    metrics.update(clinical_metrics(oof, targets, ensemble_probabilities(per_model), mask, labels, groups, resamples, seed))
    out = Path(out) if out is not None else default_out(runs)
    metrics = {
        "split": split,
        "tta": tta,
        "num_samples": len(preds.keys),
        "num_patients": len(set(groups)),
        "corrupt": preds.corrupt,
        "labels": labels,
        "label_policy": dict(zip(labels, policy)),
        "model_names": [m.name for m in models],
        "model_dirs": {m.name: str(m.directory) for m in models},
        "shards": str(root),
        "device": str(accelerator.device),
        "world_size": accelerator.num_processes,
        "notes": split_notes(split, models),
        "out": str(out),
        **metrics,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / PREDICTIONS_FILE, preds.keys, meta, ensemble_probabilities(per_model), preds.raw, labels, policy)
    write_fold_probabilities(out / FOLD_PROBABILITIES_FILE, preds.keys, labels, per_model, per_model_plain)
    write_json(out / METRICS_FILE, metrics)
    return json_ready(metrics)
