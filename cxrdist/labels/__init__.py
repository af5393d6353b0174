"""Labels: the built-in vocabularies and `--labels` specs (here), policies (policy.py), the evaluation-target rule
(eval_targets.py) and harmonised names across datasets (harmonise.py). The foundation: imports nothing else of cxrdist but errors and log."""

from __future__ import annotations

from collections.abc import Sequence

from cxrdist.errors import UserError

CHEXPERT_LABELS: list[str] = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]

# NIH ChestX-ray14, spelled as in Data_Entry_2017.csv's "Finding Labels".
NIH_LABELS: list[str] = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]

VOCABULARIES: dict[str, list[str]] = {"chexpert": CHEXPERT_LABELS, "nih": NIH_LABELS}


def resolve_labels(spec: str | None, default: Sequence[str]) -> list[str]:
    """`None` -> default; a built-in name -> that set; otherwise a comma-separated list of names."""
    if spec is None or spec == "":
        return list(default)
    if spec.lower() in VOCABULARIES:
        return list(VOCABULARIES[spec.lower()])
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UserError(f"--labels {spec!r}: no label names given")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"--labels: label names given twice: {', '.join(duplicates)}")
    from cxrdist.labels.names import check_spellings

    check_spellings(names, "--labels")
    return names
