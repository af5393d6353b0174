"""Why a label's temperature fit ended at a bound of its range, measured on the out-of-fold predictions it was fitted on.

A temperature T maps p to sigmoid(logit(p) / T): it stretches or flattens the logits about 0 (p = 0.5) and cannot move
their centre. It ends at a bound for one of three measured reasons, checked in this order:
- too few positives: fewer than FEW_CASES positives out of fold, too few to fit anything;
- shift: the mean out-of-fold probability lies more than SHIFT from the out-of-fold prevalence (Asymmetric Loss leaves
  absent findings at 0.3-0.5), so the fit flattens the logits toward 0.5 as far as it may (Platt scaling moves them);
- spread: the probabilities' spread does not fit how well they rank the cases: flattened toward a constant when they
  barely rank them (out-of-fold AUC below WEAK_AUC), stretched as far as the range allows when they are too narrow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxrdist.evaluation.clinical.calibration import LOG_TEMPERATURE_BOUNDS, logit, per_label
from cxrdist.evaluation.scoring.bootstrap import FEW_CASES
from cxrdist.evaluation.scoring.metrics import label_auc

SHIFT = 0.10  # |mean probability - prevalence| above this is a shift, whatever the spread
WEAK_AUC = 0.65  # below this the out-of-fold scores barely rank the cases
NEAR_BOUND = 0.1  # a log-temperature within this of a bound counts as at the bound (the search stops short of a flat optimum)


def label_stats(targets: np.ndarray, probs: np.ndarray) -> dict | None:
    """What the calibration of one label's known entries rests on: images, positives, prevalence, mean probability,
    the spread of the logits (standard deviation) and the AUC (None with one class)."""
    y, p = np.asarray(targets, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    if len(y) == 0:
        return None
    return {
        "images": int(len(y)),
        "positives": int((y > 0).sum()),
        "prevalence": float(np.mean(y > 0)),
        "mean_probability": float(np.mean(p)),
        "logit_sd": float(np.std(logit(p))),
        "auc": label_auc(y > 0, p),
    }


def out_of_fold_stats(targets: np.ndarray, probs: np.ndarray, mask: np.ndarray | None, labels: Sequence[str]) -> dict[str, dict | None]:
    return per_label(label_stats, targets, probs, mask, labels)


def at_bound(temperature: float | None) -> str | None:
    """"lower" / "upper" when a fitted temperature sits at (or within NEAR_BOUND in log of) a bound of its range, else None."""
    if temperature is None or not temperature > 0:
        return None
    low, high = LOG_TEMPERATURE_BOUNDS
    t = np.log(temperature)
    return "lower" if t - low < NEAR_BOUND else "upper" if high - t < NEAR_BOUND else None


def temperature_cause(stats: dict | None, temperature: float | None) -> tuple[str, str] | None:
    """(cause, the sentence that says it with its numbers) for a temperature at a bound; None when it is not at one or
    nothing was measured (a metrics.json from before these figures were stored)."""
    bound = at_bound(temperature)
    if bound is None or not stats:
        return None
    n, positives, prevalence, mean = stats["images"], stats["positives"], stats["prevalence"], stats["mean_probability"]
    auc = stats.get("auc")
    ranked = "" if auc is None else f", out-of-fold AUC {auc:.2f}"
    if positives < FEW_CASES:
        return "too few positives", (f"too few positives: {positives} among the {n:,} out-of-fold images (fewer than {FEW_CASES}), "
                                     "too few to fit a temperature")
    if abs(mean - prevalence) > SHIFT:
        return "shift", (f"shift: the mean out-of-fold probability is {mean:.2f} at {100 * prevalence:.1f}% prevalence{ranked}; a temperature "
                         "cannot move the probabilities' centre, so the fit flattens them toward 0.5 as far as it may; Platt scaling shifts them")
    if bound == "upper":
        return "spread", (f"spread: the out-of-fold probabilities barely rank the cases{ranked}, so the best temperature flattens them "
                          "toward a constant" if auc is not None and auc < WEAK_AUC else
                          f"spread: the out-of-fold logits spread more (s.d. {stats['logit_sd']:.2f}) than their ranking{ranked} supports, "
                          "so the fit flattens them as far as it may")
    return "spread", (f"spread: the out-of-fold logits are too narrow (s.d. {stats['logit_sd']:.2f}) for how well they rank the "
                      f"cases{ranked}, so the fit stretches them as far as it may")
