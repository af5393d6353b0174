"""The report's "Datasets and external validation" section: per-dataset macro AUC of the ensemble, and per label the
internal AUC next to each external dataset's (runs/EXP/external/NAME/metrics.json, from `cxrdist evaluate --external`)."""

from __future__ import annotations

import json
from pathlib import Path

from cxrdist.evaluation.report.html import auc_cell, esc, note, section, table
from cxrdist.layout import EXTERNAL_DIR, METRICS_FILE


def external_metrics(runs: Path) -> dict[str, dict]:
    """{external dataset directory name: its metrics.json}, sorted by name."""
    return {path.parent.name: json.loads(path.read_text()) for path in sorted((Path(runs) / EXTERNAL_DIR).glob(f"*/{METRICS_FILE}"))}


def per_dataset_rows(metrics: dict, where: str) -> list[list[str]]:
    return [[esc(where), esc(name), auc_cell(entry["macro_auc"]), f"{entry['labels']}", f"{entry['evaluated']}"]
            for name, entry in metrics.get("per_dataset", {}).items()]


def datasets_section(runs: Path, internal: dict | None) -> str | None:
    """None when there is neither more than one dataset nor an external evaluation."""
    external = external_metrics(runs)
    several = internal is not None and len(internal.get("per_dataset", {})) > 2
    if not external and not several:
        return None
    rows = (per_dataset_rows(internal, f"internal ({internal['split']})") if internal else [])
    for name, metrics in external.items():
        rows += per_dataset_rows(metrics, f"external {name} ({metrics['split']})")
    body = table(["evaluation", "dataset", "macro AUC", "labels scored", "images"], rows, text_columns=2)
    if external:
        labels = internal["labels"] if internal else next(iter(external.values()))["labels"]
        header = ["label", "internal AUC (95% CI)"] + [f"external {name} (95% CI)" for name in external]
        label_rows = [[esc(label), interval_cell(internal, label)] + [interval_cell(m, label) for m in external.values()] for label in labels]
        body += "<h3>Internal vs external, per label</h3>" + table(header, label_rows)
    else:
        body += note("No external evaluation yet: `cxrdist evaluate --runs RUNS --external LOCATION`.")
    explain = ("Macro AUC of the fold ensemble per dataset over the labels that dataset annotates (a label it does not annotate is "
               "never scored), and pooled. External: a prepared dataset the models never trained on, over the labels both share; "
               "intervals are patient-bootstrap 95% intervals.")
    return section("datasets", "Datasets and external validation", explain, body)


def interval_cell(metrics: dict | None, label: str) -> str:
    if metrics is None:
        return "–"
    ensemble = metrics["ensemble"]
    return auc_cell(ensemble["per_label"].get(label), (ensemble.get("interval") or {}).get("per_label", {}).get(label))
