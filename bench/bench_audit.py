"""The subgroup audit's cost against the patient bootstrap it reuses, measured in the same run.

Run by hand: `python bench/bench_audit.py` (add `--images 50000 --resamples 200` for a quick look). Synthetic predictions
as in bench_bootstrap.py (CheXpert prevalences, MIMIC-like images per patient, float32 scores, 10% of the targets left
out) at 400,000 images x 14 labels, with 4 attributes: sex (F, M, 2% unknown) and a 4-valued category per patient, the
age of each study (whole years 18-90+, the default --age-bins, 1% unknown) and the view of each image (PA, AP, LATERAL):
15 groups, 1,000 resamples. In one process, one after the other:
  (a) the evaluation's interval without an audit: `auc_intervals` (the patient bootstrap, then its percentiles);
  (b) the evaluation's interval WITH the audit, as `cxrdist evaluate` runs them: `audit_aucs` (every group's per-label
      AUCs and its paired gap to the rest in every resample; its pass also gives the whole's resampled AUCs), the
      interval from those (`auc_intervals(resampled=)`), then `finish_audit` (the rates and the underdiagnosis rate at
      4 operating points, the flags);
  (c) the audit as a pass of its own beside the bootstrap: `evaluation_audit`.
What the audit adds to an evaluation is (b) - (a); the issue asks it to be at most (a). Prints a markdown row and one
JSON line with the ratios (wall and CPU) and the load average. The compiled pass is compiled (or loaded from numba's
cache) before the timings: a first evaluation after an install pays that once (a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
from bench_bootstrap import synthetic_predictions

from cxrdist.data.attributes import AttributeSpec
from cxrdist.evaluation.clinical.subgroup_rates import audit_aucs, evaluation_audit, finish_audit
from cxrdist.evaluation.scoring.bootstrap import auc_intervals, bootstrap_aucs

LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
          "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
POINTS = ["sens@spec90", "sens@spec95", "spec@sens90", "spec@sens95"]
SPECS = [AttributeSpec("sex", "sex", "bench", values={"F": 1, "M": 1}), AttributeSpec("age", "age", "bench", bins=[18, 40, 60, 80]),
         AttributeSpec("view", "category", "bench", values={"AP": 1, "LATERAL": 1, "PA": 1}),
         AttributeSpec("site", "category", "bench", values={"a": 1, "b": 1, "c": 1, "d": 1})]


def attributes(patients: np.ndarray, seed: int = 0) -> list[dict]:
    """Per image: sex and site of its patient, the age of its study (a patient's first age + its image number / 3), its view."""
    rng = np.random.default_rng(seed)
    index, first = np.unique(patients, return_inverse=True)[1], np.r_[True, patients[1:] != patients[:-1]]
    n_patients = index.max() + 1
    sex = rng.choice(np.array(["F", "M", None], dtype=object), n_patients, p=[0.49, 0.49, 0.02])
    site = rng.choice(np.array(["a", "b", "c", "d"], dtype=object), n_patients)
    start = rng.integers(18, 91, n_patients)  # whole years, as the public tables write them
    order = np.arange(len(patients)) - np.maximum.accumulate(np.where(first, np.arange(len(patients)), 0))
    age = np.where(rng.random(len(patients)) < 0.01, np.nan, start[index] + order // 3)
    view = rng.choice(np.array(["PA", "AP", "LATERAL"], dtype=object), len(patients), p=[0.45, 0.35, 0.2])
    return [{"sex": sex[i], "site": site[i], "age": None if np.isnan(a) else float(a), "view": v} for i, a, v in zip(index, age, view)]


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=400_000)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    targets, scores, mask, patients = synthetic_predictions(args.images)
    samples = attributes(patients)
    targets[:, 0] = (targets[:, 1:] == 0).all(axis=1)  # No Finding: none of the others
    thresholds = {label: {p: float(np.quantile(scores[:, j], q)) for p, q in zip(POINTS, (0.9, 0.95, 0.6, 0.5))} for j, label in enumerate(LABELS)}
    operating_points = {"points": POINTS,
                        "per_label": {label: {p: {"threshold": t} for p, t in points.items()} for label, points in thresholds.items()}}
    bootstrap_aucs(targets[:100], scores[:100], mask[:100], patients[:100], 2, 0)  # compiles the pass (or loads it from numba's cache)
    load_start = os.getloadavg()[0]
    _, a_wall, a_cpu = timed(auc_intervals, targets, scores, LABELS, mask, patients, args.resamples, seed=0)

    def with_audit() -> dict:
        audit = audit_aucs(LABELS, targets, scores, mask, patients, samples, SPECS, None, resamples=args.resamples, seed=0)
        auc_intervals(targets, scores, LABELS, mask, patients, args.resamples, seed=0, resampled=audit.whole)
        return finish_audit(audit, targets, scores, mask, operating_points)

    audit, b_wall, b_cpu = timed(with_audit)
    _, c_wall, c_cpu = timed(evaluation_audit, LABELS, targets, scores, mask, patients, samples, SPECS, None, operating_points,
                             resamples=args.resamples, seed=0)
    groups = sum(len(info["groups"]) for info in audit["attributes"].values())
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
        "images": args.images, "patients": len(set(patients)), "labels": len(LABELS), "attributes": len(SPECS), "groups": groups,
        "resamples": args.resamples, "a_interval_wall_s": a_wall, "a_interval_cpu_s": a_cpu, "b_with_audit_wall_s": b_wall,
        "b_with_audit_cpu_s": b_cpu, "c_audit_alone_wall_s": c_wall, "c_audit_alone_cpu_s": c_cpu,
        "added_over_bootstrap_wall": (b_wall - a_wall) / a_wall, "added_over_bootstrap_cpu": (b_cpu - a_cpu) / a_cpu,
        "alone_over_bootstrap_wall": c_wall / a_wall, "alone_over_bootstrap_cpu": c_cpu / a_cpu,
        "comparisons": audit["comparisons"], "flagged": len(audit["flagged"]),
    }
    print(f"machine: {result['machine']}")
    print("| images x labels x resamples | attributes (groups) | (a) interval wall / CPU s | (b) interval + audit wall / CPU s | "
          "((b) - (a)) / (a), wall and CPU | (c) audit alone wall / CPU s, (c) / (a) CPU |")
    print("|---|---|---:|---:|---|---|")
    print(f"| {args.images:,} ({result['patients']:,} patients) x {len(LABELS)} x {args.resamples:,} | {len(SPECS)} ({groups}) | "
          f"{a_wall:.1f} / {a_cpu:.1f} | {b_wall:.1f} / {b_cpu:.1f} | **{result['added_over_bootstrap_wall']:.2f}, "
          f"{result['added_over_bootstrap_cpu']:.2f}** | {c_wall:.1f} / {c_cpu:.1f}, {result['alone_over_bootstrap_cpu']:.2f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
