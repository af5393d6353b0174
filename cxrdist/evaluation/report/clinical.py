"""The report's clinical sections: operating points and calibration (tables, notes, reliability diagrams); the grid
of Grad-CAM maps is in saliency_grid.py."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cxrdist.evaluation import figures as figs
from cxrdist.evaluation.clinical import calibration
from cxrdist.evaluation.clinical.calibration import LOG_TEMPERATURE_BOUNDS
from cxrdist.evaluation.clinical.calibration_causes import at_bound, temperature_cause
from cxrdist.evaluation.report.html import FEW_MARK, esc, few_flag, figure, fmt, note, section, table
from cxrdist.evaluation.scoring.bootstrap import FEW_CASES

Counts = dict[str, tuple[int, int]]  # label -> (positives, negatives) among the evaluated images it is scored on


def evaluated_counts(predictions: pd.DataFrame | None, labels: Sequence[str]) -> Counts:
    """Positives and negatives per label among the evaluated images (predictions.csv's targets; blank = left out)."""
    if predictions is None:
        return {}
    counts = {}
    for label in labels:
        column = f"target_{label}"
        if column in predictions:
            values = predictions[column].to_numpy(dtype=float)
            counts[label] = (int((values == 1).sum()), int((values == 0).sum()))
    return counts


def few_cases_note(counts: Counts, labels: Sequence[str], negatives: bool = False) -> str:
    """The note under a table whose intervals the FEW_MARK flags: which labels, on how many cases."""
    few = [(label, counts[label]) for label in labels if label in counts and 0 < min(counts[label][: 1 + negatives]) < FEW_CASES]
    if not few:
        return ""
    listed = ", ".join(f"{esc(label)} ({pos} positive{'s' * (pos != 1)}" + (f", {neg} negatives" if negatives else "") + ")"
                       for label, (pos, neg) in few)
    return note(f"{FEW_MARK} an interval from fewer than {FEW_CASES} positives{' or negatives' if negatives else ''} of the evaluated "
                f"split rests on too few cases to trust (a resample holds a handful of them, or none): {listed}.")


def interval_cell(value: float | None, interval: Sequence[float] | None, flag: str = "") -> str:
    if value is None:
        return '<td class="na">–</td>'
    ci = f' <span class="ci">({100 * interval[0]:.0f}–{100 * interval[1]:.0f}){flag}</span>' if interval else ""
    return f"<td>{100 * value:.1f}%{ci}</td>"


def operating_point_tables(metrics: dict, counts: Counts) -> str:
    """Two tables, one per fixed quantity (sensitivity at a specificity, specificity at a sensitivity): each label's
    reported rate with its interval, the other rate the threshold achieved, and the threshold."""
    ops = metrics["operating_points"]
    html = ""
    for reported, fixed in (("sensitivity", "specificity"), ("specificity", "sensitivity")):
        names = [name for name in ops["points"] if name.startswith(reported[:4] + "@")]
        if not names:
            continue
        header = ["Label"]
        for name in names:
            level = name.split(fixed[:4])[-1]
            header += [f"{reported} at {fixed} {level}% (95% CI)", f"achieved {fixed}", "threshold"]
        rows = []
        for label, points in ops["per_label"].items():
            positives, negatives = counts.get(label, (None, None))
            cases = "positives" if reported == "sensitivity" else "negatives"
            flag = few_flag(positives if reported == "sensitivity" else negatives, FEW_CASES, cases)
            row = [esc(label)]
            for name in names:
                p = points[name]
                if p.get("reachable", True):
                    row += [interval_cell(p[reported], p[f"{reported}_interval"], flag), interval_cell(p[fixed], None), fmt(p["threshold"])]
                else:
                    row += [f'<td class="na" title="{esc(p["note"])}">not reachable</td>', '<td class="na">–</td>', '<td class="na">–</td>']
            rows.append(row)
        html += f"<h4>{reported.capitalize()} at a fixed {fixed}</h4>" + table(header, rows)
    return html


def reliability_grid(path: Path, per_label: dict, scaled: dict | None, platt: dict | None = None, columns: int = 3) -> Path:
    return figs.save(reliability_figure(per_label, scaled, platt, columns), path)


def reliability_figure(per_label: dict, scaled: dict | None, platt: dict | None = None, columns: int = 3) -> Figure:
    """One reliability diagram per label: observed positive rate against mean predicted probability per bin, and under
    it the number of images in each of the ensemble's bins (a point on a few images zigzags by chance)."""
    labels = [label for label, v in per_label.items() if v is not None]
    rows = max(1, math.ceil(len(labels) / columns))
    fig = Figure(figsize=(2.5 * columns, 3.3 * rows + 0.6), layout="constrained")
    cells = fig.add_gridspec(rows, columns)
    handles = []
    for i, label in enumerate(labels):  # each cell: the diagram, and right under it (sharing x) its bin counts
        ax, counts_ax = cells[i // columns, i % columns].subgridspec(2, 1, height_ratios=[3, 1.2], hspace=0.02).subplots(sharex=True)
        ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8)
        rel = per_label[label]["reliability"]
        lines = ax.plot(rel["predicted"], rel["observed"], "o-", ms=3, color="#1f77b4", label="ensemble")
        if scaled and scaled.get(label):
            srel = scaled[label]["reliability"]
            lines += ax.plot(srel["predicted"], srel["observed"], "s--", ms=2.5, color="#ff7f0e", label="temperature-scaled")
        if platt and platt.get(label):
            prel = platt[label]["reliability"]
            lines += ax.plot(prel["predicted"], prel["observed"], "^:", ms=2.5, color="#2ca02c", label="Platt-scaled")
        handles = lines if len(lines) > len(handles) else handles
        ax.set_title(f"{figs.short(label, 24)}\nECE {per_label[label]['ece']:.3f}", fontsize=figs.MIN_FONT_PT)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.set_yticks([0, 0.5, 1], ["0", ".5", "1"])
        ax.tick_params(labelsize=figs.MIN_FONT_PT, labelbottom=False)
        bin_counts(counts_ax, rel)
    if handles:
        fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=figs.MIN_FONT_PT, frameon=False)
    fig.supxlabel("mean predicted probability (strip under each diagram: images per bin)", fontsize=figs.MIN_FONT_PT)
    fig.supylabel("observed positive rate", fontsize=figs.MIN_FONT_PT)
    return fig


