"""The subgroup audit of `cxrdist evaluate` (`evaluation_audit`) and its part at the report's operating points: per
reported group, each label's sensitivity and false-positive rate at the thresholds chosen on the out-of-fold predictions
(cxrdist/evaluation/clinical/operating_points.py), and the underdiagnosis rate with its patient-bootstrap interval and
its paired gap to the rest (on the evaluation's draws, like the AUC gaps of cxrdist/evaluation/scoring/subgroups.py).

Underdiagnosis (Seyyed-Kalantari et al., Nature Medicine 2021): among the images that have a finding, the fraction the
model calls "No Finding", i.e. the false-positive rate of the "No Finding" label: images whose "No Finding" target is
0 (scored under the evaluation rule), called "No Finding" when its probability reaches its threshold. A vocabulary
without "No Finding" (NIH's 14 findings): an image has a finding when any label's target is 1, and is called "No
Finding" when no label with a threshold at that operating point reaches it (a label whose threshold is unreachable or
unknown is never called). As for the AUCs, a gap is compared only where the group and the rest each have at least
MIN_CASES patients with an image called "No Finding" and MIN_CASES with one called otherwise (a rate of 0 of 30 has no
bootstrap variance to speak of).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cxrdist.evaluation.scoring.bootstrap import percentile_interval
from cxrdist.evaluation.scoring.group_tallies import group_sums
from cxrdist.evaluation.scoring.subgroup_bootstrap import resampled_sums
from cxrdist.evaluation.scoring.subgroups import MIN_CASES, SubgroupAudit, add_aucs, fewest_patients, flag_gaps, no_audit, start_audit

NO_FINDING = "No Finding"
WITH_NO_FINDING = ("the false-positive rate of 'No Finding': among images whose 'No Finding' target is 0, the fraction whose "
                   "'No Finding' probability reaches its threshold (Seyyed-Kalantari et al. 2021)")
WITHOUT_NO_FINDING = ("the vocabulary has no 'No Finding': among images with at least one finding (a target of 1), the fraction on which "
                      "no label reaches its threshold (a label without a reachable threshold is never called)")

Thresholds = Mapping[str, Mapping[str, float | None]]  # {label: {operating point: threshold, None = never called}}


def add_rates(audit: SubgroupAudit, thresholds: Thresholds, points: Sequence[str], targets: np.ndarray, scores: np.ndarray,
              mask: np.ndarray) -> None:
    """Sensitivity and false-positive rate per label, and the underdiagnosis rate with its gap, of every reported group."""
    rates = operating_rates(audit, thresholds, points, targets, scores, mask)
    for g in audit.groupings:
        for k, name in enumerate(g.groups):
            if audit.entry(g, name)["reported"]:
                audit.entry(g, name)["operating_points"] = {point: rates[g.name][point][k] for point in points}
    has, called = underdiagnosed(audit.labels, thresholds, points, targets, scores, mask)
    audit.result["underdiagnosis_definition"] = WITH_NO_FINDING if NO_FINDING in audit.labels else WITHOUT_NO_FINDING
    groups = audit.reported()
    columns = [has & members for members in [np.ones(len(targets), dtype=bool)] + [m for _, _, m in groups]]
    columns += [has & called[point] & members for members in [np.ones(len(targets), dtype=bool)] + [m for _, _, m in groups] for point in points]
    sums = resampled_sums(columns, audit.patients, audit.n_patients, audit.blocks)
    found, counted = sums[:, : len(groups) + 1], sums[:, len(groups) + 1 :].reshape(-1, len(groups) + 1, len(points))
    called_table = np.stack([called[point] for point in points], axis=1)
    cases = {g.name: fewest_patients(audit, g, has[:, None] & called_table, has[:, None] & ~called_table) for g in audit.groupings}
    for k, (g, name, members) in enumerate(groups):
        index = g.groups.index(name)
        audit.entry(g, name)["underdiagnosis"] = {
            point: group_underdiagnosis(audit, has, called[point], members, (np.stack([found[:, 0], counted[:, 0, p]], axis=1),
                                                                             np.stack([found[:, k + 1], counted[:, k + 1, p]], axis=1)),
                                        cases[g.name][index, p])
            for p, point in enumerate(points)}


def operating_rates(audit: SubgroupAudit, thresholds: Thresholds, points: Sequence[str], targets, scores, mask) -> dict:
    """{grouping: {point: per group {label: threshold, sensitivity, false-positive rate}}} (None without both classes),
    from the counts per cell of the scored positives and negatives, and of those called at each point."""
    scored, positive = mask > 0, targets > 0
    labels = audit.labels
    base = audit.tallies.cells @ np.hstack([scored & positive, scored & ~positive]).astype(np.float64)
    rates: dict = {g.name: {} for g in audit.groupings}
    for point in points:
        called = np.stack([scores[:, j] >= t if (t := thresholds[label].get(point)) is not None else np.zeros(len(targets), dtype=bool)
                           for j, label in enumerate(labels)], axis=1)
        hits = audit.tallies.cells @ np.hstack([scored & positive & called, scored & ~positive & called]).astype(np.float64)
        for g in audit.groupings:
            p, n = np.split(group_sums(audit.tallies, g.name, len(g.groups), base), 2, axis=1)
            tp, fp = np.split(group_sums(audit.tallies, g.name, len(g.groups), hits), 2, axis=1)
            rates[g.name][point] = [{label: group_rate(thresholds[label].get(point), tp[i, j], p[i, j], fp[i, j], n[i, j])
                                     for j, label in enumerate(labels)} for i in range(len(g.groups))]
    return rates


def group_rate(threshold: float | None, tp: float, p: float, fp: float, n: float) -> dict:
    known = threshold is not None and p > 0 and n > 0
    return {"threshold": threshold, "sensitivity": float(tp / p) if known else None, "fpr": float(fp / n) if known else None}


def underdiagnosed(labels: Sequence[str], thresholds: Thresholds, points: Sequence[str], targets, scores, mask
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(which images have a finding, {point: which images the model calls "No Finding"}), by the module's definition."""
    scored = mask > 0
    if NO_FINDING in labels:
        j = labels.index(NO_FINDING)
        has = scored[:, j] & (targets[:, j] == 0)
        called = {p: scores[:, j] >= threshold if (threshold := thresholds[NO_FINDING].get(p)) is not None else np.zeros(len(targets), bool)
                  for p in points}
        return has, called
    has = (scored & (targets > 0)).any(axis=1)
    called = {}
    for point in points:
        positive = np.zeros(len(targets), dtype=bool)
        for j, label in enumerate(labels):
            threshold = thresholds[label].get(point)
            if threshold is not None:
                positive |= scores[:, j] >= threshold
        called[point] = ~positive
    return has, called


