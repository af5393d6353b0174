"""Keyed, gathered evaluation: every rank predicts its disjoint share of the eval shards, then all
(key, logits, raw labels) are gathered, checked for completeness, sorted by key and scored once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from cxrdist.data.attributes import csv_columns
from cxrdist.evaluation.scoring import outputs
from cxrdist.evaluation.scoring.by_dataset import per_dataset_auc
from cxrdist.evaluation.scoring.metrics import auc_summary
from cxrdist.labels.policy import apply_policy


@dataclass
class Predictions:
    keys: list[str]
    logits: dict[str, np.ndarray]  # model name -> (N, C) float32
    raw: np.ndarray  # (N, C) raw labels, NaN = blank
    corrupt: int = 0
    meta: dict[str, list] = field(default_factory=dict)  # per-sample fields of the shard json (patient, path, attributes), key order

    def sorted(self) -> Predictions:
        order = np.argsort(np.asarray(self.keys), kind="stable")
        return Predictions(
            [self.keys[i] for i in order],
            {name: value[order] for name, value in self.logits.items()},
            self.raw[order],
            self.corrupt,
            {name: [values[i] for i in order] for name, values in self.meta.items()},
        )


class IncompleteEvaluation(RuntimeError):
    pass


def pad_batch(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Zero-pad a short batch to `size`. A sample's logits then do not depend on how the samples
    were batched (kernels pick their algorithm by batch size; within one size the result is
    position-independent), so one process and N processes produce bitwise-equal predictions."""
    if size is None or len(images) >= size:
        return images
    return torch.cat([images, images.new_zeros((size - len(images), *images.shape[1:]))])


@torch.no_grad()
def predict(models: dict[str, torch.nn.Module], loader, device, autocast=contextlib.nullcontext, prepare_input=None,
            pad_to: int | None = None) -> Predictions:
    """Run every model over the loader (one pass over the data); logits come back as fp32 numpy."""
    for model in models.values():
        model.eval()
    keys, raws, corrupt, meta = [], [], 0, {}
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in models}
    for batch in loader:
        count = len(batch["key"])
        if count == 0:
            corrupt += int(batch.get("corrupt", 0))
            continue
        padded = pad_batch(batch["image"], pad_to)
        with autocast():
            for name, model in models.items():
                images = prepare_input(padded, model) if prepare_input else padded.to(device)
                outputs[name].append(model(images)[:count].float().cpu().numpy())
        keys.extend(batch["key"])
        raws.append(batch["labels_raw"].numpy())
        for name, values in batch.get("meta", {}).items():
            meta.setdefault(name, []).extend(values)
        corrupt += int(batch.get("corrupt", 0))
    n_labels = raws[0].shape[1] if raws else 0
    return Predictions(
        keys,
        {name: np.concatenate(v) if v else np.zeros((0, n_labels), np.float32) for name, v in outputs.items()},
        np.concatenate(raws) if raws else np.zeros((0, n_labels), np.float32),
        corrupt,
        meta,
    )


def gather_predictions(accelerator, local: Predictions) -> Predictions:
    """All ranks' predictions on every rank (pickled objects: ranks may hold different counts)."""
    if accelerator.num_processes == 1:
        return local.sorted()
    parts = gather_object([local])
    merged = Predictions(
        [k for p in parts for k in p.keys],
        {name: np.concatenate([p.logits[name] for p in parts if len(p.keys)] or [local.logits[name]]) for name in local.logits},
        np.concatenate([p.raw for p in parts if len(p.keys)] or [local.raw]),
        sum(p.corrupt for p in parts),
        {name: [v for p in parts for v in p.meta.get(name, [""] * len(p.keys))] for name in set().union(*(p.meta for p in parts))},
    )
    return merged.sorted()


def check_complete(preds: Predictions, expected: int) -> None:
    """Every sample exactly once: no key twice, none missing (corrupt ones are accounted for)."""
    unique = len(set(preds.keys))
    if unique != len(preds.keys):
        raise IncompleteEvaluation(f"evaluation saw {len(preds.keys) - unique} samples twice")
    if unique + preds.corrupt != expected:
        raise IncompleteEvaluation(f"evaluation saw {unique} samples (+{preds.corrupt} corrupt), the manifest lists {expected}")


def probabilities(logits: np.ndarray) -> np.ndarray:
    """float64 sigmoid, used for both the metrics and the CSV so they agree exactly."""
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def score(preds: Predictions, labels: list[str], policy: list[str], loss_fn=None, loss_policy: list[str] | None = None) -> dict[str, dict]:
    """AUCs against `policy`'s targets (the evaluation targets); the loss against `loss_policy`'s
    (the training policy: the loss is the training objective), `policy`'s when not given."""
    targets, mask = apply_policy(preds.raw, policy)
    loss_targets, loss_mask = apply_policy(preds.raw, loss_policy) if loss_policy is not None else (targets, mask)
    results = {}
    for name, logits in preds.logits.items():
        summary = auc_summary(targets.numpy(), probabilities(logits), labels, mask.numpy())
        if "dataset" in preds.meta:
            summary["per_dataset"] = per_dataset_auc(targets.numpy(), probabilities(logits), labels, mask.numpy(), preds.meta["dataset"])
        if loss_fn is not None and len(logits):
            summary["loss"] = float(loss_fn(torch.from_numpy(logits), loss_targets, loss_mask))
        results[name] = summary
    return results


def write_predictions_csv(path: Path, preds: Predictions, model: str, labels: list[str], policy: list[str]) -> None:
    """key[, dataset][, patient][, attr_<attribute>...], prob_<label>, target_<label> of one model; written atomically. Targets
    are blank where `policy` (the evaluation targets) leaves them out; the patient column lets `cxrdist compare` resample
    patients, the attribute columns let anyone redo the subgroup audit."""
    targets, mask = apply_policy(preds.raw, policy)
    ids = {"key": preds.keys, **{name: preds.meta[name] for name in ("dataset", "patient") if name in preds.meta},
           **csv_columns(preds.meta.get("attributes", []))}
    outputs.write_predictions_csv(path, ids, probabilities(preds.logits[model]), labels, targets.numpy(), mask.numpy())
