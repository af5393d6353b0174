"""The report's "Datasets and external validation" section: per-dataset macro AUC of the ensemble, per label the
internal AUC next to each external result's (runs/EXP/external/NAME-ID-SPLIT/metrics.json, from `cxrdist evaluate
--external`), and the leave-one-dataset-out summary when `cxrdist lodo` wrote one (runs/EXP/lodo/lodo.json).

Those files may come from a shared runs folder: every field taken from them is escaped, and a value where a number
belongs that is not one is shown as missing ("–"), never written into the page as it is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cxrdist.evaluation.report.html import auc_cell, esc, note, section, table
from cxrdist.layout import EXTERNAL_DIR, LODO_DIR, LODO_FILE, METRICS_FILE


def number(value) -> float | None:
    """A finite number from a metrics file, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def safe_auc_cell(value, interval=None) -> str:
    bounds = [number(v) for v in interval] if isinstance(interval, (list, tuple)) and len(interval) == 2 else None
    return auc_cell(number(value), bounds if bounds and None not in bounds else None)


def count_cell(value) -> str:
    return esc(value) if isinstance(value, int) and not isinstance(value, bool) else "–"


def external_metrics(runs: Path) -> dict[str, dict]:
    """{what an external result is called in the page: its metrics.json}, sorted by folder name."""
    found = {}
    for path in sorted((Path(runs) / EXTERNAL_DIR).glob(f"*/{METRICS_FILE}")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(metrics, dict) and isinstance(metrics.get("ensemble"), dict):
            found[external_title(path.parent.name, metrics)] = metrics
    return found


def external_title(folder: str, metrics: dict) -> str:
    """'NAME (SPLIT, id ID)' from the result's record of its dataset; the folder name for a result written before it."""
    record = metrics.get("external_dataset")
    if isinstance(record, dict) and record.get("name"):
        return f"{record['name']} ({record.get('split', metrics.get('split'))}, id {record.get('identity')})"
    return f"{folder} ({metrics.get('split')})"


def per_dataset_rows(metrics: dict, where: str) -> list[list[str]]:
    per_dataset = metrics.get("per_dataset")
    if not isinstance(per_dataset, dict):
        return []
    return [[esc(where), esc(name), safe_auc_cell(entry.get("macro_auc")), count_cell(entry.get("labels")), count_cell(entry.get("evaluated"))]
            for name, entry in per_dataset.items() if isinstance(entry, dict)]


def lodo_summary(runs: Path) -> dict | None:
    path = Path(runs) / LODO_DIR / LODO_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) and isinstance(summary.get("held_out"), dict) else None


SUMMARY_HEADER = ["left out", "trained on", "external AUC", "labels", "internal AUC", "labels", "compared labels",
                  "external, compared", "internal, compared"]


def summary_cells(row: dict) -> list:
    """One row of lodo.json (written by cxrdist/lodo.py) as the summary table shows it: text and numbers (AUCs as floats
    or None), in SUMMARY_HEADER's order after the name."""
    internal, compared = row.get("internal") or {}, row.get("compared") or {}
    return [", ".join(row["trained_on"]), row["external"]["macro_auc"], len(row["external"]["labels"]), internal.get("macro_auc"),
            len(internal["labels"]) if internal else None, len(compared["labels"]) if compared else None,
            compared.get("external_macro_auc"), compared.get("internal_macro_auc")]


def lodo_table(summary: dict) -> str:
    """One row per left-out dataset: the experiment trained without it, scored on it and on its own test split, and both over
    exactly the labels scored in both."""
    rows = []
    for name, row in summary["held_out"].items():
        try:
            trained_on, external, n_external, internal, n_internal, n_compared, ext_compared, int_compared = summary_cells(row)
        except (KeyError, TypeError, AttributeError):
            continue
        rows.append([esc(name), esc(trained_on), safe_auc_cell(external), count_cell(n_external), safe_auc_cell(internal),
                     count_cell(n_internal), count_cell(n_compared), safe_auc_cell(ext_compared), safe_auc_cell(int_compared)])
    header = list(SUMMARY_HEADER)
    header[2] += f" ({summary.get('external_split')})"
    header[4] += f" ({summary.get('internal_split')})"
    return ("<h3>Leave one dataset out (<code>cxrdist lodo</code>)</h3>"
            '<p class="explain">Compared: the external and the internal macro AUC over exactly the labels that have an AUC in both '
            "evaluations (a label with one class in either is left out of both).</p>" + table(header, rows, text_columns=2))


def datasets_section(runs: Path, internal: dict | None) -> str | None:
    """None when there is neither more than one dataset, nor an external evaluation, nor a leave-one-dataset-out summary."""
    external = external_metrics(runs)
    several = internal is not None and len(internal.get("per_dataset", {})) > 2
    lodo = lodo_summary(runs)
    if not external and not several and lodo is None:
        return None
    rows = (per_dataset_rows(internal, f"internal ({internal['split']})") if internal else [])
    for name, metrics in external.items():
        rows += per_dataset_rows(metrics, f"external {name}")
    body = table(["evaluation", "dataset", "macro AUC", "labels scored", "images"], rows, text_columns=2) if rows else ""
    if lodo is not None:
        body += lodo_table(lodo)
    if external:
        labels = internal["labels"] if internal else next(iter(external.values())).get("labels") or []
        header = ["label", "internal AUC (95% CI)"] + [f"external {name} (95% CI)" for name in external]
        label_rows = [[esc(label), interval_cell(internal, label)] + [interval_cell(m, label) for m in external.values()]
                      for label in labels if isinstance(label, str)]
        body += "<h3>Internal vs external, per label</h3>" + table(header, label_rows)
    else:
        body += note("No external evaluation yet: `cxrdist evaluate --runs RUNS --external LOCATION`.")
    explain = ("Macro AUC of the fold ensemble per dataset over the labels that dataset annotates (a label it does not annotate is "
               "never scored), and pooled. External: a prepared dataset the models never trained on, over the labels both share "
               "(harmonised as in training); intervals are patient-bootstrap 95% intervals.")
    return section("datasets", "Datasets and external validation", explain, body)


def interval_cell(metrics: dict | None, label: str) -> str:
    if metrics is None:
        return "–"
    ensemble = metrics.get("ensemble") if isinstance(metrics.get("ensemble"), dict) else {}
    per_label = ensemble.get("per_label") if isinstance(ensemble.get("per_label"), dict) else {}
    interval = ensemble.get("interval") if isinstance(ensemble.get("interval"), dict) else {}
    intervals = interval.get("per_label") if isinstance(interval.get("per_label"), dict) else {}
    return safe_auc_cell(per_label.get(label), intervals.get(label))