def bin_counts(ax, rel: dict) -> None:
    """The ensemble's images per reliability bin as bars under its diagram, each with its count written upright on it
    (at the page's smallest text size ten counts side by side would run together)."""
    bins = calibration.DEFAULT_BINS
    # metrics.json from before the edges were stored: a bin's mean lies inside it
    lower = rel.get("lower") or (np.minimum(np.floor(np.asarray(rel["predicted"]) * bins), bins - 1) / bins).tolist()
    ax.bar(lower, rel["count"], width=1 / bins, align="edge", color="#c6dbef", edgecolor="#1f77b4", lw=0.5)
    top = max(rel["count"], default=1)
    for left, n in zip(lower, rel["count"]):
        ax.text(left + 0.5 / bins, 0.04 * top, compact_count(n), ha="center", va="bottom", rotation=90, fontsize=figs.MIN_FONT_PT,
                color="#1f4e79")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1.05 * top)
    ax.set_yticks([])
    ax.set_xticks([0, 0.5, 1], ["0", ".5", "1"])
    ax.tick_params(labelsize=figs.MIN_FONT_PT)
    ax.spines[["top", "right", "left"]].set_visible(False)


def compact_count(n: int) -> str:
    """A bin's count in at most ~4 characters."""
    return str(n) if n < 1000 else f"{n / 1000:.1f}k" if n < 10_000 else f"{n // 1000}k"


