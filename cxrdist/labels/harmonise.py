"""One label vocabulary over several datasets: built-in synonyms of the public sources, a user mapping on top.

Every dataset's label names are mapped onto the harmonised vocabulary: the dataset's user mapping (the `label_map`
of its `data.shards` entry: {its label name: harmonised name, or null to drop the finding}) first, then the names a
built-in source defines its own way (NIH's "No Finding" is "No Finding (NIH)": none of NIH's 14 findings, where
CheXpert's and MIMIC's mean none of their 13 findings but Support Devices; the two are never merged unless a
label_map says so), then the built-in synonyms (spellings of one finding), else the name is kept as it is. The
model's vocabulary is `data.vocabulary` when given (every mapped name must be in it), else the union of the mapped
names in the order the datasets list them.

`LabelVocabulary` is what a model card records of this: the harmonised name of each of the model's labels and where
the vocabulary came from, so that every later stage (evaluate, --external, lodo, predict, export) matches labels
through the same harmonisation as training did.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
SOURCE_NAMES = {"chexpert": "CheXpert", "mimic": "MIMIC-CXR", "nih": "NIH ChestX-ray14"}
SOURCE_LABELS: dict[str, list[str]] = {"chexpert": CHEXPERT_LABELS, "mimic": MIMIC_LABELS, "nih": [*NIH_LABELS, "No Finding"]}
BUILTIN_SYNONYMS: dict[str, str] = {name: target for table in SYNONYMS.values() for name, target in table.items()}
# Source -> {name: (harmonised name, why)} for a name a built-in source DEFINES differently from the others: it keeps a
# name of its own (applied to data prepared with that --source; a label_map entry overrides it).
OWN_DEFINITIONS: dict[str, dict[str, tuple[str, str]]] = {
    "nih": {"No Finding": ("No Finding (NIH)", "NIH: none of its 14 findings (a fracture, a device or an enlarged "
                           "cardiomediastinum may be present); CheXpert/MIMIC: none of their findings but Support Devices; "
                           "not merged unless a label_map maps it")},
}
UNRECORDED = " (source not recorded)"  # the harmonised name of such a name in a card that did not record its source


def synonym_table() -> list[tuple[str, str, str, str]]:
    """(source, name in the source, harmonised name, why it is kept apart or "") for every built-in source label."""
    rows = []
    for source, names in SOURCE_LABELS.items():
        for name in names:
            own = OWN_DEFINITIONS.get(source, {}).get(name)
            others = [other for other, table in OWN_DEFINITIONS.items() if name in table and other != source]
            why = (f"{', '.join(SOURCE_NAMES[o] for o in others)}'s {name!r} means another thing; not merged unless a label_map says so"
                   if others else "")
            rows.append((source, name, *(own or (SYNONYMS[source].get(name, name), why))))
    return rows


def harmonised_name(name: str, user_map: Mapping[str, str | None], source: str | None = None) -> str | None:
    """The harmonised name of one label of a dataset prepared with `--source source` (None: dropped by the user mapping)."""
    if name in user_map:
        target = user_map[name]
        return None if target is None or str(target).strip() == "" else str(target)
    own = OWN_DEFINITIONS.get(source or "", {}).get(name)
    if own is not None:
        return own[0]
    return BUILTIN_SYNONYMS.get(name, name)


def defined_per_source(name: str) -> bool:
    """Whether a built-in source defines `name` its own way (so its meaning depends on the source)."""
    return any(name in table for table in OWN_DEFINITIONS.values())


@dataclass(frozen=True)
class LabelVocabulary:
    """What a model card records of its labels: each label's harmonised name (the name every other dataset's labels
    are matched against), where the vocabulary came from, and each training dataset's source, labels and label_map."""

    origin: str  # "dataset" (one location), "datasets" (the union of a data.shards list), "data.vocabulary", or LEGACY_ORIGIN
    harmonised: list[str]  # per model label (card order), its harmonised name
    datasets: dict = field(default_factory=dict)  # name -> {"source": --source or None, "labels": [...], "label_map": {...}}

    def to_dict(self) -> dict:
        return {"origin": self.origin, "harmonised": list(self.harmonised), "datasets": dict(self.datasets)}

    @classmethod
    def from_dict(cls, data, num_labels: int) -> LabelVocabulary:
        if not isinstance(data, dict) or set(data) != {"origin", "harmonised", "datasets"}:
            raise UserError(f"vocabulary must hold origin, harmonised and datasets, got {data!r}")
        harmonised = data["harmonised"]
        if not isinstance(harmonised, list) or len(harmonised) != num_labels or not all(isinstance(n, str) for n in harmonised):
            raise UserError(f"vocabulary.harmonised must name each of the {num_labels} labels once")
        if len(set(harmonised)) != len(harmonised) or not isinstance(data["datasets"], dict):
            raise UserError("vocabulary.harmonised names a label twice, or vocabulary.datasets is not an object")
        return cls(str(data["origin"]), list(harmonised), dict(data["datasets"]))