def group_underdiagnosis(audit: SubgroupAudit, has: np.ndarray, called: np.ndarray, members: np.ndarray,
                         sums: tuple[np.ndarray, np.ndarray], cases: int) -> dict:
    """The group's rate, its interval, and its paired gap to the rest (when `cases`, the fewest patients of one outcome on
    a side, reach MIN_CASES); `sums`: the (resamples, 2) sums of (images with a finding, those called "No Finding") of
    everyone and of the group in each resample."""
    def rate(found: np.ndarray, counted: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return counted / found

    everyone, group = sums
    inside, rest = has & members, has & ~members
    if not inside.any():
        return {"images_with_finding": 0, "rate": None, "interval": None, "gap": None}
    point = float((called & inside).sum() / inside.sum())
    resampled = rate(group[:, 0], group[:, 1])
    result = {"images_with_finding": int(inside.sum()), "rate": point, "interval": percentile_interval(resampled, audit.level), "gap": None}
    if cases >= MIN_CASES:
        other = float((called & rest).sum() / rest.sum())
        result["gap"] = audit.gap(point - other, resampled - rate(everyone[:, 0] - group[:, 0], everyone[:, 1] - group[:, 1]), cases)
    return result


def thresholds_of(operating_points: Mapping) -> dict[str, dict[str, float | None]]:
    """{label: {point: threshold}} of metrics.json's operating points (None where unreachable or unknown)."""
    per_label = operating_points["per_label"]
    return {label: {point: entry.get("threshold") for point, entry in per_point.items()} for label, per_point in per_label.items()}


def audit_aucs(labels: Sequence[str], targets: np.ndarray, scores: np.ndarray, mask: np.ndarray, patients: Sequence, attributes: Sequence[Mapping],
               specs: Sequence, datasets: Sequence[str] | None, **settings) -> SubgroupAudit | None:
    """The first part of `cxrdist evaluate`'s audit: every group's AUCs (None without attributes). Its `whole` holds the
    evaluation's own resampled AUCs, which the evaluation's interval then reuses (`bootstrap.auc_intervals(resampled=)`)."""
    audit = start_audit(labels, patients, attributes, specs, datasets, **settings)
    if audit is not None:
        add_aucs(audit, targets, scores, mask)
    return audit


def finish_audit(audit: SubgroupAudit | None, targets: np.ndarray, scores: np.ndarray, mask: np.ndarray, operating_points: Mapping | None) -> dict:
    """The rest: the rates at the operating points (when the out-of-fold predictions gave thresholds), and the flags
    over all of its gaps."""
    if audit is None:
        return no_audit()
    if operating_points:
        add_rates(audit, thresholds_of(operating_points), operating_points["points"], targets, scores, mask)
    else:
        audit.result["notes"] = ["no out-of-fold predictions (fold-K/best/val_predictions.csv), so no operating points: "
                                 "no sensitivity, false-positive or underdiagnosis rate per group"]
    return flag_gaps(audit)


def evaluation_audit(labels: Sequence[str], targets: np.ndarray, scores: np.ndarray, mask: np.ndarray, patients: Sequence,
                     attributes: Sequence[Mapping], specs: Sequence, datasets: Sequence[str] | None, operating_points: Mapping | None,
                     **settings) -> dict:
    """`cxrdist evaluate`'s audit in one call: the AUCs of every group, its rates at the operating points, the flags."""
    audit = audit_aucs(labels, targets, scores, mask, patients, attributes, specs, datasets, **settings)
    return finish_audit(audit, targets, scores, mask, operating_points)
