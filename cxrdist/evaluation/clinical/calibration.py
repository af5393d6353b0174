"""Calibration of per-label probabilities: reliability bins, expected calibration error, Brier score,
and two per-label recalibrations fitted on out-of-fold predictions: temperature scaling
(sigmoid(logit(p) / T), one parameter: rescales logits) and Platt scaling (sigmoid(a * logit(p) + b),
a logistic regression on the logit: also shifts them, which Asymmetric Loss's probabilities need).

ECE uses equal-width bins over [0, 1] and weighs each bin by its share of the images:
sum_b n_b / N * |mean predicted probability_b - observed positive rate_b|.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

DEFAULT_BINS = 10
EPS = 1e-7
LOG_TEMPERATURE_BOUNDS = (-4.0, 4.0)  # T in [0.018, 55]
MAX_PLATT_SLOPE = 10.0  # a Platt slope is a factor on the logits; beyond 10 a fit only says the scores were (nearly) separable


def reliability_bins(targets: np.ndarray, probs: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, list]:
    """Per equal-width bin: mean predicted probability, observed positive rate, image count and the bin's lower edge
    (empty bins left out)."""
    y, p = np.asarray(targets, dtype=np.float64), np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    index = np.minimum((p * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    predicted = np.bincount(index, weights=p, minlength=bins)
    observed = np.bincount(index, weights=y, minlength=bins)
    full = counts > 0
    return {
        "predicted": (predicted[full] / counts[full]).tolist(),
        "observed": (observed[full] / counts[full]).tolist(),
        "count": counts[full].astype(int).tolist(),
        "lower": (np.flatnonzero(full) / bins).tolist(),
    }


def expected_calibration_error(targets: np.ndarray, probs: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    table = reliability_bins(targets, probs, bins)
    counts = np.asarray(table["count"], dtype=np.float64)
    gaps = np.abs(np.asarray(table["predicted"]) - np.asarray(table["observed"]))
    return float((counts * gaps).sum() / counts.sum())


def logit(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def fit_temperature(targets: np.ndarray, probs: np.ndarray) -> float | None:
    """The T > 0 minimising the log loss of sigmoid(logit(p) / T); None without both classes."""
    y, z = np.asarray(targets, dtype=np.float64), logit(probs)
    if len(np.unique(y)) < 2:
        return None

    def log_loss(log_t: float) -> float:
        q = np.clip(sigmoid(z / np.exp(log_t)), EPS, 1 - EPS)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

    return float(np.exp(minimize_scalar(log_loss, bounds=LOG_TEMPERATURE_BOUNDS, method="bounded").x))


def apply_temperature(probs: np.ndarray, temperatures: Sequence[float | None]) -> np.ndarray:
    """Column j rescaled by temperature j (a None temperature leaves the column as it is)."""
    t = np.asarray([1.0 if v is None else v for v in temperatures], dtype=np.float64)
    return sigmoid(logit(probs) / t)


def fit_platt(targets: np.ndarray, probs: np.ndarray) -> tuple[float, float] | None:
    """(a, b) of sigmoid(a * logit(p) + b), the maximum-likelihood logistic regression of the targets on
    logit(p) (scikit-learn, unpenalised), constrained to 0 <= a <= MAX_PLATT_SLOPE; None without both classes.

    The log likelihood is concave, so the constrained fit lies on the bound the free one passes: a < 0 gives
    a = 0, b = logit(positive rate) (the scores carried no positive evidence: never reverse the ranking); scores
    that separate the classes have no maximum-likelihood fit at all (the slope grows without end, and an
    optimiser stops anywhere), so there, as when the free slope exceeds the cap, a = MAX_PLATT_SLOPE with the
    best b for it. `platt_note` says which labels that happened to."""
    y = np.asarray(targets, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return None
    z, positive = logit(probs), y > 0
    if not separable(z, positive):
        model = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000).fit(z[:, None], positive)
        a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
        if a < 0:
            return 0.0, float(logit(np.array([np.mean(positive)]))[0])
        if a <= MAX_PLATT_SLOPE:
            return a, b
    return MAX_PLATT_SLOPE, intercept_for_slope(z, positive, MAX_PLATT_SLOPE)


def separable(z: np.ndarray, positive: np.ndarray) -> bool:
    """Every positive scores at or above every negative: the logistic likelihood has no maximum (it grows with the slope)."""
    return bool(z[~positive].max() <= z[positive].min())


def intercept_for_slope(z: np.ndarray, positive: np.ndarray, a: float) -> float:
    """The b maximising the likelihood of sigmoid(a * z + b) (convex in b; finite with both classes)."""
    sign = np.where(positive, -1.0, 1.0)
    return float(minimize_scalar(lambda b: float(np.logaddexp(0.0, sign * (a * z + b)).sum())).x)


def platt_note(targets: np.ndarray, probs: np.ndarray) -> str | None:
    """Why a label's Platt fit sits on the slope cap, in words; None when it does not."""
    y = np.asarray(targets, dtype=np.float64)
    fitted = fit_platt(y, probs)
    if fitted is None or fitted[0] < MAX_PLATT_SLOPE:
        return None
    if separable(logit(probs), y > 0):
        return (f"the out-of-fold scores separate the classes, so no maximum-likelihood fit exists: slope capped at "
                f"{MAX_PLATT_SLOPE:g} (the probabilities are pushed toward 0 and 1 on either side of the gap)")
    return f"the fitted slope exceeded {MAX_PLATT_SLOPE:g} (nearly separated scores): capped at {MAX_PLATT_SLOPE:g}"


