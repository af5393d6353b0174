"""Fold assignment on a CheXpert-size label matrix: image-level MIS vs patient-level MIS vs ours.

Run by hand: `python bench/bench_folds.py` (one run, ~30 s on a busy 2-core VM). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from scipy.stats import norm

from cxrdist.data.ingest.folds import assign_splits, fold_name, positives_matrix, split_balance
from cxrdist.labels import CHEXPERT_LABELS

# Fraction of CheXpert train images with a positive (1) value, one per label in CHEXPERT_LABELS order.
CHEXPERT_PREVALENCE = np.array(
    [0.100, 0.048, 0.121, 0.473, 0.041, 0.234, 0.066, 0.027, 0.149, 0.087, 0.386, 0.016, 0.040, 0.519]
)
# Loading of each label on a shared per-patient "how sick" factor (No Finding goes the other way).
SICKNESS_LOADING = np.array([-0.6, 0.4, 0.5, 0.5, 0.3, 0.5, 0.4, 0.4, 0.5, 0.3, 0.5, 0.3, 0.3, 0.6])


def images_per_patient(n_patients: int, n_images: int, rng: np.random.Generator) -> np.ndarray:
    """1 + negative binomial (long tail), then nudged to exactly n_images in all."""
    mean_extra = n_images / n_patients - 1
    shape = 0.5
    counts = 1 + rng.negative_binomial(shape, shape / (shape + mean_extra), size=n_patients)
    while (diff := n_images - counts.sum()) != 0:
        if diff > 0:
            np.add.at(counts, rng.integers(0, n_patients, size=diff), 1)
        else:
            several = np.flatnonzero(counts > 1)
            pick = rng.choice(several, size=min(-diff, several.size), replace=False)
            counts[pick] -= 1
    return counts


def synthetic_labels(
    n_patients: int, n_images: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(patient id per image, raw labels 1/0/-1/NaN (n_images, 14)) with CheXpert-like prevalences,
    positives correlated within a patient (shared sickness + per-patient label propensity)."""
    rng = np.random.default_rng(seed)
    counts = images_per_patient(n_patients, n_images, rng)
    patient_of_image = np.repeat(np.arange(n_patients), counts)
    sickness = rng.standard_normal(n_patients)[patient_of_image, None]
    propensity = rng.standard_normal((n_patients, len(CHEXPERT_PREVALENCE)))[patient_of_image]
    noise = rng.standard_normal((n_images, len(CHEXPERT_PREVALENCE)))
    own = np.sqrt(0.75 - SICKNESS_LOADING**2)  # latent variance 1 -> marginal prevalence exact
    latent = SICKNESS_LOADING * sickness + own * propensity + 0.5 * noise
    positive = latent > norm.ppf(1 - CHEXPERT_PREVALENCE)
    raw = np.where(rng.random(positive.shape) < 0.7, np.nan, 0.0)
    raw[(rng.random(positive.shape) < 0.08) & ~positive] = -1.0
    raw[positive] = 1.0
    ids = np.array([f"patient{p:05d}" for p in range(n_patients)])
    return ids[patient_of_image], raw


def image_level_mis(patients: np.ndarray, positives: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    mis = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    splits = np.empty(positives.shape[0], dtype=object)
    for k, (_, members) in enumerate(mis.split(np.zeros((positives.shape[0], 1)), positives)):
        splits[members] = fold_name(k)
    return splits


def leaking_image_share(patients: np.ndarray, splits: np.ndarray) -> float:
    table = pd.DataFrame({"patient": patients, "split": splits})
    return float((table.groupby("patient")["split"].transform("nunique") > 1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=224_316)
    parser.add_argument("--patients", type=int, default=65_240)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    patients, raw = synthetic_labels(args.patients, args.images, seed=args.seed)
    positives = positives_matrix(raw)
    _, per_patient = np.unique(patients, return_counts=True)
    print(
        f"{args.images:,} images, {args.patients:,} patients ({per_patient.mean():.2f} images each, "
        f"max {per_patient.max()}, {np.mean(per_patient == 1):.0%} with one), {positives.shape[1]} labels, "
        f"{args.folds} folds; {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n"
    )
    methods = {
        "(a) image-level MIS": lambda: image_level_mis(patients, positives, args.folds, args.seed),
        "(b) patient-level MIS": lambda: assign_splits(patients, positives, args.folds, args.seed, balance=False),
        "(c) patient-level MIS + balancing (ours)": lambda: assign_splits(patients, positives, args.folds, args.seed),
    }
    print("| method | time (s) | patients in >1 fold | their images | largest prevalence deviation (pp) | fold size spread |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, run in methods.items():
        start = time.perf_counter()
        splits = run()
        seconds = time.perf_counter() - start
        balance = split_balance(splits, patients, positives, CHEXPERT_LABELS)
        print(
            f"| {name} | {seconds:.2f} | {balance['patients_in_several_splits']:,} | "
            f"{100 * leaking_image_share(patients, splits):.1f}% | {100 * balance['max_deviation_overall']:.4f} | "
            f"{100 * balance['size_spread']:.3f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
