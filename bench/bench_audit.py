"""The subgroup audit's cost against the patient bootstrap it reuses, measured in the same run.

Run by hand: `python bench/bench_audit.py` (add `--images 50000 --resamples 200` for a quick look). Synthetic predictions
as in bench_bootstrap.py (CheXpert prevalences, MIMIC-like images per patient, float32 scores, 10% of the targets left
out) at 400,000 images x 14 labels, with 4 attributes: sex (F, M, 2% unknown) and a 4-valued category per patient, the
age of each study (whole years 18-90+, the default --age-bins, 1% unknown) and the view of each image (PA, AP, LATERAL):
15 groups. (a) `bootstrap_aucs`, the evaluation's patient bootstrap (1,000 resamples); (b) the audit on the same draws:
every group's per-label AUCs and its paired gap to the rest in every resample, the small-group rule, the rates and the
underdiagnosis rate at 4 operating points, the flags (`evaluation_audit`, less the evaluation's own bootstrap). Prints a markdown
row and one JSON line with the ratio (b) / (a), wall and CPU, and the load average.
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
from cxrdist.evaluation.clinical.subgroup_rates import evaluation_audit
from cxrdist.evaluation.scoring.bootstrap import bootstrap_aucs

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
    load_start = os.getloadavg()[0]
    _, boot_wall, boot_cpu = timed(bootstrap_aucs, targets, scores, mask, patients, args.resamples, 0)
    audit, audit_wall, audit_cpu = timed(evaluation_audit, LABELS, targets, scores, mask, patients, samples, SPECS, None, operating_points,
                                         resamples=args.resamples, seed=0)
    groups = sum(len(info["groups"]) for info in audit["attributes"].values())
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
        "images": args.images, "patients": len(set(patients)), "labels": len(LABELS), "attributes": len(SPECS), "groups": groups,
        "resamples": args.resamples, "bootstrap_wall_s": boot_wall, "bootstrap_cpu_s": boot_cpu, "audit_wall_s": audit_wall,
        "audit_cpu_s": audit_cpu, "ratio_wall": audit_wall / boot_wall, "ratio_cpu": audit_cpu / boot_cpu,
        "comparisons": audit["comparisons"], "flagged": len(audit["flagged"]),
    }
    print(f"machine: {result['machine']}")
    print("| images x labels x resamples | attributes (groups) | bootstrap wall / CPU s | audit wall / CPU s | audit / bootstrap (wall, CPU) |")
    print("|---|---|---:|---:|---|")
    print(f"| {args.images:,} ({result['patients']:,} patients) x {len(LABELS)} x {args.resamples:,} | {len(SPECS)} ({groups}) | "
          f"{boot_wall:.1f} / {boot_cpu:.1f} | {audit_wall:.1f} / {audit_cpu:.1f} | {result['ratio_wall']:.2f}, {result['ratio_cpu']:.2f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