def apply_platt(probs: np.ndarray, params: Sequence[Sequence[float] | None]) -> np.ndarray:
    """Column j mapped through Platt parameters j (None leaves the column as it is)."""
    a = np.asarray([1.0 if v is None else v[0] for v in params], dtype=np.float64)
    b = np.asarray([0.0 if v is None else v[1] for v in params], dtype=np.float64)
    return sigmoid(a * logit(probs) + b)


def label_calibration(targets: np.ndarray, probs: np.ndarray, bins: int = DEFAULT_BINS) -> dict | None:
    """{"ece", "brier", "reliability"} for one label's known entries; None when it has none."""
    if len(targets) == 0:
        return None
    return {
        "ece": expected_calibration_error(targets, probs, bins),
        "brier": float(brier_score_loss(np.asarray(targets) > 0, probs)),
        "reliability": reliability_bins(targets, probs, bins),
    }


def calibration_summary(targets: np.ndarray, probs: np.ndarray, mask: np.ndarray | None, labels: Sequence[str], bins: int = DEFAULT_BINS) -> dict:
    """Per-label calibration plus the macro (mean over labels) ECE and Brier score."""
    by_label = per_label(lambda y, p: label_calibration(y, p, bins), targets, probs, mask, labels)
    known = [v for v in by_label.values() if v is not None]
    return {
        "bins": bins,
        "macro_ece": float(np.mean([v["ece"] for v in known])) if known else None,
        "macro_brier": float(np.mean([v["brier"] for v in known])) if known else None,
        "per_label": by_label,
    }


def per_label(fit, targets: np.ndarray, probs: np.ndarray, mask: np.ndarray | None, labels: Sequence[str]) -> dict:
    """{label: fit(that label's known targets, its probabilities)}."""
    keep = np.ones_like(targets, dtype=bool) if mask is None else np.asarray(mask) > 0
    return {label: fit(targets[keep[:, j], j], probs[keep[:, j], j]) for j, label in enumerate(labels)}


def fit_temperatures(targets: np.ndarray, probs: np.ndarray, mask: np.ndarray | None, labels: Sequence[str]) -> dict[str, float | None]:
    return per_label(fit_temperature, targets, probs, mask, labels)


def fit_platts(targets: np.ndarray, probs: np.ndarray, mask: np.ndarray | None, labels: Sequence[str]) -> dict[str, list[float] | None]:
    fitted = per_label(fit_platt, targets, probs, mask, labels)
    return {label: None if v is None else list(v) for label, v in fitted.items()}


def platt_notes(targets: np.ndarray, probs: np.ndarray, mask: np.ndarray | None, labels: Sequence[str]) -> dict[str, str]:
    """{label: note} for the labels whose Platt fit was capped (fit_platt)."""
    notes = per_label(platt_note, targets, probs, mask, labels)
    return {label: note for label, note in notes.items() if note is not None}
