"""One label vocabulary over several datasets: built-in synonyms of the public sources, a user mapping on top.

Every dataset's label names are mapped onto the harmonised vocabulary: the dataset's user mapping (the `label_map`
of its `data.shards` entry: {its label name: harmonised name, or null to drop the finding}) first, then the built-in synonyms, else the
name is kept as it is. The model's vocabulary is `data.vocabulary` when given (every mapped name must be in
it), else the union of the mapped names in the order the datasets list them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cxrdist.errors import UserError
from cxrdist.labels import CHEXPERT_LABELS, NIH_LABELS

log = logging.getLogger(__name__)

# MIMIC-CXR-JPG's labels come from the CheXpert labeler: the same 14 names.
MIMIC_LABELS: list[str] = list(CHEXPERT_LABELS)

# Source name -> harmonised name, for every name a built-in source spells differently.
SYNONYMS: dict[str, dict[str, str]] = {
    "chexpert": {},
    "mimic": {},
    "nih": {"Effusion": "Pleural Effusion", "Pleural_Thickening": "Pleural Thickening"},
}
SOURCE_LABELS: dict[str, list[str]] = {"chexpert": CHEXPERT_LABELS, "mimic": MIMIC_LABELS, "nih": NIH_LABELS}
BUILTIN_SYNONYMS: dict[str, str] = {name: target for table in SYNONYMS.values() for name, target in table.items()}


def synonym_table() -> list[tuple[str, str, str]]:
    """(source, name in the source, harmonised name) for every built-in source label."""
    return [(source, name, SYNONYMS[source].get(name, name)) for source, names in SOURCE_LABELS.items() for name in names]


def harmonised_name(name: str, user_map: Mapping[str, str | None]) -> str | None:
    """The harmonised name of one dataset label (None: dropped by the user mapping)."""
    if name in user_map:
        target = user_map[name]
        return None if target is None or str(target).strip() == "" else str(target)
    return BUILTIN_SYNONYMS.get(name, name)


@dataclass(frozen=True)
class Vocabulary:
    labels: list[str]  # the model's label names
    columns: dict[str, list[int | None]]  # dataset -> for each of its labels, its index in `labels` (None: dropped)

    def annotated(self, dataset: str) -> list[str]:
        """The model labels `dataset` annotates."""
        return [self.labels[i] for i in self.columns[dataset] if i is not None]


def harmonise(datasets: Mapping[str, Sequence[str]], user_maps: Mapping[str, Mapping[str, str | None]] | None = None,
              vocabulary: Sequence[str] | None = None) -> Vocabulary:
    """Map every dataset's labels ({dataset: its label names}) onto one vocabulary, with {dataset: its user mapping};
    see the module docstring.

    Refused (UserError): a user-mapping entry the dataset does not have, two labels of one dataset onto one name,
    a mapped name `vocabulary` lacks, and (with several datasets) a dataset sharing no label with the others.
    """
    user_maps = dict(user_maps or {})
    mapped: dict[str, list[str | None]] = {}
    for dataset, names in datasets.items():
        user_map = dict(user_maps.get(dataset) or {})
        unknown = sorted(set(user_map) - set(names))
        if unknown:
            raise UserError(f"label_map of dataset {dataset}: it has no label(s) {', '.join(map(repr, unknown))} (its labels: {', '.join(names)})")
        targets = [harmonised_name(name, user_map) for name in names]
        for name, target in zip(names, targets):
            if target is None:
                log.warning(f"cxrdist: dataset {dataset}: label {name!r} is mapped to nothing and dropped")
        seen: dict[str, str] = {}
        for name, target in zip(names, targets):
            if target is not None and target in seen:
                raise UserError(f"dataset {dataset}: labels {seen[target]!r} and {name!r} both map onto {target!r}; "
                                "map one of them elsewhere in its label_map")
            if target is not None:
                seen[target] = name
        mapped[dataset] = targets
    labels = list(vocabulary) if vocabulary else list(dict.fromkeys(t for targets in mapped.values() for t in targets if t is not None))
    if vocabulary:
        duplicates = sorted({name for name in labels if labels.count(name) > 1})
        if duplicates:
            raise UserError(f"data.vocabulary: label names given twice: {', '.join(duplicates)}")
        for dataset, targets in mapped.items():
            missing = [t for t in targets if t is not None and t not in labels]
            if missing:
                raise UserError(f"dataset {dataset}: label(s) {', '.join(map(repr, missing))} are not in data.vocabulary; "
                                "add them, or map them to null in the dataset's label_map to drop them")
    check_overlap(mapped)
    index = {name: i for i, name in enumerate(labels)}
    return Vocabulary(labels, {dataset: [None if t is None else index[t] for t in targets] for dataset, targets in mapped.items()})


def check_overlap(mapped: Mapping[str, Sequence[str | None]]) -> None:
    if len(mapped) < 2:
        return
    for dataset, targets in mapped.items():
        others = {t for other, names in mapped.items() if other != dataset for t in names}
        if not ({t for t in targets if t is not None} & others):
            raise UserError(f"dataset {dataset} shares no label with the other datasets; map its labels onto theirs with a label_map")
    if not any(t is not None for targets in mapped.values() for t in targets):
        raise UserError("every label is mapped to nothing")
