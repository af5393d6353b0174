"""Leakage between and within datasets, found the way it happens: the same radiograph stored twice (re-encoded, resized,
another format, a pixel or two cropped: data/ingest/fingerprint.py), and the same patient in two copies of one public source.

- within one dataset (prepare): images that are the same radiograph keep their patients in one split;
- between the datasets of one run (`data.shards`): refused, fold K of one would train on the other's validation images;
- between the data a model was trained (and tested) on and an external dataset: refused, or left out when asked.
Patient ids are compared only between datasets of the same public source (PATIENT_NAMESPACES): a generic CSV's patient
"17" at one hospital is not patient "17" at another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrdist.data.ingest.fingerprint import MATCH_BITS, THUMBNAIL_SIDE, connected_groups, near_pairs
from cxrdist.data.ingest.fingerprint_store import FingerprintTable
from cxrdist.errors import UserError
from cxrdist.text import count

PATIENT_NAMESPACES = ("nih", "chexpert", "mimic")  # sources whose patient ids name the same person in every copy
HOW = f"perceptual fingerprint within {MATCH_BITS} bits of a {THUMBNAIL_SIDE} px thumbnail's DCT"


def duplicate_groups(patients: np.ndarray, paths: np.ndarray, prints: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(a fold group per image, what to say): images that are the same radiograph put their patients in one group, so
    the folds keep them together."""
    patients = np.asarray(patients).astype(str)
    i, j = near_pairs(prints)
    if not i.size:
        return patients, []
    codes, names = pd.factorize(patients)
    component = connected_groups(len(names), codes[i], codes[j])
    first_of = pd.Series(names).groupby(component).transform("first").to_numpy()
    groups = first_of[codes].astype(str)
    across = patients[i] != patients[j]
    joined = int((np.bincount(component)[component] > 1).sum())
    said = f"{count(i.size, 'pair')} of images are the same radiograph ({HOW}; first: {paths[i[0]]} and {paths[j[0]]})"
    if across.any():
        said += f"; {int(across.sum())} of them join different patients, whose {joined} patients are kept in one split"
    return groups, [said]


def check_split_duplicates(paths: np.ndarray, splits: np.ndarray, prints: np.ndarray, where) -> None:
    """A given fold assignment must not put the same radiograph in two splits."""
    i, j = near_pairs(prints)
    apart = splits[i] != splits[j]
    if apart.any():
        a, b = i[apart][0], j[apart][0]
        raise UserError(f"{where}: puts the same radiograph in two splits ({int(apart.sum())} such pairs, first: {paths[a]} in {splits[a]} and "
                        f"{paths[b]} in {splits[b]}; {HOW}); compute the folds with prepare, which keeps such images together")


def shares_patients(source_a: str | None, source_b: str | None) -> bool:
    return source_a is not None and source_a == source_b and source_a in PATIENT_NAMESPACES


@dataclass
class Overlap:
    """What dataset b shares with dataset a: (row in a, row in b) of the same radiographs, and the shared patient ids."""

    a: FingerprintTable
    b: FingerprintTable
    pairs: tuple[np.ndarray, np.ndarray]
    patients: set[str]

    def __bool__(self) -> bool:
        return bool(self.pairs[0].size or self.patients)

    def rows_of_b(self) -> np.ndarray:
        """b's rows to leave out: its images that are a's, and every image of a shared patient."""
        rows = np.zeros(len(self.b), dtype=bool)
        rows[self.pairs[1]] = True
        rows |= np.isin(self.b.patient, list(self.patients))
        return np.flatnonzero(rows)

    def describe(self) -> str:
        parts = []
        if self.pairs[0].size:
            i, j = self.pairs[0][0], self.pairs[1][0]
            parts.append(f"{count(len(set(self.pairs[1].tolist())), 'image')} the same radiograph as one of the other's "
                         f"(first: {self.b.path[j]} ~ {self.a.path[i]}; {HOW})")
        if self.patients:
            parts.append(f"{count(len(self.patients), 'patient')} in both (same source, so the same patient ids; first: {min(self.patients)})")
        return " and ".join(parts)


def overlap(a: FingerprintTable, source_a: str | None, b: FingerprintTable, source_b: str | None) -> Overlap:
    pairs = near_pairs(a.prints, b.prints)
    patients = set(np.intersect1d(a.patient, b.patient).tolist()) if shares_patients(source_a, source_b) else set()
    return Overlap(a, b, pairs, patients)