LEGACY_ORIGIN = "card format 2"


def legacy_vocabulary(labels: Sequence[str], several_datasets: bool) -> LabelVocabulary:
    """The vocabulary of a card written before cards recorded it: a data.shards list trained on harmonised names already;
    one dataset's names get the built-in synonyms, and a name whose meaning depends on the (unrecorded) source is
    matched to nothing."""
    if several_datasets:
        return LabelVocabulary(LEGACY_ORIGIN, list(labels))
    return LabelVocabulary(LEGACY_ORIGIN, [name + UNRECORDED if defined_per_source(name) else BUILTIN_SYNONYMS.get(name, name)
                                           for name in labels])


@dataclass(frozen=True)
class Vocabulary:
    labels: list[str]  # the model's label names
    columns: dict[str, list[int | None]]  # dataset -> for each of its labels, its index in `labels` (None: dropped)
    outside: dict[str, list[str]] = field(default_factory=dict)  # dataset -> its labels the given vocabulary lacks (skip_outside)

    def annotated(self, dataset: str) -> list[str]:
        """The model labels `dataset` annotates."""
        return [self.labels[i] for i in self.columns[dataset] if i is not None]


def harmonise(datasets: Mapping[str, Sequence[str]], user_maps: Mapping[str, Mapping[str, str | None]] | None = None,
              vocabulary: Sequence[str] | None = None, sources: Mapping[str, str | None] | None = None,
              skip_outside: bool = False) -> Vocabulary:
    """Map every dataset's labels ({dataset: its label names}) onto one vocabulary, with {dataset: its user mapping}
    and {dataset: the --source it was prepared with}; see the module docstring.

    Refused (UserError): a user-mapping entry the dataset does not have, two labels of one dataset onto one name,
    a mapped name `vocabulary` lacks (with `skip_outside`: left out, listed in `outside`; an external dataset's labels
    the model does not have), and (with several datasets) a dataset sharing no label with the others.
    """
    sources = dict(sources or {})
    user_maps = dict(user_maps or {})
    mapped: dict[str, list[str | None]] = {}
    for dataset, names in datasets.items():
        user_map = dict(user_maps.get(dataset) or {})
        unknown = sorted(set(user_map) - set(names))
        if unknown:
            raise UserError(f"label_map of dataset {dataset}: it has no label(s) {', '.join(map(repr, unknown))} (its labels: {', '.join(names)})")
        targets = [harmonised_name(name, user_map, sources.get(dataset)) for name in names]
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
    outside: dict[str, list[str]] = {}
    if vocabulary:
        duplicates = sorted({name for name in labels if labels.count(name) > 1})
        if duplicates:
            raise UserError(f"data.vocabulary: label names given twice: {', '.join(duplicates)}")
        for dataset, targets in mapped.items():
            missing = [t for t in targets if t is not None and t not in labels]
            if missing and skip_outside:
                outside[dataset] = [name for name, t in zip(datasets[dataset], targets) if t in missing]
                mapped[dataset] = [None if t in missing else t for t in targets]
            elif missing:
                raise UserError(f"dataset {dataset}: label(s) {', '.join(map(repr, missing))} are not in data.vocabulary; "
                                "add them, or map them to null in the dataset's label_map to drop them")
    check_overlap(mapped)
    index = {name: i for i, name in enumerate(labels)}
    return Vocabulary(labels, {dataset: [None if t is None else index[t] for t in targets] for dataset, targets in mapped.items()}, outside)


def check_overlap(mapped: Mapping[str, Sequence[str | None]]) -> None:
    if len(mapped) < 2:
        return
    for dataset, targets in mapped.items():
        others = {t for other, names in mapped.items() if other != dataset for t in names}
        if not ({t for t in targets if t is not None} & others):
            raise UserError(f"dataset {dataset} shares no label with the other datasets; map its labels onto theirs with a label_map")
    if not any(t is not None for targets in mapped.values() for t in targets):
        raise UserError("every label is mapped to nothing")
