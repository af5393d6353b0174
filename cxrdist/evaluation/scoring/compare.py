"""`cxrdist compare RUNS_A RUNS_B`: two experiments (e.g. refinement off and on) scored on the same images.

Per fold, each arm's best model on the fold it held out (fold-K/best/val_predictions.csv), and on the test
split each arm's fold ensemble (ensemble/predictions.csv from `cxrdist evaluate`). For every split: both
macro AUCs, the paired difference B - A, and a paired patient-bootstrap interval for it. Paired means
each resample draws ONE set of patients and scores both arms on it, so the interval reflects the
difference's own variability, not the two AUCs' (which share most of theirs). The targets are the ones
the prediction files record (the evaluation targets: blank = left out of that label's AUC); both arms
must record the same keys, labels and targets.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist.atomic import atomic_write_json, check_writable_dir, json_ready
from cxrdist.errors import UserError
from cxrdist.evaluation.scoring.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, patient_weights, percentile_interval, weighted_auc
from cxrdist.evaluation.scoring.metrics import auc_summary
from cxrdist.layout import (
    BEST_DIR, COMPARE_DIR, COMPARE_FILE, ENSEMBLE_DIR, FOLD_PREFIX, METRICS_FILE, PREDICTIONS_FILE, TEST_SPLIT, VAL_PREDICTIONS_FILE,
    fold_best_dirs, fold_run_dirs,
)
from cxrdist.model.card import ModelCard
from cxrdist.model.inert import best_model_inert


@dataclass
class ScoredPredictions:
    """One prediction table: probabilities with the targets they are scored against (mask 0 = left out)."""

    keys: list[str]
    patients: list[str] | None  # None when the table has no patient column
    labels: list[str]
    probs: np.ndarray  # (N, C)
    targets: np.ndarray  # (N, C) 0/1
    mask: np.ndarray  # (N, C) 1 = scored


# ---------------------------------------------------------------- pure functions


def paired_resample_aucs(targets: np.ndarray, mask: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                         weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, C) AUCs of arm A and of arm B, each row scored with the SAME resample weights (R, N)."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    shape = (len(weights), targets.shape[1])
    auc_a, auc_b = np.empty(shape), np.empty(shape)
    for j in range(targets.shape[1]):
        w = weights * mask[:, j]
        auc_a[:, j] = weighted_auc(targets[:, j], scores_a[:, j], w)
        auc_b[:, j] = weighted_auc(targets[:, j], scores_b[:, j], w)
    return auc_a, auc_b


def paired_difference(targets: np.ndarray, mask: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, labels: list[str],
                      weights: np.ndarray, level: float = DEFAULT_LEVEL) -> dict:
    """Both arms' AUCs (sklearn) and B - A with a percentile interval over the resamples in `weights`.

    The macro AUC of a resample averages the labels scored on the full set that have both classes in that
    resample; the targets are shared, so both arms average the same labels in every resample."""
    targets, mask = np.asarray(targets, dtype=np.float64), np.asarray(mask, dtype=np.float64)
    summary_a, summary_b = auc_summary(targets, scores_a, labels, mask), auc_summary(targets, scores_b, labels, mask)
    auc_a, auc_b = paired_resample_aucs(targets, mask, np.asarray(scores_a), np.asarray(scores_b), weights)
    evaluated = np.array([summary_a["per_label"][label] is not None for label in labels])
    per_label = {}
    for j, label in enumerate(labels):
        a, b = summary_a["per_label"][label], summary_b["per_label"][label]
        per_label[label] = {
            "a": a, "b": b, "difference": None if a is None else b - a,
            "interval": percentile_interval(auc_b[:, j] - auc_a[:, j], level) if evaluated[j] else None,
        }
    macro_interval = None
    if evaluated.any():
        with warnings.catch_warnings():  # a resample where every label has one class: NaN, dropped by the percentile
            warnings.simplefilter("ignore", RuntimeWarning)
            macro_diff = np.nanmean(auc_b[:, evaluated], axis=1) - np.nanmean(auc_a[:, evaluated], axis=1)
        macro_interval = percentile_interval(macro_diff, level)
    macro_a, macro_b = summary_a["macro_auc"], summary_b["macro_auc"]
    return {
        "macro": {"a": macro_a, "b": macro_b, "difference": macro_b - macro_a, "interval": macro_interval},
        "per_label": per_label,
        "resamples": int(len(np.atleast_2d(weights))),
        "level": float(level),
    }


def fold_tally(folds: dict[str, dict]) -> dict:
    """How many folds B improved on (macro difference > 0) and the mean difference over folds."""
    diffs = [f["macro"]["difference"] for f in folds.values() if np.isfinite(f["macro"]["difference"])]
    return {"folds": len(folds), "improved": sum(d > 0 for d in diffs), "mean_difference": float(np.mean(diffs)) if diffs else None}


# ---------------------------------------------------------------- reading and pairing prediction tables


def read_scored_predictions(path: Path) -> ScoredPredictions:
    """A table written by outputs.write_predictions_csv with targets: key[, path, patient], prob_<label>, target_<label>."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)  # blank target = left out; ids stay strings
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise UserError(f"{path}: unreadable prediction table ({type(err).__name__})") from None
    labels = [c[len("prob_"):] for c in frame.columns if c.startswith("prob_")]
    missing = [f"target_{label}" for label in labels if f"target_{label}" not in frame.columns]
    if "key" not in frame.columns or not labels or missing:
        raise UserError(f"{path}: expected columns key, prob_<label> and target_<label> (missing: {', '.join(missing) or 'key/prob_'})")
    raw_targets = frame[[f"target_{label}" for label in labels]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    try:
        probs = frame[[f"prob_{label}" for label in labels]].to_numpy(np.float64)
    except ValueError:
        raise UserError(f"{path}: a prob_<label> column holds something that is not a number") from None
    mask = np.isfinite(raw_targets).astype(np.float64)
    return ScoredPredictions(
        keys=frame["key"].tolist(),
        patients=frame["patient"].tolist() if "patient" in frame.columns else None,
        labels=labels,
        probs=probs,
        targets=np.nan_to_num(raw_targets),
        mask=mask,
    )


def aligned(a: ScoredPredictions, b: ScoredPredictions, where: str) -> tuple[ScoredPredictions, ScoredPredictions]:
    """Both tables in one key order; different labels, keys or targets are a UserError naming `where`."""
    if a.labels != b.labels:
        raise UserError(f"{where}: the arms have different labels ({', '.join(a.labels)} vs {', '.join(b.labels)})")
    if len(set(a.keys)) != len(a.keys) or len(set(b.keys)) != len(b.keys):
        raise UserError(f"{where}: a prediction table lists a key twice")
    if set(a.keys) != set(b.keys):
        only = sorted(set(a.keys) ^ set(b.keys))
        raise UserError(f"{where}: the arms predicted different images ({len(only)} keys in only one, e.g. {only[0]})")
    order_a, order_b = np.argsort(a.keys), np.argsort(b.keys)
    a, b = take(a, order_a), take(b, order_b)
    if not (np.array_equal(a.mask, b.mask) and np.array_equal(a.targets * a.mask, b.targets * b.mask)):
        raise UserError(f"{where}: the arms record different targets for the same images (different evaluation targets?)")
    return a, b


def take(p: ScoredPredictions, order: np.ndarray) -> ScoredPredictions:
    return ScoredPredictions([p.keys[i] for i in order], None if p.patients is None else [p.patients[i] for i in order],
                             p.labels, p.probs[order], p.targets[order], p.mask[order])


def compare_tables(a: ScoredPredictions, b: ScoredPredictions, where: str, resamples: int, seed: int, level: float,
                   patients: dict[str, str] | None = None) -> dict:
    """The paired comparison of two aligned tables; the resampling unit is the patient (the table's column, else
    `patients` (key -> patient), else the image)."""
    a, b = aligned(a, b, where)
    if a.patients is not None:
        groups, unit = [p or k for k, p in zip(a.keys, a.patients)], "patient"
    elif patients is not None:
        groups, unit = [patients.get(k) or k for k in a.keys], "patient"
    else:
        groups, unit = list(a.keys), "image"
    weights = patient_weights(groups, resamples, seed)
    result = paired_difference(a.targets, a.mask, a.probs, b.probs, a.labels, weights, level)
    return {**result, "samples": len(a.keys), "patients": len(set(groups)), "unit": unit, "seed": int(seed)}


# ---------------------------------------------------------------- the experiments


def fold_tables(runs: Path) -> dict[str, Path]:
    """{fold-K: fold-K/best/val_predictions.csv} of the folds that have a best model."""
    return {d.name: d / BEST_DIR / VAL_PREDICTIONS_FILE for d in fold_run_dirs(runs) if (d / BEST_DIR / VAL_PREDICTIONS_FILE).is_file()}


def fold_patients(best: Path, split: str) -> dict[str, str] | None:
    """key -> patient of a fold, from the shards the model was trained on (for tables written without a patient column)."""
    from cxrdist.data.manifest import has_manifest
    from cxrdist.data.datasets import load_manifest
    from cxrdist.data.shards import read_shard_samples

    root = Path(ModelCard.read(best).shards)
    if not has_manifest(root):
        return None
    manifest = load_manifest(root)
    if split not in manifest.splits:
        return None
    return {key: str(meta.get("patient") or "") for shard in manifest.split(split).shards
            for key, _, meta in read_shard_samples(root / shard.file)}


def arm_info(runs: Path) -> dict:
    """The experiment's name, whether its models use the refinement (from the first card found) and, per fold
    with the refinement on, why its best model's refinement is inert (None when it is not)."""
    best = fold_best_dirs(runs)
    card = ModelCard.read(best[0]) if best else None
    refine = card.model.refine.enabled if card else None
    inert = {d.parent.name: best_model_inert(d) for d in best} if refine else {}
    return {"runs": str(runs), "experiment": card.experiment if card else Path(runs).name, "refine": refine, "inert": inert}


def inert_note(result: dict) -> str | None:
    """When the refinement ended inert in every fold of the arm that has it on, the arms' difference is not a coupling's."""
    for key in "ba":
        arm = result[key]
        if arm["refine"] and arm.get("inert") and all(arm["inert"].values()):
            return (f"the refinement ended inert (A zero) in every fold of {key.upper()} ({arm['experiment']}): at the end both arms "
                    "are the plain backbone, so a difference between them is the training trajectory (A was non-zero while training), "
                    "not a label coupling")
    return None


def test_tables(runs_a: Path, runs_b: Path, split: str) -> tuple[Path, Path] | None:
    """Each arm's ensemble predictions on `split`; None when neither arm has them."""
    paths = [Path(r) / ENSEMBLE_DIR / PREDICTIONS_FILE for r in (runs_a, runs_b)]
    present = [p.is_file() for p in paths]
    if not any(present):
        return None
    if not all(present):
        missing = paths[present.index(False)]
        raise UserError(f"{missing}: missing (run `cxrdist evaluate --runs {missing.parents[1]} --split {split}` for both arms)")
    for path in paths:
        metrics = path.parent / METRICS_FILE
        recorded = json.loads(metrics.read_text()).get("split") if metrics.is_file() else None
        if recorded is not None and recorded != split:
            raise UserError(f"{path}: predictions of split {recorded!r}, not {split!r} (run `cxrdist evaluate --split {split}` again)")
    return paths[0], paths[1]


def run_compare(runs_a: Path, runs_b: Path, split: str = TEST_SPLIT, out: Path | None = None,
                resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = DEFAULT_LEVEL) -> dict:
    """Compare every shared fold and the `split` ensemble; write OUT/compare.json (default RUNS_B/compare)."""
    runs_a, runs_b = Path(runs_a), Path(runs_b)
    for runs in (runs_a, runs_b):
        if not runs.is_dir():
            raise UserError(f"{runs}: no such runs directory")
    if resamples < 2 or not 0 < level < 1:
        raise UserError(f"--resamples must be >= 2 and the level in (0, 1) (got {resamples}, {level})")
    if out is not None:
        check_writable_dir(Path(out))
    folds_a, folds_b = fold_tables(runs_a), fold_tables(runs_b)
    if set(folds_a) != set(folds_b):
        raise UserError(f"the arms have best models for different folds ({', '.join(folds_a) or 'none'} in {runs_a}, "
                        f"{', '.join(folds_b) or 'none'} in {runs_b})")
    folds = {}
    for name, path_a in folds_a.items():
        table_a, table_b = read_scored_predictions(path_a), read_scored_predictions(folds_b[name])
        patients = fold_patients(path_a.parent, name) if table_a.patients is None else None
        folds[name] = compare_tables(table_a, table_b, f"{name} ({path_a} vs {folds_b[name]})", resamples, seed, level, patients)
    tables = test_tables(runs_a, runs_b, split)
    test = None
    if tables is not None:
        test = compare_tables(read_scored_predictions(tables[0]), read_scored_predictions(tables[1]),
                              f"{split} ({tables[0]} vs {tables[1]})", resamples, seed, level)
    if not folds and test is None:
        raise UserError(f"nothing to compare: {runs_a} and {runs_b} have no {FOLD_PREFIX}K/{BEST_DIR}/{VAL_PREDICTIONS_FILE} "
                        f"and no {ENSEMBLE_DIR}/{PREDICTIONS_FILE}")
    out = Path(out) if out is not None else runs_b / COMPARE_DIR
    result = json_ready({
        "a": arm_info(runs_a), "b": arm_info(runs_b), "difference": "b - a", "unit": "patient", "resamples": resamples,
        "level": level, "seed": seed, "folds": folds, "fold_summary": fold_tally(folds), "split": split, "test": test,
        "out": str(out / COMPARE_FILE),
    })
    result["inert_note"] = inert_note(result)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / COMPARE_FILE, result)
    return result


