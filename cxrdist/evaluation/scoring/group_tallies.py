"""Counts per group of the subgroup audit's groupings (subgroups.py), for many columns at once: sums over a group's
images, and the patients with an image in a group or in another one.

Images in the same group of every grouping form a cell; a group's sum over its images is the sum over its cells, so
one sparse product sums a table of columns over the cells and each grouping adds up its cells' rows (instead of one
bincount per grouping, column and operating point). A grouping's (patient, group) pairs are found once: a patient
counts in a group when one of its images there is in the column, and outside it when one is in another group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse


@dataclass
class PatientPairs:
    """A grouping's (patient, group) pairs that hold an image: the pair of each image, each pair's group and patient."""

    of_image: np.ndarray
    group: np.ndarray
    patient: np.ndarray


@dataclass
class Tallies:
    cells: sparse.csr_matrix  # (cells, images) 0/1: the cell of each image
    cell_group: dict[str, np.ndarray]  # per grouping (by name): the group of each cell
    pairs: dict[str, PatientPairs]
    n_patients: int


def tallies(groupings: Sequence, patients: np.ndarray, n_patients: int) -> Tallies:
    """The cells and patient pairs of `groupings` (objects with .name, .groups and .of_image) over the images."""
    n = len(patients)
    if math.prod(len(g.groups) for g in groupings) < 2**62:
        code = np.zeros(n, dtype=np.int64)
        for g in groupings:  # mixed radix: the groups of every grouping
            code = code * len(g.groups) + g.of_image
        _, first, cell = np.unique(code, return_index=True, return_inverse=True)
    else:
        _, first, cell = np.unique(np.stack([g.of_image for g in groupings], axis=1), axis=0, return_index=True, return_inverse=True)
    cell = cell.reshape(-1)
    cells = sparse.csr_matrix((np.ones(n), (cell, np.arange(n))), shape=(len(first), n))
    return Tallies(cells, {g.name: g.of_image[first] for g in groupings}, {g.name: patient_pairs(g, patients) for g in groupings}, n_patients)


def patient_pairs(g, patients: np.ndarray) -> PatientPairs:
    k = len(g.groups)
    found, of_image = np.unique(patients * k + g.of_image, return_inverse=True)
    return PatientPairs(of_image.reshape(-1), found % k, found // k)


def group_sums(t: Tallies, name: str, n_groups: int, cell_sums: np.ndarray) -> np.ndarray:
    """(groups, K): the (cells, K) `cell_sums` (`t.cells @ columns`) added up per group of the grouping `name`."""
    out = np.zeros((n_groups, cell_sums.shape[1]))
    np.add.at(out, t.cell_group[name], cell_sums)
    return out


def patients_by_group(t: Tallies, name: str, n_groups: int, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group of the grouping `name` and column of the boolean (images, K) `images`: how many patients have one of
    the column's images in the group, and how many have one in another group."""
    pairs = t.pairs[name]
    n_pairs, n = len(pairs.group), len(pairs.of_image)
    present = (sparse.csr_matrix((np.ones(n), (pairs.of_image, np.arange(n))), shape=(n_pairs, n)) @ images.astype(np.float64)) > 0
    by_group = sparse.csr_matrix((np.ones(n_pairs), (pairs.group, np.arange(n_pairs))), shape=(n_groups, n_pairs))
    groups_of_patient = sparse.csr_matrix((np.ones(n_pairs), (pairs.patient, np.arange(n_pairs))), shape=(t.n_patients, n_pairs)) @ present
    alone = present & (groups_of_patient[pairs.patient] == 1)
    inside = by_group @ present.astype(np.float64)
    outside = np.count_nonzero(groups_of_patient, axis=0) - by_group @ alone.astype(np.float64)
    return inside.astype(np.int64), outside.astype(np.int64)
