"""`cxrdist evaluate`: the fold ensemble with horizontal-flip TTA on a prepared split (the fold models and
their views are in evaluation/prediction/models.py, the files it writes in evaluation/scoring/outputs.py).

Every fold model's refined logits are turned into probabilities per view (the image and its mirror
image), the views are averaged per model (TTA), and the models' probabilities are averaged (the
ensemble). One pass over the data serves every model and both views: the mirror view is the
decoded, resized, normalised batch flipped along its width, which is exactly what the eval stream's
`hflip=True` produces (normalisation is per pixel, so it commutes with the flip).

Runs in one process or under `accelerate launch` (every rank predicts its disjoint share of the
split; the keyed predictions are gathered and checked against the manifest, as in training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrdist import distributed
from cxrdist.atomic import check_not_an_input, check_writable_dir, json_ready, written_together
from cxrdist.data.attributes import csv_columns, specs_of
from cxrdist.data.location import Location, display, resolved
from cxrdist.data.manifest import Manifest, check_same_dataset
from cxrdist.data.datasets import DatasetEntry, load_recorded
from cxrdist.evaluation.scoring.by_dataset import per_dataset_auc
from cxrdist.evaluation.prediction.external import LeftOut, check_not_trained_on, check_scorable, choose_out, open_external
from cxrdist.data.stream import eval_loader, eval_num_samples
from cxrdist.distributed import world_size
from cxrdist.errors import UserError
from cxrdist.labels.eval_targets import evaluation_policy, rule_from_cards, training_policies
from cxrdist.evaluation.clinical.clinical_metrics import clinical_metrics, load_out_of_fold, scored_targets
from cxrdist.evaluation.clinical.subgroup_rates import audit_aucs, finish_audit
from cxrdist.evaluation.prediction.coverage import say_coverage
from cxrdist.evaluation.scoring.bootstrap import DEFAULT_RESAMPLES, auc_intervals
from cxrdist.evaluation.scoring.gathered import Predictions, check_complete, gather_predictions, predict
from cxrdist.evaluation.scoring.metrics import auc_summary
from cxrdist.evaluation.scoring.outputs import write_fold_probabilities, write_json, write_predictions_csv
from cxrdist.evaluation.scoring.subgroups import MIN_PATIENTS, available_attributes, check_intersections, intersection_pairs, summary_line
from cxrdist.evaluation.prediction.models import (  # noqa: F401 - FoldModel and stream_config are part of this command's interface
    FoldModel,
    ensemble_probabilities,
    groups_by_preprocessing,
    load_fold_models,
    model_probabilities,
    shards_root,
    stream_config,
    view_modules,
)
from cxrdist.layout import FOLD_PROBABILITIES_FILE, METRICS_FILE, PREDICTIONS_FILE, is_fold
from cxrdist.log import get_logger, progress
from cxrdist.text import count
from cxrdist.labels.policy import apply_policy

LOG = get_logger("evaluate")

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
    if world_size() <= 1:
        return SingleProcess(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return distributed.make_accelerator()


def progress_batches(loader, total: int, enabled: bool, desc: str):
    with progress(total, desc, "img", enabled) as bar:
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


def predict_split(models: list[FoldModel], root: Location, manifest: Manifest, split: str, tta: bool, batch_size: int, workers: int,
                  accelerator) -> Predictions:
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


# ---------------------------------------------------------------- metrics


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
    resampled: np.ndarray | None = None,
) -> dict:
    """AUCs of the ensemble and of every model (with TTA, and without when `per_model_plain` is given),
    patient-bootstrap intervals for the ensemble (from `resampled`, its resampled AUCs, when the audit made them),
    and the gains of ensembling and of TTA."""
    targets_t, mask_t = apply_policy(raw, policy)
    targets, mask = targets_t.numpy(), mask_t.numpy()

    def summary(probs: np.ndarray) -> dict:
        return auc_summary(targets, probs, labels, mask)

    ensemble = summary(ensemble_probabilities(per_model))
    ensemble["interval"] = auc_intervals(targets, ensemble_probabilities(per_model), labels, mask, groups, resamples, seed=seed, resampled=resampled)
    folds = {name: summary(probs) for name, probs in per_model.items()}
    result = {
        "ensemble": ensemble,
        "models": folds,
        "skipped": ensemble["skipped"],
        "gains": {
            "ensemble_over_mean_model": _difference(ensemble["macro_auc"], _mean([f["macro_auc"] for f in folds.values()])),
            "ensemble_over_best_model": _difference(ensemble["macro_auc"],
                                                    max((f["macro_auc"] for f in folds.values() if math.isfinite(f["macro_auc"])), default=None)),
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
    if not is_fold(split):
        return []
    trained_on = [m.name for m in models if m.name != split]
    if not trained_on:
        return []
    return [f"{split} is training data for {', '.join(trained_on)}: their AUCs and the ensemble's on it are optimistic"]


def result_line(metrics: dict) -> str:
    """The console line of an evaluation: what was scored (an external dataset by name, location and identity), the split,
    the macro AUC and how many labels it averages (those with both classes: the count shown is the count used)."""
    scored = [label for label, auc in metrics["ensemble"]["per_label"].items() if auc is not None]
    auc = f"ensemble macro AUC {metrics['ensemble']['macro_auc']:.4f} over {count(len(scored), 'label')}"
    dataset = metrics.get("external_dataset")
    if not dataset:
        return f"{auc} on {metrics['split']}; wrote {metrics['out']}"
    lacking = f"; the model has no {', '.join(dataset['not_in_model'])}" if dataset["not_in_model"] else ""
    return (f"external dataset {dataset['name']} ({dataset['location']}, id {dataset['identity']}), split {dataset['split']}: {auc} "
            f"(of the model's {len(metrics['labels'])}{lacking}); wrote {metrics['out']}")


# ---------------------------------------------------------------- entry point


def run_evaluate(
    runs: Path,
    split: str = "test",
    tta: bool = True,
    out: Path | None = None,
    batch_size: int = 64,
    workers: int = 2,
    shards: Location | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    eval_targets: str | None = None,
    check_dataset: bool = True,
    external: Location | DatasetEntry | None = None,
    leave_out_overlap: bool = False,
    min_patients: int = MIN_PATIENTS,
    intersections: Sequence = (),
) -> dict:
    """Evaluate the fold ensemble on `split` against `eval_targets` (default: what the cards record,
    else ignore_uncertain; never the training policy); on the main process write predictions.csv,
    fold_probabilities.npz and metrics.json to `out` (default runs/ensemble) and return the metrics
    (an empty dict on the other ranks). The subgroup audit (metrics["subgroups"]) reports groups of at least
    `min_patients` patients and crosses the attribute pairs `intersections` ("sex,age")."""
    if batch_size < 1 or workers < 0:
        raise UserError(f"batch size must be >= 1 and workers >= 0 (got {batch_size}, {workers})")
    accelerator = make_accelerator()
    models = load_fold_models(runs, accelerator.device)
    card = models[0].card
    labels = card.labels
    rule = rule_from_cards([m.card for m in models], eval_targets)
    policy = evaluation_policy(rule, len(labels))
    train_root = root = shards_root(models, shards)
    train_manifest = manifest = load_recorded(root, labels)
    if manifest.labels != labels:
        raise UserError(f"{display(root)}: the manifest's labels differ from the models' labels")
    for m in models if check_dataset else ():  # off only in code that scores the same images under other labels (a benchmark)
        check_same_dataset(m.card.dataset, manifest, root, str(m.directory))
    dataset, left_out = None, LeftOut(set(), 0)
    if external is not None:
        dataset = open_external(external, labels, card.vocabulary.harmonised)
        root, manifest = dataset.root, dataset.manifest
        left_out = check_not_trained_on(manifest, train_root, train_manifest, leave_out_overlap)
    manifest.split(split)
    pairs = intersection_pairs(intersections)
    check_intersections(pairs, available_attributes(specs_of(manifest), len(getattr(manifest, "entries", ())) > 1))
    if min_patients < 1:
        raise UserError(f"--min-group-patients {min_patients}: a group needs at least 1 patient to be reported")
    out = choose_out(runs, out, dataset, split)
    check_writable_dir(out)
    check_not_an_input(out, [m.directory for m in models])
    preds = predict_split(models, root, manifest, split, tta, batch_size, workers, accelerator)
    if not accelerator.is_main_process:
        return {}
    preds = left_out.apply(preds)
    notes = [note for note in [say_coverage("evaluate", runs, [m.card for m in models]), left_out.note()] if note]
    if left_out.keys:
        LOG.warning(f"cxrdist evaluate: {notes[-1]}")
    for note in [] if external is not None else split_notes(split, models):
        LOG.warning(f"cxrdist evaluate: warning: {note}")
        notes.append(note)
    per_model = {m.name: model_probabilities(preds.logits, m.name, tta) for m in models}
    per_model_plain = {m.name: model_probabilities(preds.logits, m.name, False) for m in models} if tta else None
    groups = [str(patient or key) for key, patient in zip(preds.keys, preds.meta["patient"])]
    targets, mask = scored_targets(preds.raw, policy)
    if dataset is not None:
        check_scorable(dataset, split, targets, mask, labels)
    scores = ensemble_probabilities(per_model)
    audit = audit_aucs(labels, targets, scores, mask, groups, preds.meta["attributes"], specs_of(manifest), preds.meta["dataset"],
                       min_patients=min_patients, resamples=resamples, seed=seed, intersections=pairs)
    metrics = ensemble_metrics(per_model, per_model_plain, preds.raw, labels, policy, groups, resamples, seed,
                               resampled=audit.whole if audit is not None else None)  # the audit's pass made the whole's too
    metrics["per_dataset"] = per_dataset_auc(targets, scores, labels, mask, preds.meta["dataset"])
    oof = load_out_of_fold(models, train_root, train_manifest, policy)
    metrics.update(clinical_metrics(oof, targets, scores, mask, labels, groups, resamples, seed))
    metrics["subgroups"] = finish_audit(audit, targets, scores, mask, metrics.get("operating_points"))
    LOG.info(f"cxrdist evaluate: {summary_line(metrics['subgroups']) or 'note: ' + metrics['subgroups']['notes'][0]}")
    metrics = {
        "split": split,
        "tta": tta,
        "num_samples": len(preds.keys),
        "num_patients": len(set(groups)),
        "corrupt": preds.corrupt,
        "labels": labels,
        "eval_targets": rule,
        "training_policy": training_policies({m.name: m.card for m in models}),
        "model_names": [m.name for m in models],
        "model_dirs": {m.name: str(m.directory) for m in models},
        "shards": resolved(root),
        "external": external is not None,
        "left_out": {"images": len(left_out.keys), "patients": left_out.patients},
        "external_dataset": dataset.record(split) if dataset is not None else None,
        "device": str(accelerator.device),
        "world_size": accelerator.num_processes,
        "notes": notes,
        "out": str(out),
        **metrics,
    }
    out.mkdir(parents=True, exist_ok=True)
    ids = {"key": preds.keys, "dataset": preds.meta["dataset"], "path": preds.meta["path"], "patient": preds.meta["patient"],
           **csv_columns(preds.meta.get("attributes", []))}
    with written_together(out / PREDICTIONS_FILE, out / FOLD_PROBABILITIES_FILE, out / METRICS_FILE) as (predictions, probabilities, scores):
        write_predictions_csv(predictions, ids, ensemble_probabilities(per_model), labels, targets, mask)
        write_fold_probabilities(probabilities, preds.keys, labels, per_model, per_model_plain)
        write_json(scores, metrics)
    return json_ready(metrics)
