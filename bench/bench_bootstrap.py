"""Patient bootstrap of per-label AUCs: the previous code against today's, and today's at MIMIC-CXR scale.

Run by hand: `python bench/bench_bootstrap.py` (a few minutes on a busy 2-core VM). Prints a markdown table
and one JSON line. (a) both implementations on the same data in the same run, at a size the previous code
handles (its (resamples x images) weight matrix); their AUCs must be equal. (b) today's code alone on
400,000 images x 14 labels x 1,000 resamples (the issue's goal: under a minute on one node). Wall time on a
shared machine depends on the other jobs; the process's CPU time is what an idle core would take.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
from bench_folds import CHEXPERT_PREVALENCE, images_per_patient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from bootstrap_reference import reference_bootstrap_aucs  # noqa: E402

from cxrdist.evaluation.scoring.bootstrap import bootstrap_aucs  # noqa: E402

IMAGES_PER_PATIENT = 377_110 / 65_379  # MIMIC-CXR v2: images / patients


def synthetic_predictions(n_images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(targets, scores, mask, patient per image) with CheXpert prevalences, float32 model-like scores
    (so some ties), 10% of the targets left out, MIMIC-like images per patient (long tail)."""
    rng = np.random.default_rng(seed)
    n_patients = round(n_images / IMAGES_PER_PATIENT)
    patients = np.repeat(np.arange(n_patients), images_per_patient(n_patients, n_images, rng)).astype(str)
    targets = (rng.random((n_images, len(CHEXPERT_PREVALENCE))) < CHEXPERT_PREVALENCE).astype(np.float64)
    logits = rng.standard_normal(targets.shape) + 1.5 * targets - 2.0
    scores = (1 / (1 + np.exp(-logits))).astype(np.float32).astype(np.float64)
    mask = (rng.random(targets.shape) < 0.9).astype(np.float64)
    return targets, scores, mask, patients


def timed(fn, *args) -> tuple[np.ndarray, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=400_000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--compare-images", type=int, default=50_000)
    parser.add_argument("--compare-resamples", type=int, default=100)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]

    targets, scores, mask, patients = synthetic_predictions(args.images)
    _, big_wall, big_cpu = timed(bootstrap_aucs, targets, scores, mask, patients, args.resamples, 0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    labels, n_patients = targets.shape[1], len(set(patients))
    del targets, scores, mask, patients

    small = synthetic_predictions(args.compare_images, seed=1)
    old, old_wall, old_cpu = timed(reference_bootstrap_aucs, *small, args.compare_resamples, 0)
    new, new_wall, new_cpu = timed(bootstrap_aucs, *small, args.compare_resamples, 0)
    same_nan = bool(np.array_equal(np.isnan(old), np.isnan(new)))
    max_diff = float(np.nanmax(np.abs(old - new)))

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
        "numpy": np.__version__,
        "a_compare": {"images": args.compare_images, "labels": labels, "resamples": args.compare_resamples,
                      "previous_wall_s": old_wall, "previous_cpu_s": old_cpu, "today_wall_s": new_wall, "today_cpu_s": new_cpu,
                      "previous_ms_per_resample_cpu": 1000 * old_cpu / args.compare_resamples,
                      "ratio_today_over_previous_cpu": new_cpu / old_cpu, "ratio_today_over_previous_wall": new_wall / old_wall,
                      "same_nan": same_nan, "max_abs_difference": max_diff},
        "b_scale": {"images": args.images, "patients": n_patients, "labels": labels, "resamples": args.resamples,
                    "wall_s": big_wall, "cpu_s": big_cpu, "peak_rss_mib": peak_mib},
    }
    a = result["a_compare"]
    print(f"machine: {result['machine']}")
    print("| run | images x labels x resamples | wall s | CPU s | notes |\n|---|---|---:|---:|---|")
    print(f"| (a) previous code | {a['images']:,} x {labels} x {a['resamples']} | {old_wall:.1f} | {old_cpu:.1f} | "
          f"{a['previous_ms_per_resample_cpu']:.0f} ms CPU per resample |")
    print(f"| (a) today's code | same | {new_wall:.1f} | {new_cpu:.1f} | today / previous: {a['ratio_today_over_previous_cpu']:.4f} (CPU), "
          f"{a['ratio_today_over_previous_wall']:.4f} (wall); max abs difference {max_diff:.1e}, same NaN: {same_nan} |")
    print(f"| (b) today's code | {args.images:,} ({n_patients:,} patients) x {labels} x {args.resamples:,} | {big_wall:.1f} | {big_cpu:.1f} | "
          f"peak RSS {peak_mib:.0f} MiB |")
    print(json.dumps(result))
    if not same_nan or max_diff > 1e-12:
        raise SystemExit("today's AUCs differ from the previous code's")


if __name__ == "__main__":
    main()
