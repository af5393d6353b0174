"""Macro AUC per dataset (over the labels each annotates) next to the pooled one, for runs on several datasets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxrdist.evaluation.scoring.metrics import auc_summary


def per_dataset_auc(targets: np.ndarray, scores: np.ndarray, labels: Sequence[str], mask: np.ndarray, datasets: Sequence[str]) -> dict:
    """{dataset: {"macro_auc", "labels": how many labels have an AUC there, "annotated": how many it scores at all, "evaluated": rows}}
    in first-seen order, then "pooled": the same over every row (the macro AUC of the whole evaluation)."""
    datasets = np.asarray(datasets, dtype=str)
    result = {}
    for name in dict.fromkeys(datasets.tolist()):
        rows = datasets == name
        result[name] = counted(auc_summary(targets[rows], scores[rows], labels, mask[rows]), mask[rows])
    result["pooled"] = counted(auc_summary(targets, scores, labels, mask), mask)
    return result


def counted(summary: dict, mask: np.ndarray) -> dict:
    valid = [v for v in summary["per_label"].values() if v is not None]
    return {"macro_auc": summary["macro_auc"], "labels": len(valid), "annotated": int((mask.sum(axis=0) > 0).sum()),
            "evaluated": summary["evaluated"]}


def summary_line(per_dataset: dict) -> str:
    """'a 0.8123 (5 labels), b 0.7011 (3 labels), pooled 0.7710 (8 labels)' for the log."""
    return ", ".join(f"{name} {entry['macro_auc']:.4f} ({entry['labels']} labels)" for name, entry in per_dataset.items())
