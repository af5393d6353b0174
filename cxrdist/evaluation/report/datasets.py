"""The report's "Datasets and external validation" section: per-dataset macro AUC of the ensemble, per label the
internal AUC next to each external dataset's (runs/EXP/external/NAME/metrics.json, from `cxrdist evaluate --external`),
and the leave-one-dataset-out summary when `cxrdist lodo` wrote one (runs/EXP/lodo/lodo.json)."""

from __future__ import annotations

import json
from pathlib import Path

from cxrdist.evaluation.report.html import auc_cell, esc, note, section, table
from cxrdist.layout import EXTERNAL_DIR, LODO_DIR, LODO_FILE, METRICS_FILE


def external_metrics(runs: Path) -> dict[str, dict]:
    """{external dataset directory name: its metrics.json}, sorted by name."""
    return {path.parent.name: json.loads(path.read_text()) for path in sorted((Path(runs) / EXTERNAL_DIR).glob(f"*/{METRICS_FILE}"))}


def per_dataset_rows(metrics: dict, where: str) -> list[list[str]]:
    return [[esc(where), esc(name), auc_cell(entry["macro_auc"]), f"{entry['labels']}", f"{entry['evaluated']}"]
            for name, entry in metrics.get("per_dataset", {}).items()]


def lodo_summary(runs: Path) -> dict | None:
    path = Path(runs) / LODO_DIR / LODO_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def lodo_table(summary: dict) -> str:
    """One row per left-out dataset: the experiment trained without it, scored on it and on its own test split."""
    rows = []
    for name, row in summary["held_out"].items():
        internal = row["internal"] or {}
        rows.append([esc(name), esc(", ".join(row["trained_on"])), auc_cell(row["external"]["macro_auc"]), f"{len(row['external']['labels'])}",
                     auc_cell(internal.get("macro_auc")), auc_cell(internal.get("macro_auc_shared_labels"))])
    header = ["left out", "trained on", f"external macro AUC ({summary['external_split']})", "labels scored",
              f"internal macro AUC ({summary['internal_split']})", "internal, same labels"]
    return "<h3>Leave one dataset out (<code>cxrdist lodo</code>)</h3>" + table(header, rows, text_columns=2)


def datasets_section(runs: Path, internal: dict | None) -> str | None:
    """None when there is neither more than one dataset, nor an external evaluation, nor a leave-one-dataset-out summary."""
    external = external_metrics(runs)
    several = internal is not None and len(internal.get("per_dataset", {})) > 2
    lodo = lodo_summary(runs)
    if not external and not several and lodo is None:
        return None
    rows = (per_dataset_rows(internal, f"internal ({internal['split']})") if internal else [])
    for name, metrics in external.items():
        rows += per_dataset_rows(metrics, f"external {name} ({metrics['split']})")
    body = table(["evaluation", "dataset", "macro AUC", "labels scored", "images"], rows, text_columns=2) if rows else ""
    if lodo is not None:
        body += lodo_table(lodo)
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
