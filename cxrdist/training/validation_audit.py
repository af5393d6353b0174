"""The subgroup audit of each validation during training (cxrdist/evaluation/scoring/subgroups.py): the EMA model's
AUCs per attribute and group of the validation fold, with patient-bootstrap intervals and flagged gaps, in the eval
record of metrics.jsonl (`subgroups`) and in W&B (`val/subgroup_auc/<attribute>/<group>`, escaped). No operating
points yet (their thresholds come from every fold's out-of-fold predictions): those are `cxrdist evaluate`'s."""

from __future__ import annotations

from dataclasses import dataclass

from cxrdist.data.attributes import AttributeSpec, specs_of
from cxrdist.evaluation.scoring.gathered import Predictions, probabilities
from cxrdist.evaluation.scoring.subgroups import available_attributes, check_intersections, intersection_pairs, subgroup_audit
from cxrdist.labels.policy import apply_policy


@dataclass
class ValidationAudit:
    specs: list[AttributeSpec]
    min_patients: int
    resamples: int
    intersections: list[tuple[str, str]]

    @classmethod
    def of(cls, eval_config, manifest) -> ValidationAudit:
        """Checked before training starts: an intersection the data cannot form is a UserError."""
        specs = specs_of(manifest)
        pairs = intersection_pairs(list(eval_config.audit_intersections))
        check_intersections(pairs, available_attributes(specs, len(getattr(manifest, "entries", ())) > 1))
        return cls(specs, eval_config.audit_min_patients, eval_config.audit_resamples, pairs)

    def run(self, preds: Predictions, model: str, labels: list[str], policy: list[str]) -> dict:
        targets, mask = apply_policy(preds.raw, policy)
        patients = [str(patient or key) for key, patient in zip(preds.keys, preds.meta["patient"])]
        return subgroup_audit(labels, targets.numpy(), probabilities(preds.logits[model]), mask.numpy(), patients, preds.meta["attributes"],
                              self.specs, preds.meta.get("dataset"), min_patients=self.min_patients, resamples=self.resamples,
                              intersections=self.intersections)