# ---------------------------------------------------------------- the table on stdout


def _num(value, signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _interval(interval) -> str:
    return f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "-"


def _arm(info: dict) -> str:
    refine = {True: "refinement on", False: "refinement off", None: "no model card"}[info["refine"]]
    return f"{info['experiment']} ({refine})"


def format_table(result: dict) -> str:
    """A readable summary: macro AUCs per split with the paired interval, then per-label differences."""
    splits = {**result["folds"], **({result["split"]: result["test"]} if result["test"] else {})}
    level = round(100 * result["level"])
    lines = [f"A = {_arm(result['a'])}: {result['a']['runs']}", f"B = {_arm(result['b'])}: {result['b']['runs']}",
             f"difference = B - A, paired patient bootstrap {level}% interval ({result['resamples']} resamples, the same patients for both arms)",
             "", f"{'split':<10} {'A macro':>8} {'B macro':>8} {'B - A':>8}  {level}% interval"]
    for name, comparison in splits.items():
        macro = comparison["macro"]
        lines.append(f"{name:<10} {_num(macro['a']):>8} {_num(macro['b']):>8} {_num(macro['difference'], True):>8}  {_interval(macro['interval'])}")
    tally = result["fold_summary"]
    if tally["folds"]:
        mean = _num(tally["mean_difference"], True)
        lines.append(f"B improved the macro AUC on {tally['improved']} of {tally['folds']} folds (mean difference {mean})")
    if result.get("inert_note"):
        lines.append(f"note: {result['inert_note']}")
    if result["test"] is None:
        lines.append(f"no {result['split']} predictions: run `cxrdist evaluate` on both arms to compare their ensembles")
    labels = list(next(iter(splits.values()))["per_label"]) if splits else []
    lines += ["", "per label, B - A (* = interval excludes 0):", f"{'label':<28}" + "".join(f"{name:>12}" for name in splits)]
    for label in labels:
        cells = []
        for comparison in splits.values():
            entry = comparison["per_label"][label]
            interval = entry["interval"]
            star = "*" if interval and (interval[0] > 0 or interval[1] < 0) else " "
            cells.append(f"{_num(entry['difference'], True) + star:>12}")
        lines.append(f"{label[:27]:<28}" + "".join(cells))
    return "\n".join(lines)
