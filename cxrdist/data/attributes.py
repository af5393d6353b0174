"""Attributes of the imaged patients (sex, age, view, race, insurance, ...): their types, the manifest's record of
them, each sample's values and the groups the subgroup audit (cxrdist/evaluation/scoring/subgroups.py) forms. They are
never an input of the model or the loss: the train stream's batches carry only images and labels.

`prepare` reads them (cxrdist/data/ingest/attribute_table.py):
- the public sources' own columns, always: CheXpert `Sex`, `Age`; NIH ChestX-ray14 `Patient Gender`, `Patient Age`;
- the view every source gives (CheXpert `Frontal/Lateral` + `AP/PA`, NIH `View Position`, MIMIC-CXR `ViewPosition`
  of its metadata CSV, a generic CSV's `view`) as the attribute `view` (PA, AP, LATERAL, LL);
- `--attributes NAME[=COLUMN],...`: more columns of the label CSV (MIMIC: of its metadata CSV), or of a separate
  table `--attributes-table FILE` joined by patient id or image path.

Types (the manifest's `attributes` documents each; a sample's json holds `"attributes": {name: value}`):
- `sex`: "F" or "M" (Female/Male/F/M in any case; any other value kept as written);
- `age`: years, a number (NIH's "058Y", "6M", "3W", "10D" spellings read too), grouped by the bins `--age-bins`
  (default 18,40,60,80: 0-17, 18-39, 40-59, 60-79, 80+); above 120 years is taken as a typo: unknown;
- anything else: a category (text), at most MAX_CATEGORIES distinct values.
A missing value (blank, NaN, None, unknown, ...) is null, and forms the group "unknown".
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from cxrdist.errors import UserError

SEX, AGE, CATEGORY = "sex", "age", "category"
VIEW = "view"
DATASET = "dataset"  # the audit's own attribute when an evaluation holds several datasets (each sample's dataset)
UNKNOWN = "unknown"
DEFAULT_AGE_BINS = (18.0, 40.0, 60.0, 80.0)
MAX_AGE = 120
MAX_CATEGORIES = 50
COLUMN_PREFIX = "attr_"  # prediction CSVs: one column attr_<name> per attribute
MISSING = {"", "nan", "na", "n/a", "none", "null", "<na>", "unknown", "unk"}
_SEXES = {"f": "F", "female": "F", "m": "M", "male": "M"}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([ydwm])?\s*$", re.IGNORECASE)
_AGE_UNITS = {"y": 1.0, "m": 1 / 12, "w": 7 / 365.25, "d": 1 / 365.25}


@dataclass
class AttributeSpec:
    """One attribute as the manifest documents it."""

    name: str
    kind: str  # sex | age | category
    source: str  # where prepare read it, e.g. "column 'Patient Age' of Data_Entry_2017.csv"
    bins: list[float] = field(default_factory=list)  # age only: the lower edges of the groups after the first
    unknown: int = 0  # images without a value
    values: dict[str, int] = field(default_factory=dict)  # sex and category: images per value

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> AttributeSpec:
        return cls(**dict(data))


# ---------------------------------------------------------------- values


def kind_of(name: str) -> str:
    return {SEX: SEX, AGE: AGE}.get(name.lower(), CATEGORY)


def is_missing(text: str) -> bool:
    return text.strip().lower() in MISSING


def sex_value(text: str) -> str | None:
    return None if is_missing(text) else _SEXES.get(text.strip().lower(), text.strip())


def age_value(text: str) -> float | None:
    """Years from "58", "58.5", "058Y", "6M", "3W", "10D"; None when missing; ValueError when not an age."""
    if is_missing(text):
        return None
    match = _AGE.match(text)
    if match is None:
        raise ValueError(text)
    return round(float(match[1]) * _AGE_UNITS[(match[2] or "y").lower()], 3)


def spec_of(name: str, kind: str, source: str, values: Sequence, bins: Sequence[float] = ()) -> AttributeSpec:
    """The spec of an attribute with these values (one per image)."""
    known = [v for v in values if v is not None]
    counts = {} if kind == AGE else dict(sorted(Counter(map(str, known)).items()))
    return AttributeSpec(name, kind, source, [float(b) for b in bins] if kind == AGE else [], len(values) - len(known), counts)


def sample_attributes(columns: Mapping[str, list], i: int) -> tuple[tuple[str, object], ...]:
    """Record i's (name, value) pairs, as its shard json's "attributes" holds them."""
    return tuple((name, values[i]) for name, values in columns.items())


def specs_of(manifest) -> list[AttributeSpec]:
    """A manifest's attributes (none for one prepared before they were kept)."""
    return [AttributeSpec.from_dict(spec) for spec in getattr(manifest, "attributes", None) or []]


def merged_specs(members: Mapping[str, Sequence[Mapping]]) -> list[dict]:
    """Several datasets' attributes as one list (by name; the first dataset's age bins); the same name of another
    kind is a UserError."""
    merged: dict[str, dict] = {}
    for dataset, specs in members.items():
        for spec in specs:
            seen = merged.setdefault(spec["name"], {**spec, "source": f"{dataset}: {spec['source']}", "values": {}, "unknown": 0})
            if seen["kind"] != spec["kind"]:
                raise UserError(f"data.shards: the attribute {spec['name']!r} is a {seen['kind']} in one dataset and a {spec['kind']} "
                                f"in {dataset}; re-prepare one of them with another name")
            seen["unknown"] += spec["unknown"]
            for value, n in spec["values"].items():
                seen["values"][value] = seen["values"].get(value, 0) + n
    return list(merged.values())


# ---------------------------------------------------------------- groups


def age_group(years: float | None, bins: Sequence[float]) -> str:
    """'0-17', '18-39', ..., '80+' for bins (18, 40, 60, 80); 'unknown' for None."""
    if years is None or (isinstance(years, float) and math.isnan(years)):
        return UNKNOWN
    edges = [0.0, *map(float, bins)]
    k = bisect.bisect_right(edges, float(years)) - 1
    if k == len(edges) - 1:
        return f"{edges[k]:g}+"
    upper = edges[k + 1]
    return f"{edges[k]:g}-{upper - 1:g}" if upper.is_integer() and edges[k].is_integer() else f"{edges[k]:g}-<{upper:g}"


def group_of(value, spec: AttributeSpec) -> str:
    """The audit group of one sample's value."""
    if spec.kind == AGE:
        return age_group(value, spec.bins)
    return UNKNOWN if value is None or value == "" else str(value)


def groups_of(values: Sequence, spec: AttributeSpec) -> list[str]:
    """The audit group of each value (one per sample); each distinct value is grouped once."""
    names = {value: group_of(value, spec) for value in set(values)}
    return [names[value] for value in values]


def group_order(spec: AttributeSpec) -> list[str]:
    """Every group of an attribute in the order outputs list them: age bins in order, values sorted, unknown last."""
    if spec.kind == AGE:
        edges = [0.0, *spec.bins]
        return [age_group(edge, spec.bins) for edge in edges] + [UNKNOWN]
    return sorted(spec.values) + [UNKNOWN]


def csv_columns(attributes: Sequence[Mapping]) -> dict[str, list]:
    """Prediction CSV columns attr_<name> from each sample's attributes (blank where unknown), in first-seen order."""
    names = list(dict.fromkeys(name for sample in attributes for name in sample))
    return {COLUMN_PREFIX + name: ["" if sample.get(name) is None else sample[name] for sample in attributes] for name in names}
