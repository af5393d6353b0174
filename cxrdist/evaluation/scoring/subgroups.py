"""The subgroup audit, "who the model fails": per attribute (sex, age, view, dataset, any attribute prepare kept;
cxrdist/data/attributes.py) and group, the AUCs of the evaluated images, and each group's gap to the rest.

Per group: images, patients, prevalence per label (positives among the scored entries), per-label AUC (scikit-learn)
and macro AUC (mean over the labels with both classes in the group) with patient-bootstrap percentile intervals, and
the gap to the rest (the group's AUC minus the AUC of every other image) per label and for the macro AUC (over the
labels both sides can score), with a PAIRED interval: both sides are scored on the same resamples, the evaluation's
own draws (cxrdist/evaluation/scoring/subgroup_bootstrap.py). Intersections of two attributes ("sex × age") on
request. `cxrdist evaluate` adds the rates at the report's operating points and the underdiagnosis rate
(cxrdist/evaluation/clinical/subgroup_rates.py).

Small groups: a group with fewer than `min_patients` patients (default MIN_PATIENTS) is reported as "too few
patients", no number (privacy, and an interval that wide says nothing); its images still count in the rest. A label's
gap is compared only where the group and the rest each have at least MIN_CASES patients with the finding and
MIN_CASES without it (with fewer, the AUC moves in steps too coarse for an interval to mean anything).

Flags: a gap is flagged when its family-wise interval excludes zero: Bonferroni over every gap of the audit (m gaps:
each reported group's per-label and macro AUC gaps and its underdiagnosis gaps), gap ± q x its bootstrap standard
error, q the 1 - 0.05 / 2m quantile of Student's t with (the gap's fewest cases - 1) degrees of freedom (the fewer of
the patients with and without the finding, or the outcome, on either side). The t, not the normal quantile: a
bootstrap standard error from a few dozen cases runs small and its tails are heavy, and with normal quantiles audits
of models that fail nobody were flagged 17.5% of the time; a bootstrap max-t let one skewed gap raise every threshold
(to 4.1 standard errors in a planted test). 1,000 resamples cannot resolve a 0.05/m percentile, hence the standard
error. So an audit of a model that fails no group flags something with probability about FAMILY_LEVEL (5%); the
rate measured on synthetic cohorts is in README.md ("Who the model fails").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from cxrdist.data.attributes import DATASET, UNKNOWN, AttributeSpec, group_order, groups_of
from cxrdist.errors import UserError
from cxrdist.evaluation.scoring.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, percentile_interval
from cxrdist.evaluation.scoring.group_tallies import Tallies, patients_by_group, tallies
from cxrdist.evaluation.scoring.subgroup_bootstrap import draws, group_resample_aucs

MIN_PATIENTS = 20
MIN_CASES = 10
FAMILY_LEVEL = 0.05
TOO_FEW = "too few patients"
INTERSECTION = "intersection"
CROSS = " × "
NO_ATTRIBUTES = ("no subgroup audit: the shards hold no attributes (prepared before cxrdist kept sex, age and view, or from a "
                 "table without them); re-run `cxrdist prepare` to audit")


@dataclass
class Grouping:
    """One attribute (or intersection of two) over the evaluated images."""

    name: str
    kind: str  # sex | age | category | intersection
    source: str
    groups: list[str]  # output order
    of_image: np.ndarray  # (N,) index into groups


@dataclass
class SubgroupAudit:
    """The audit of one evaluation while it is computed: its groupings, the evaluation's draws, and the result."""

    labels: list[str]
    groupings: list[Grouping]
    min_patients: int
    level: float
    patients: np.ndarray  # patient number of each image (bootstrap.patient_index)
    n_patients: int
    blocks: list[np.ndarray]  # the draws: (n_patients, b) counts per block of resamples
    tallies: Tallies  # the groupings' cells and (patient, group) pairs
    result: dict = field(default_factory=dict)
    gaps: list[tuple[dict, np.ndarray]] = field(default_factory=list)  # each gap entry of `result` and its resampled values
    whole: np.ndarray | None = None  # (resamples, labels) every image's AUCs: `bootstrap_aucs` on these draws, bit for bit

    def gap(self, value: float, resampled: np.ndarray, cases: int) -> dict:
        """A group's difference to the rest as `result` records it (value, paired interval, standard error, the fewest
        patients of one outcome on either side); kept for the flags."""
        entry = {**gap(value, resampled, self.level), "cases": int(cases)}
        self.gaps.append((entry, resampled))
        return entry

    def entry(self, grouping: Grouping, group: str) -> dict:
        return self.result["attributes"][grouping.name]["groups"][group]

    def reported(self) -> list[tuple[Grouping, str, np.ndarray]]:
        """(grouping, group, its images as a boolean mask) for every group reported with numbers."""
        return [(g, name, g.of_image == k) for g in self.groupings for k, name in enumerate(g.groups) if self.entry(g, name)["reported"]]


