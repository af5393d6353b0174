"""Planted subgroup failures for `cxrdist synth`: what the subgroup audit must find (tests/test_audit_planted.py).

- `--planted-gap "LABEL:ATTRIBUTE=VALUE:STRENGTH"`: LABEL's mark is drawn at STRENGTH (0 to 1) of its usual strength
  on the images of one group: `sex=F`, `view=AP` (PA, AP, LATERAL) or an age range `age=60-90` (inclusive). The
  labels stay as they are, so the finding is there but harder to see in that group, e.g. "Pleural Effusion:sex=F:0.3".
- `--planted-shortcut LABEL`: a marker (a bright tag in the top-left corner, like a portable film's) on AP films:
  on P_MARKER_IF_PRESENT of the AP images whose study has LABEL written 1 and P_MARKER_OTHERWISE of the other AP
  images; never on PA or lateral films. A model that learns the marker scores LABEL better on AP films than its
  own mark allows there.
Both are drawn from the cohort (label_table.py) after it is sampled, so the labels and every other image are those of
the same seed without a plant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrdist.data.synth.label_table import LABELS, Cohort
from cxrdist.errors import UserError

GAP_ATTRIBUTES = ("sex", "view", "age")
P_MARKER_IF_PRESENT, P_MARKER_OTHERWISE = 0.9, 0.1
_STREAM_MARKER = 0x5C07


@dataclass(frozen=True)
class PlantedGap:
    label: str
    attribute: str
    value: str
    strength: float

    def members(self, cohort: Cohort) -> np.ndarray:
        """Which images of the cohort are in the group."""
        column = cohort.table[self.attribute]
        if self.attribute != "age":
            return column.astype(str).to_numpy() == self.value
        low, high = (float(x) for x in self.value.split("-"))
        return ((column >= low) & (column <= high)).to_numpy()


def parse_gap(text: str) -> PlantedGap:
    """"Pleural Effusion:sex=F:0.3" -> PlantedGap; anything else is a UserError naming the expected form."""
    form = "expected LABEL:ATTRIBUTE=VALUE:STRENGTH, e.g. 'Pleural Effusion:sex=F:0.3'"
    parts = text.split(":")
    if len(parts) != 3 or "=" not in parts[1]:
        raise UserError(f"--planted-gap {text!r}: {form}")
    label, (attribute, value), strength = parts[0].strip(), (x.strip() for x in parts[1].split("=", 1)), parts[2].strip()
    if label not in LABELS or label == "No Finding":
        raise UserError(f"--planted-gap {text!r}: {label!r} is not a synthetic finding with a mark ({', '.join(LABELS[1:])})")
    if attribute not in GAP_ATTRIBUTES:
        raise UserError(f"--planted-gap {text!r}: the group must be one of {', '.join(GAP_ATTRIBUTES)} (e.g. sex=F, view=AP, age=60-90)")
    try:
        fraction = float(strength)
        if attribute == "age":
            low, high = (float(x) for x in value.split("-"))
    except ValueError:
        raise UserError(f"--planted-gap {text!r}: {form} (an age group is a range, e.g. age=60-90)") from None
    if not 0 <= fraction <= 1 or (attribute == "age" and low > high):
        raise UserError(f"--planted-gap {text!r}: the strength must be in [0, 1] and an age range low-high")
    return PlantedGap(label, attribute, value, fraction)


def plant_gap(cohort: Cohort, gap: PlantedGap) -> np.ndarray:
    """The cohort's signs with the gap's label drawn at its strength in its group."""
    signs = cohort.signs.copy()
    signs[gap.members(cohort), LABELS.index(gap.label)] *= gap.strength
    return signs


def shortcut_markers(cohort: Cohort, label: str, seed: int) -> np.ndarray:
    """Which images carry the marker of `--planted-shortcut label` (drawn per study: both views of a study agree)."""
    if label not in LABELS:
        raise UserError(f"--planted-shortcut {label!r}: not a synthetic label ({', '.join(LABELS)})")
    table = cohort.table
    studies = (table["patient"] + "/" + table["study"]).to_numpy()
    _, study_index = np.unique(studies, return_inverse=True)
    draw = np.random.default_rng([seed, _STREAM_MARKER]).random(study_index.max() + 1)[study_index]
    present = table[label].fillna(0).to_numpy() == 1
    return (table["view"].to_numpy() == "AP") & (draw < np.where(present, P_MARKER_IF_PRESENT, P_MARKER_OTHERWISE))
