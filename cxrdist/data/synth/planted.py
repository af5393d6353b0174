"""A planted label coupling for `cxrdist synth --planted-coupling F`: a benchmark where the learned
label coupling has something to add (bench/bench_coupling.py).

Three labels are appended to the synthetic label table; none has a mark of its own in the image:
- "Planted Target": a noisy copy of the source label (Pleural Effusion, which has a visible mark and
  is labelled on almost every image): P(target = 1 | source written 1) = 0.9,
  P(target = 1 | otherwise) = 0.05. It is written (1/0) for a fraction F of the patients only; for
  the others it is written -1 (uncertain), so a training policy of "ignore" leaves those entries out
  of the loss. The full truth is written to labels_full.csv next to labels.csv (the held-out
  evaluation uses it).
- "Control A", "Control B": independent of everything, P(1) = 0.3, written on every image. A
  coupling into or out of them has no reason to exist.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SOURCE = "Pleural Effusion"
TARGET = "Planted Target"
CONTROLS = ("Control A", "Control B")
P_TARGET_GIVEN_SOURCE = 0.9
P_TARGET_OTHERWISE = 0.05
P_CONTROL = 0.3


def plant_coupling(table: pd.DataFrame, labelled_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the table as training sees it, the fully labelled table); both gain the planted columns."""
    rng = np.random.default_rng([seed, 0x9A17])
    source_positive = table[SOURCE].fillna(0).to_numpy() == 1
    # Studies share labels (both views of a study are one report): draw per study, then broadcast.
    study_keys = (table["patient"].astype(str) + "/" + table["study"].astype(str)).to_numpy()
    studies, study_index = np.unique(study_keys, return_inverse=True)
    first = np.array([np.flatnonzero(study_index == s)[0] for s in range(len(studies))])
    p = np.where(source_positive[first], P_TARGET_GIVEN_SOURCE, P_TARGET_OTHERWISE)
    target = (rng.random(len(studies)) < p).astype(float)[study_index]
    controls = {name: (rng.random(len(studies)) < P_CONTROL).astype(float)[study_index] for name in CONTROLS}
    patients, patient_index = np.unique(table["patient"].astype(str).to_numpy(), return_inverse=True)
    labelled = (rng.random(len(patients)) < labelled_fraction)[patient_index]
    full = table.copy()
    full[TARGET] = pd.array(target.astype(int), dtype="Int64")
    for name, values in controls.items():
        full[name] = pd.array(values.astype(int), dtype="Int64")
    seen = full.copy()
    seen[TARGET] = pd.array(np.where(labelled, target, -1).astype(int), dtype="Int64")
    return seen, full