# ---------------------------------------------------------------- groups


def groupings(attributes: Sequence[Mapping], specs: Sequence[AttributeSpec], datasets: Sequence[str] | None,
              intersections: Sequence[Sequence[str]] = ()) -> list[Grouping]:
    """Every attribute of the manifest, the dataset (when the images come from several), and the requested intersections."""
    found = [grouping(spec.name, spec.kind, spec.source, groups_of([sample.get(spec.name) for sample in attributes], spec), group_order(spec))
             for spec in specs]
    if datasets is not None and len(set(datasets)) > 1:
        found.append(grouping(DATASET, "category", "the dataset of each image", list(datasets), sorted(set(datasets))))
    return found + [intersection(found, pair) for pair in intersections]


def grouping(name: str, kind: str, source: str, values: Sequence[str], order: Sequence[str]) -> Grouping:
    codes, found = pd.factorize(np.asarray(values, dtype=object))  # group names: strings, never missing
    present = set(found)
    known = [g for g in order if g in present and g != UNKNOWN] + sorted(present - set(order) - {UNKNOWN})
    groups = known + ([UNKNOWN] if UNKNOWN in present else [])
    index = {g: k for k, g in enumerate(groups)}
    return Grouping(name, kind, source, groups, np.array([index[g] for g in found], dtype=np.int64)[codes])


def intersection_pairs(requested: Sequence) -> list[tuple[str, str]]:
    """`--intersect sex,age` / `eval.audit_intersections: ["sex,age"]` (or [[sex, age]]) -> [("sex", "age")]."""
    pairs = []
    for item in requested or ():
        names = [n.strip() for n in item.split(",")] if isinstance(item, str) else [str(n).strip() for n in item]
        if len(names) != 2 or not all(names):
            raise UserError(f"intersection {item!r}: name two attributes separated by a comma, e.g. sex,age")
        pairs.append((names[0], names[1]))
    return pairs


def check_intersections(pairs: Sequence[tuple[str, str]], available: Sequence[str]) -> None:
    """An attribute the data lacks, or one crossed with itself, is a UserError (checked before any prediction)."""
    for a, b in pairs:
        if a == b:
            raise UserError(f"intersection {a}{CROSS}{b}: an attribute crossed with itself is the attribute; name two different attributes")
        for name in (a, b):
            if name not in available:
                raise UserError(f"intersection {a}{CROSS}{b}: the evaluated data has no attribute {name!r} "
                                f"(it has: {', '.join(available) or 'none'})")


def available_attributes(specs: Sequence[AttributeSpec], several_datasets: bool) -> list[str]:
    return [spec.name for spec in specs] + ([DATASET] if several_datasets else [])


def intersection(found: Sequence[Grouping], pair: Sequence[str]) -> Grouping:
    """The groups of two attributes crossed ("F × 40-59")."""
    names = {g.name: g for g in found}
    check_intersections([tuple(pair)], list(names))
    a, b = pair
    first, second = names[a], names[b]
    order = [f"{x}{CROSS}{y}" for x in first.groups for y in second.groups]
    values = [order[i * len(second.groups) + j] for i, j in zip(first.of_image, second.of_image)]
    return grouping(f"{a}{CROSS}{b}", INTERSECTION, f"{a} crossed with {b}", values, order)


# ---------------------------------------------------------------- the audit


def start_audit(labels: Sequence[str], patients: Sequence, attributes: Sequence[Mapping], specs: Sequence[AttributeSpec],
                datasets: Sequence[str] | None = None, min_patients: int = MIN_PATIENTS, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                level: float = DEFAULT_LEVEL, intersections: Sequence[Sequence[str]] = ()) -> SubgroupAudit | None:
    """The groupings and the evaluation's draws (`patients`: the bootstrap's groups, one id per image); None without attributes."""
    if min_patients < 1:
        raise UserError(f"the smallest group reported must have at least 1 patient, not {min_patients}")
    found = groupings(attributes, specs, datasets, intersections)
    if not found:
        return None
    patient_no, n_patients, blocks = draws(patients, resamples, seed)
    audit = SubgroupAudit(list(labels), found, min_patients, level, patient_no, n_patients, blocks, tallies(found, patient_no, n_patients))
    audit.result = {"min_patients": min_patients, "resamples": resamples, "level": level, "seed": seed, "unit": "patient",
                    "attributes": {g.name: {"kind": g.kind, "source": g.source, "groups": group_counts(audit, g)} for g in found}}
    return audit


