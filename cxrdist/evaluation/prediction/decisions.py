"""`cxrdist predict`'s decisions: each finding called positive or negative at an operating point that `cxrdist evaluate`
chose for the same models (a threshold per label, on the out-of-fold predictions: evaluation/clinical/operating_points.py).

Asymmetric Loss leaves absent findings at probabilities of 0.3-0.4, so reading a probability against 0.5 misleads; a
threshold chosen for a known specificity (or sensitivity) does not. The thresholds come from the ensemble's metrics.json
next to the models (`cxrdist evaluate --runs` of the same directory) and are used only when it scored exactly these models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrdist.errors import UserError
from cxrdist.evaluation.clinical.operating_points import point_names
from cxrdist.evaluation.scoring.outputs import default_out
from cxrdist.layout import METRICS_FILE

POINTS = [name for name, _, _ in point_names()]  # sens@spec90, sens@spec95, spec@sens90, spec@sens95
DEFAULT_POINT = "sens@spec90"
POSITIVE, NEGATIVE = "positive", "negative"


@dataclass
class OperatingPoint:
    name: str  # e.g. "sens@spec90"
    source: Path  # the metrics.json it comes from
    thresholds: dict[str, float | None]  # label -> threshold (None: not reachable, or the label had one class)

    def describe(self) -> str:
        fixed, level = ("specificity", self.name.split("spec")[-1]) if self.name.startswith("sens@") else ("sensitivity", self.name.split("sens")[-1])
        return f"{fixed} {level}% ({self.name})"


def find_operating_point(runs: Path, model_names: list[str], labels: list[str], point: str = DEFAULT_POINT) -> tuple[OperatingPoint | None, str]:
    """(the operating point, "") when `cxrdist evaluate` scored these models with operating points, else (None, why not)."""
    if point not in POINTS:
        raise UserError(f"--operating-point {point!r}: expected one of {', '.join(POINTS)}")
    path = default_out(runs) / METRICS_FILE
    if not path.is_file():
        return None, f"no {path}: run `cxrdist evaluate --runs {runs}` first"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable metrics.json ({err})") from None
    if not isinstance(metrics, dict):
        raise UserError(f"{path}: not a metrics.json of `cxrdist evaluate`")
    if metrics.get("model_names") != model_names or metrics.get("labels") != labels:
        scored = ", ".join(map(str, metrics.get("model_names") or [])) or "unknown models"
        return None, f"{path} scored other models ({scored}) than these ({', '.join(model_names)})"
    per_label = (metrics.get("operating_points") or {}).get("per_label")
    if not per_label:
        return None, f"{path} has no operating points (no out-of-fold predictions when it was evaluated)"
    return OperatingPoint(point, path, {label: (per_label.get(label) or {}).get(point, {}).get("threshold") for label in labels}), ""


def decisions(probs: np.ndarray, labels: list[str], point: OperatingPoint) -> np.ndarray:
    """(N, C) "positive" / "negative" (probability >= threshold, the rule the thresholds were chosen under), "" where the
    label has no threshold."""
    out = np.full(np.shape(probs), "", dtype=object)
    for j, label in enumerate(labels):
        threshold = point.thresholds.get(label)
        if threshold is not None:
            out[:, j] = np.where(np.asarray(probs)[:, j] >= threshold, POSITIVE, NEGATIVE)
    return out