def clinical_section(metrics: dict | None, fig_dir: Path, counts: Counts | None = None) -> str:
    """`counts`: positives and negatives per label on the evaluated split (evaluated_counts), to flag intervals from few."""
    if not metrics or "calibration" not in metrics:
        return section("clinical", "Operating points and calibration", "",
                       note("No evaluation with operating points: run <code>cxrdist evaluate</code>."))
    cal, counts = metrics["calibration"], counts or {}
    body = ""
    if metrics.get("operating_points"):
        body += ("<h3>Operating points</h3><p>Thresholds chosen on the out-of-fold predictions of the held-out folds "
                 f"({metrics['operating_points'].get('out_of_fold_images', '?')} images), "
                 f"applied unchanged to the {esc(metrics['split'])} split; "
                 "patient-bootstrap 95% intervals.</p>" + operating_point_tables(metrics, counts))
        body += few_cases_note(counts, list(metrics["operating_points"]["per_label"]), negatives=True)
        body += "".join(note(f"{esc(label)}, {esc(name)}: {esc(p['note'])}") for label, points in metrics["operating_points"]["per_label"].items()
                        for name, p in points.items() if not p.get("reachable", True))
    else:
        body += note(esc(cal.get("note", "no out-of-fold predictions: no operating points")))
    body += "<h3>Calibration</h3>" + calibration_table(cal) + calibration_notes(cal)
    scaled = (cal.get("temperature_scaled") or {}).get("per_label") or {}
    platt = (cal.get("platt_scaled") or {}).get("per_label") or {}
    reliability_grid(fig_dir / "reliability.png", cal["ensemble"]["per_label"], scaled, platt)
    body += figure(fig_dir / "reliability.png", "reliability diagrams",
                   "Reliability of the ensemble's probabilities (10 equal-width bins); "
                   "dashed: after per-label temperature scaling, dotted: after Platt scaling, both fitted out of fold.")
    return section("clinical", "Operating points and calibration", "What a threshold achieves and whether a probability means what it says.", body)


def calibration_table(cal: dict) -> str:
    temps = cal.get("temperature") or {}
    scaled = (cal.get("temperature_scaled") or {}).get("per_label") or {}
    platt = (cal.get("platt_scaled") or {}).get("per_label") or {}
    rows = [[esc(label), fmt(v["ece"]), fmt(v["brier"]), fmt((scaled.get(label) or {}).get("ece")), temperature_cell(temps.get(label)),
             fmt((platt.get(label) or {}).get("ece"))]
            for label, v in cal["ensemble"]["per_label"].items() if v is not None]
    rows.insert(0, ["Macro", fmt(cal["ensemble"]["macro_ece"]), fmt(cal["ensemble"]["macro_brier"]),
                    fmt((cal.get("temperature_scaled") or {}).get("macro_ece")), "", fmt((cal.get("platt_scaled") or {}).get("macro_ece"))])
    return table(["Label", "ECE", "Brier", "ECE, temperature-scaled", "temperature", "ECE, Platt-scaled"], rows, ["macro"] + [""] * (len(rows) - 1))


def calibration_notes(cal: dict) -> str:
    """The Platt caps, and for each temperature at a bound of its range the cause measured on the out-of-fold predictions."""
    notes = "".join(note(f"Platt scaling, {esc(label)}: {esc(text)}") for label, text in (cal.get("platt_notes") or {}).items())
    temps = cal.get("temperature") or {}
    bounded = [label for label, t in temps.items() if at_bound(t)]
    if not bounded:
        return notes
    low, high = (math.exp(b) for b in LOG_TEMPERATURE_BOUNDS)
    stats = cal.get("out_of_fold_labels") or {}
    causes = {label: temperature_cause(stats.get(label), temps[label]) for label in bounded}
    notes += note(f"“at the bound”: the temperature fit stopped at (or within 10% of) a limit of its range [{low:.3f}, {high:.1f}], so that "
                  f"value is the bound, not an estimate ({esc(', '.join(bounded))}). Why, measured on the out-of-fold predictions it was fitted on:"
                  if any(causes.values()) else
                  f"“at the bound”: the temperature fit stopped at (or within 10% of) a limit of its range [{low:.3f}, {high:.1f}], so that "
                  f"value is the bound, not an estimate ({esc(', '.join(bounded))}); this metrics.json does not hold the out-of-fold figures "
                  "that say why (re-run <code>cxrdist evaluate</code>).")
    notes += "".join(note(f"{esc(label)}: {esc(cause[1])}.") for label, cause in causes.items() if cause)
    return notes


def temperature_cell(t: float | None) -> str:
    return fmt(t, 2) + (' <span class="ci">at the bound</span>' if at_bound(t) else "")