def group_counts(audit: SubgroupAudit, g: Grouping) -> dict[str, dict]:
    counts = patients_by_group(audit.tallies, g.name, len(g.groups), np.ones((len(g.of_image), 1), dtype=bool))[0][:, 0]
    images, min_patients = np.bincount(g.of_image, minlength=len(g.groups)), audit.min_patients
    return {name: ({"reported": True, "images": int(images[k]), "patients": int(counts[k])} if counts[k] >= min_patients
                   else {"reported": False, "note": f"{TOO_FEW} (fewer than {min_patients})"}) for k, name in enumerate(g.groups)}


def fewest_patients(audit: SubgroupAudit, g: Grouping, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(groups, K): for K pairs of image columns (boolean (images, K) each, e.g. with a finding and without it), the
    fewest patients with an image of one of the two, in the group or in the rest."""
    inside, outside = patients_by_group(audit.tallies, g.name, len(g.groups), np.hstack([first, second]))
    k = first.shape[1]
    return np.minimum.reduce([inside[:, :k], outside[:, :k], inside[:, k:], outside[:, k:]])


def case_table(audit: SubgroupAudit, g: Grouping, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(groups, labels): the fewest patients of one class (with the finding, without it) in the group or in its rest."""
    scored, positive = mask > 0, targets > 0
    return fewest_patients(audit, g, scored & positive, scored & ~positive)


def add_aucs(audit: SubgroupAudit, targets: np.ndarray, scores: np.ndarray, mask: np.ndarray) -> None:
    """Prevalence, per-label and macro AUC with intervals, and the gaps to the rest, of every reported group."""
    groups = audit.reported()
    members = np.array([m for _, _, m in groups], dtype=bool).reshape(len(groups), len(targets))
    aucs, resampled, audit.whole = group_resample_aucs(targets, scores, mask, members, audit.patients, audit.n_patients, audit.blocks)
    cases = {g.name: case_table(audit, g, targets, mask) for g in audit.groupings}
    for k, (g, name, member) in enumerate(groups):
        entry = group_aucs(audit, targets, mask, member, (aucs[0, k], aucs[1, k]), (resampled[:, 0, k], resampled[:, 1, k]),
                           cases[g.name][g.groups.index(name)])
        audit.entry(g, name).update(entry)


def group_aucs(audit: SubgroupAudit, targets, mask, members: np.ndarray, aucs: tuple[np.ndarray, np.ndarray],
               resampled: tuple[np.ndarray, np.ndarray], cases: np.ndarray) -> dict:
    """The group's entry from its and the rest's AUCs (per label), their resampled AUCs and the fewest patients of a class."""
    labels, level = audit.labels, audit.level
    (point, other), (inside, rest) = aucs, resampled
    scored = mask[members] > 0
    positives = (targets[members] > 0) & scored
    own = np.isfinite(point)
    both = own & np.isfinite(other) & (cases >= MIN_CASES)
    return {
        "prevalence": {label: (float(positives[:, j].sum() / scored[:, j].sum()) if scored[:, j].any() else None) for j, label in enumerate(labels)},
        "per_label": {label: (float(point[j]) if own[j] else None) for j, label in enumerate(labels)},
        "macro_auc": float(point[own].mean()) if own.any() else None,
        "interval": {"per_label": {label: (percentile_interval(inside[:, j], level) if own[j] else None) for j, label in enumerate(labels)},
                     "macro_auc": percentile_interval(nanmean_rows(inside[:, own]), level) if own.any() else None},
        "gap": {"per_label": {label: (audit.gap(point[j] - other[j], inside[:, j] - rest[:, j], cases[j]) if both[j] else None)
                              for j, label in enumerate(labels)},
                "macro_auc": (audit.gap(point[both].mean() - other[both].mean(), nanmean_rows(inside[:, both]) - nanmean_rows(rest[:, both]),
                                        cases[both].min())
                              if both.any() else None),
                "macro_labels": int(both.sum())},
    }


def nanmean_rows(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # a resample where every label has one class: NaN, dropped by the interval
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=1) if values.shape[1] else np.full(len(values), np.nan)


def gap(value: float, resampled: np.ndarray, level: float) -> dict:
    """A group's difference to the rest, its paired percentile interval and the bootstrap standard error (for the flag)."""
    finite = resampled[np.isfinite(resampled)]
    return {"value": float(value), "interval": percentile_interval(resampled, level),
            "se": float(np.std(finite, ddof=1)) if len(finite) > 1 else None}


# ---------------------------------------------------------------- flags and summaries


def gap_entries(result: dict) -> list[tuple[str, str, str, dict]]:
    """(attribute, group, metric, gap entry) of every gap of the audit (AUCs and underdiagnosis)."""
    found = []
    for attribute, info in result.get("attributes", {}).items():
        for group, entry in info["groups"].items():
            gaps = entry.get("gap", {})
            found += [(attribute, group, f"AUC {label}", g) for label, g in gaps.get("per_label", {}).items() if g]
            if gaps.get("macro_auc"):
                found.append((attribute, group, "macro AUC", gaps["macro_auc"]))
            found += [(attribute, group, f"underdiagnosis at {point}", u["gap"]) for point, u in entry.get("underdiagnosis", {}).items()
                      if u.get("gap")]
    return found


def flag_gaps(audit: SubgroupAudit, family_level: float = FAMILY_LEVEL) -> dict:
    """`adjusted_interval` (the family-wise interval) and `flagged` on every gap, and the flagged ones listed (largest first)."""
    family = [entry for entry, _ in audit.gaps if entry["se"] and math.isfinite(entry["value"])]
    tail = 1 - family_level / (2 * max(len(family), 1))
    names = {id(entry): (attribute, group, metric) for attribute, group, metric, entry in gap_entries(audit.result)}
    flagged = []
    for entry in family:
        q = float(student_t.ppf(tail, entry["cases"] - 1))
        entry["adjusted_interval"] = [entry["value"] - q * entry["se"], entry["value"] + q * entry["se"]]
        entry["flagged"] = bool(entry["adjusted_interval"][0] > 0 or entry["adjusted_interval"][1] < 0)
        if entry["flagged"]:
            attribute, group, metric = names[id(entry)]
            flagged.append({"attribute": attribute, "group": group, "metric": metric, "gap": entry["value"], "interval": entry["interval"],
                            "adjusted_interval": entry["adjusted_interval"]})
    audit.result.update(comparisons=len(family), family_level=family_level, flagged=sorted(flagged, key=lambda f: -abs(f["gap"])))
    return audit.result


def subgroup_audit(labels: Sequence[str], targets: np.ndarray, scores: np.ndarray, mask: np.ndarray, patients: Sequence,
                   attributes: Sequence[Mapping], specs: Sequence[AttributeSpec], datasets: Sequence[str] | None = None, **settings) -> dict:
    """The AUC audit of one evaluation as a JSON-ready dict (training's validation; `cxrdist evaluate` adds rates first)."""
    audit = start_audit(labels, patients, attributes, specs, datasets, **settings)
    if audit is None:
        return no_audit()
    add_aucs(audit, targets, scores, mask)
    return flag_gaps(audit)


def no_audit() -> dict:
    return {"attributes": {}, "flagged": [], "notes": [NO_ATTRIBUTES]}


def escape_key(text: str) -> str:
    """A name or value as one W&B key component: percent-encoded, so '/' or spaces never split or change a key."""
    return quote(str(text), safe="")


def wandb_values(result: dict, prefix: str) -> dict[str, float]:
    """Scalars for W&B: each reported group's macro AUC and its gap to the rest, and how many gaps are flagged."""
    values: dict[str, float] = {}
    for attribute, info in result.get("attributes", {}).items():
        for group, entry in info["groups"].items():
            where = f"{escape_key(attribute)}/{escape_key(group)}"
            if entry.get("macro_auc") is not None:
                values[f"{prefix}/subgroup_auc/{where}"] = entry["macro_auc"]
            if (entry.get("gap") or {}).get("macro_auc"):
                values[f"{prefix}/subgroup_gap/{where}"] = entry["gap"]["macro_auc"]["value"]
    if result.get("attributes"):
        values[f"{prefix}/subgroups_flagged"] = len(result.get("flagged", []))
    return values


def summary_line(result: dict) -> str | None:
    """One line for the console: how many gaps are flagged, the largest named."""
    if not result.get("attributes"):
        return None
    flagged = result.get("flagged", [])
    if not flagged:
        return f"subgroup audit: no gap flagged ({result.get('comparisons', 0)} compared)"
    top = flagged[0]
    return (f"subgroup audit: {len(flagged)} of {result['comparisons']} gaps flagged; largest: {top['metric']} for "
            f"{top['attribute']} = {top['group']}, {top['gap']:+.3f} against the rest")
