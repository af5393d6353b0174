"""The synthetic label table: the patients, what each study finds, and how it is written (1 / 0 / -1 / blank).

Labels come from a small generative model (`sample_cohort`): patients have 1-6 images in 1-5 studies
(a frontal view, sometimes a lateral too); a heart-failure and an ICU trait per patient couple the
findings (Edema with Cardiomegaly and Pleural Effusion, Support Devices with Pneumothorax, ...);
Cardiomegaly, Enlarged Cardiomediastinum, Lung Lesion, Pleural Other and Fracture persist across a
patient's studies, the others carry over from the previous study half of the time. Lung Opacity is
present whenever Edema, Consolidation, Pneumonia, Atelectasis or Lung Lesion is, or on its own (with a
faint hazy patch of its own). No Finding is 1 only when no pathology (Support Devices does not count)
is present or reported uncertain, blank otherwise, as in CheXpert.

Reporting: a present finding is written 1, or -1 (uncertain) at a per-label rate; an absent finding is
written -1 at a small rate, 0 at another, and blank (not mentioned) otherwise. What the image shows:
a finding written 1 is drawn at full strength, a present finding written -1 at 35-65 % strength, an
absent finding (blank, 0 or -1) is not drawn. Both views of a study share the study's labels.

Each patient has a sex (F or M, even odds) and an age at the first study (18-90, uniform), one year more at each later
study: columns `sex` and `age`, drawn from their own RNG stream, so they change no label and no image (a planted gap,
planted_gap.py, is what ties them to the images). Prepare them with `--attributes sex,age`.

The cohort comes from one RNG seeded by `seed` (the images: render.py; the files: dataset.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrdist.labels import CHEXPERT_LABELS

LABELS: list[str] = list(CHEXPERT_LABELS)
NOT_PATHOLOGIES = ("No Finding", "Support Devices")
PATHOLOGIES: list[str] = [name for name in LABELS if name not in NOT_PATHOLOGIES]
IMPLY_OPACITY = ("Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis")
PERSISTENT = ("Cardiomegaly", "Enlarged Cardiomediastinum", "Lung Lesion", "Pleural Other", "Fracture")
MAX_IMAGES_PER_PATIENT = 6

# Independent RNG streams: (seed, stream, ...) keys never collide between purposes.
_STREAM_COHORT, _STREAM_PATIENT, _STREAM_IMAGE, _STREAM_PERSISTENT_SIGN, _STREAM_SIGN, _STREAM_DEMOGRAPHICS = 1, 2, 3, 4, 5, 6
FIRST_AGE, LAST_AGE = 18, 90
COHORT_COLUMNS = ("path", "patient", "study", "view", "sex", "age")  # the CSV's columns before the labels


# ----------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class Reporting:
    """How a finding is written in the label table."""

    uncertain_if_present: float
    uncertain_if_absent: float
    zero_if_absent: float  # explicit 0 (else blank) among absent findings not written -1


REPORTING: dict[str, Reporting] = {
    "Enlarged Cardiomediastinum": Reporting(0.35, 0.025, 0.06),
    "Cardiomegaly": Reporting(0.2, 0.01, 0.06),
    "Lung Opacity": Reporting(0.05, 0.01, 0.03),
    "Lung Lesion": Reporting(0.12, 0.004, 0.01),
    "Edema": Reporting(0.2, 0.04, 0.1),
    "Consolidation": Reporting(0.4, 0.04, 0.12),
    "Pneumonia": Reporting(0.5, 0.03, 0.01),
    "Atelectasis": Reporting(0.35, 0.05, 0.01),
    "Pneumothorax": Reporting(0.1, 0.01, 0.25),
    "Pleural Effusion": Reporting(0.1, 0.03, 0.15),
    "Pleural Other": Reporting(0.3, 0.005, 0.01),
    "Fracture": Reporting(0.1, 0.005, 0.02),
    "Support Devices": Reporting(0.02, 0.005, 0.05),
}


@dataclass
class Cohort:
    """The label table plus what each image must show."""

    table: pd.DataFrame  # the CSV: path, patient, study, view, sex, age, then LABELS (Int64, <NA> = blank)
    signs: np.ndarray  # (n, len(LABELS)) float32: strength of each finding's mark, 0 = not drawn
    patient_index: np.ndarray  # (n,) int: 1-based patient number, keys the patient's anatomy


def _persistent_findings(rng: np.random.Generator, chf: bool) -> dict[str, bool]:
    cardiomegaly = rng.random() < 0.03 + 0.22 * chf
    return {
        "Cardiomegaly": cardiomegaly,
        "Enlarged Cardiomediastinum": rng.random() < 0.03 + 0.2 * cardiomegaly,
        "Lung Lesion": rng.random() < 0.045,
        "Pleural Other": rng.random() < 0.04,
        "Fracture": rng.random() < 0.04,
    }


def _study_findings(rng: np.random.Generator, chf: bool, icu: bool, persistent: dict[str, bool],
                    previous: dict[str, bool] | None) -> dict[str, bool]:
    """Acute findings of one study; each carries over from the previous study half of the time."""
    found = dict(persistent)

    def draw(name: str, p: float) -> None:
        if previous is not None and rng.random() < 0.5:
            found[name] = previous[name]
        else:
            found[name] = bool(rng.random() < p)

    draw("Support Devices", 0.08 + 0.84 * icu)
    draw("Edema", 0.08 + 0.4 * chf + 0.05 * icu)
    draw("Pleural Effusion", 0.26 + 0.3 * chf + 0.1 * icu)
    draw("Consolidation", 0.09 + 0.07 * icu)
    draw("Pneumonia", 0.03 + 0.3 * found["Consolidation"])
    draw("Atelectasis", 0.13 + 0.1 * icu + 0.1 * found["Pleural Effusion"])
    draw("Pneumothorax", 0.04 + 0.1 * icu + 0.25 * found["Fracture"])
    draw("Opacity alone", 0.06)
    found["Lung Opacity"] = found["Opacity alone"] or any(found[name] for name in IMPLY_OPACITY)
    return found


def _report(rng: np.random.Generator, found: dict[str, bool]) -> tuple[dict[str, int | None], np.ndarray]:
    """Label values (1/0/-1/None) of a study and the strength of each mark its images show."""
    values: dict[str, int | None] = {}
    signs = np.zeros(len(LABELS), dtype=np.float32)
    for k, name in enumerate(LABELS):
        if name == "No Finding":
            continue
        rule = REPORTING[name]
        present = found[name]
        if present:
            uncertain = rng.random() < rule.uncertain_if_present
            values[name] = -1 if uncertain else 1
            strength = rng.uniform(0.35, 0.65) if uncertain else 1.0
            # Lung Opacity's own mark is drawn only when no other opacity explains it.
            if name != "Lung Opacity" or found["Opacity alone"]:
                signs[k] = strength
        elif rng.random() < rule.uncertain_if_absent:
            values[name] = -1
        else:
            values[name] = 0 if rng.random() < rule.zero_if_absent else None
    clean = not any(found[name] for name in PATHOLOGIES) and all(values[name] != -1 for name in PATHOLOGIES)
    values["No Finding"] = 1 if clean else None
    return values, signs


def _views(rng: np.random.Generator, icu: bool, room: int) -> list[str]:
    frontal = "AP" if rng.random() < (0.7 if icu else 0.3) else "PA"
    if room >= 2 and rng.random() < 0.18:
        return [frontal, "LATERAL"]
    return [frontal]


def sample_cohort(n: int, seed: int = 0) -> Cohort:
    """Labels and marks of n images; patients are drawn in order, so a smaller n gives a prefix."""
    rng = np.random.default_rng([seed, _STREAM_COHORT])
    rows: list[dict] = []
    signs: list[np.ndarray] = []
    patients: list[int] = []
    patient = 0
    while len(rows) < n:
        patient += 1
        chf, icu = bool(rng.random() < 0.45), bool(rng.random() < 0.5)
        sex, first_age = demographics(seed, patient)
        persistent = _persistent_findings(rng, chf)
        n_studies = 1 + min(int(rng.poisson(0.9)), 4)
        room = MAX_IMAGES_PER_PATIENT
        found = None
        for study in range(1, n_studies + 1):
            if room == 0:
                break
            found = _study_findings(rng, chf, icu, persistent, found)
            values, study_signs = _report(rng, found)
            views = _views(rng, icu, room)
            room -= len(views)
            for j, view in enumerate(views, start=1):
                kind = "lateral" if view == "LATERAL" else "frontal"
                pid = f"patient{patient:05d}"
                rows.append({"path": f"{pid}/study{study}/view{j}_{kind}.png", "patient": pid,
                             "study": f"study{study}", "view": view, "sex": sex, "age": first_age + study - 1, **values})
                signs.append(study_signs)
                patients.append(patient)
    table = pd.DataFrame(rows[:n], columns=[*COHORT_COLUMNS, *LABELS])
    for name in LABELS:
        table[name] = table[name].astype("Int64")
    return Cohort(table=table, signs=np.stack(signs[:n]), patient_index=np.asarray(patients[:n]))


def demographics(seed: int, patient: int) -> tuple[str, int]:
    """(sex, age at the first study) of a patient, from a stream of its own."""
    rng = np.random.default_rng([seed, _STREAM_DEMOGRAPHICS, patient])
    return ("F" if rng.random() < 0.5 else "M"), int(rng.integers(FIRST_AGE, LAST_AGE + 1))


def sample_labels(n: int, seed: int = 0) -> pd.DataFrame:
    """The label CSV of `make_synthetic_dataset(n=n, seed=seed)`, without drawing any image."""
    return sample_cohort(n, seed).table
