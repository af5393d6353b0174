"""The report's clinical sections: operating points, calibration (table + reliability diagrams), and a
grid of test images with the ensemble's Grad-CAM maps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from scipy.optimize import linear_sum_assignment

from cxrdist.data.manifest import Manifest
from cxrdist.data.stream import read_shards
from cxrdist.data.transforms import decode_grayscale, eval_transform
from cxrdist.errors import UserError
from cxrdist.evaluation import figures as figs
from cxrdist.evaluation.clinical import calibration
from cxrdist.evaluation.clinical.calibration import LOG_TEMPERATURE_BOUNDS
from cxrdist.evaluation.report.html import esc, figure, fmt, note, section, table

SALIENCY_IMAGES = 8


def interval_cell(value: float | None, interval: Sequence[float] | None) -> str:
    if value is None:
        return '<td class="na">–</td>'
    ci = f' <span class="ci">({100 * interval[0]:.0f}–{100 * interval[1]:.0f})</span>' if interval else ""
    return f"<td>{100 * value:.1f}%{ci}</td>"


def operating_point_table(metrics: dict) -> str:
    ops = metrics["operating_points"]
    header = ["Label"]
    for name in ops["points"]:
        fixed, reported = ("spec", "sensitivity") if name.startswith("sens@") else ("sens", "specificity")
        level = name.split(fixed)[-1]
        header += [f"{reported} at {fixed}. {level}% (95% CI)", f"achieved {fixed}.", "threshold"]
    rows = []
    for label, points in ops["per_label"].items():
        row = [esc(label)]
        for name in ops["points"]:
            p = points[name]
            reported, other = ("sensitivity", "specificity") if name.startswith("sens@") else ("specificity", "sensitivity")
            if p.get("reachable", True):
                row += [interval_cell(p[reported], p[f"{reported}_interval"]), interval_cell(p[other], None), fmt(p["threshold"])]
            else:
                row += [f'<td class="na" title="{esc(p["note"])}">not reachable</td>', '<td class="na">–</td>', '<td class="na">–</td>']
        rows.append(row)
    return table(header, rows)


def reliability_grid(path: Path, per_label: dict, scaled: dict | None, platt: dict | None = None, columns: int = 5) -> Path:
    return figs.save(reliability_figure(per_label, scaled, platt, columns), path)


def reliability_figure(per_label: dict, scaled: dict | None, platt: dict | None = None, columns: int = 5) -> Figure:
    """One reliability diagram per label: observed positive rate against mean predicted probability per bin, and under
    it the number of images in each of the ensemble's bins (a point on a few images zigzags by chance)."""
    labels = [label for label, v in per_label.items() if v is not None]
    rows = max(1, math.ceil(len(labels) / columns))
    fig = Figure(figsize=(2.6 * columns, 3.1 * rows), layout="constrained")
    cells = fig.add_gridspec(rows, columns)
    first = None
    for i, label in enumerate(labels):  # each cell: the diagram, and right under it (sharing x) its bin counts
        ax, counts_ax = cells[i // columns, i % columns].subgridspec(2, 1, height_ratios=[4, 1], hspace=0.02).subplots(sharex=True)
        first = first or ax
        ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8)
        rel = per_label[label]["reliability"]
        ax.plot(rel["predicted"], rel["observed"], "o-", ms=3, color="#1f77b4", label="ensemble")
        if scaled and scaled.get(label):
            srel = scaled[label]["reliability"]
            ax.plot(srel["predicted"], srel["observed"], "s--", ms=2.5, color="#ff7f0e", label="temperature-scaled")
        if platt and platt.get(label):
            prel = platt[label]["reliability"]
            ax.plot(prel["predicted"], prel["observed"], "^:", ms=2.5, color="#2ca02c", label="Platt-scaled")
        ax.set_title(f"{figs.short(label, 22)}\nECE {per_label[label]['ece']:.3f}", fontsize=8)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7, labelbottom=False)
        bin_counts(counts_ax, rel)
    if first is not None:
        first.legend(fontsize=6.5, frameon=False, loc="upper left")
    fig.supxlabel("mean predicted probability (strip under each diagram: images per bin)", fontsize=9)
    fig.supylabel("observed positive rate", fontsize=9)
    return fig


def bin_counts(ax, rel: dict) -> None:
    """The ensemble's images per reliability bin as bars under its diagram, each with its count written on it."""
    bins = calibration.DEFAULT_BINS
    # metrics.json from before the edges were stored: a bin's mean lies inside it
    lower = rel.get("lower") or (np.minimum(np.floor(np.asarray(rel["predicted"]) * bins), bins - 1) / bins).tolist()
    ax.bar(lower, rel["count"], width=1 / bins, align="edge", color="#c6dbef", edgecolor="#1f77b4", lw=0.5)
    top = max(rel["count"], default=1)
    for left, n in zip(lower, rel["count"]):
        ax.text(left + 0.5 / bins, n + 0.04 * top, compact_count(n), ha="center", va="bottom", fontsize=6.5, color="#1f4e79")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1.6 * top)
    ax.set_yticks([])
    ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])
    ax.tick_params(labelsize=7)
    ax.spines[["top", "right", "left"]].set_visible(False)


def compact_count(n: int) -> str:
    """A bin's count in at most ~4 characters, so neighbouring bins' counts do not run together."""
    return str(n) if n < 1000 else f"{n / 1000:.1f}k" if n < 10_000 else f"{n // 1000}k"


def clinical_section(metrics: dict | None, fig_dir: Path) -> str:
    if not metrics or "calibration" not in metrics:
        return section("clinical", "Operating points and calibration", "",
                       note("No evaluation with operating points: run <code>cxrdist evaluate</code>."))
    cal = metrics["calibration"]
    body = ""
    if metrics.get("operating_points"):
        body += ("<h3>Operating points</h3><p>Thresholds chosen on the out-of-fold predictions of the held-out folds "
                 f"({metrics['operating_points'].get('out_of_fold_images', '?')} images), "
                 f"applied unchanged to the {esc(metrics['split'])} split; "
                 "patient-bootstrap 95% intervals.</p>" + operating_point_table(metrics))
        body += "".join(note(f"{esc(label)}, {esc(name)}: {esc(p['note'])}") for label, points in metrics["operating_points"]["per_label"].items()
                        for name, p in points.items() if not p.get("reachable", True))
    else:
        body += note(esc(cal.get("note", "no out-of-fold predictions: no operating points")))
    temps = cal.get("temperature") or {}
    scaled = (cal.get("temperature_scaled") or {}).get("per_label") or {}
    platt = (cal.get("platt_scaled") or {}).get("per_label") or {}
    rows = [[esc(label), fmt(v["ece"]), fmt(v["brier"]), fmt((scaled.get(label) or {}).get("ece")), temperature_cell(temps.get(label)),
             fmt((platt.get(label) or {}).get("ece"))]
            for label, v in cal["ensemble"]["per_label"].items() if v is not None]
    rows.insert(0, ["Macro", fmt(cal["ensemble"]["macro_ece"]), fmt(cal["ensemble"]["macro_brier"]),
                    fmt((cal.get("temperature_scaled") or {}).get("macro_ece")), "", fmt((cal.get("platt_scaled") or {}).get("macro_ece"))])
    body += "<h3>Calibration</h3>" + table(["Label", "ECE", "Brier", "ECE, temperature-scaled", "temperature", "ECE, Platt-scaled"], rows,
                                           ["macro"] + [""] * (len(rows) - 1))
    body += "".join(note(f"Platt scaling, {esc(label)}: {esc(text)}") for label, text in (cal.get("platt_notes") or {}).items())
    if any(at_temperature_bound(t) for t in temps.values()):
        low, high = (math.exp(b) for b in LOG_TEMPERATURE_BOUNDS)
        body += note(f"“at the bound”: the temperature fit stopped at (or within 10% of) the limit of its range [{low:.3f}, {high:.1f}], "
                     "so that value is the bound, not an estimate: the label's out-of-fold probabilities barely rank its cases "
                     "(at the upper bound the scaled probabilities are nearly constant).")
    reliability_grid(fig_dir / "reliability.png", cal["ensemble"]["per_label"], scaled, platt)
    body += figure("figures/reliability.png", "reliability diagrams",
                   "Reliability of the ensemble's probabilities (10 equal-width bins); "
                   "dashed: after per-label temperature scaling, dotted: after Platt scaling, both fitted out of fold.")
    return section("clinical", "Operating points and calibration", "What a threshold achieves and whether a probability means what it says.", body)


def at_temperature_bound(t: float | None) -> bool:
    """Within 10% of a bound of the fit's range (where the log loss is flat, the search stops short of the bound)."""
    return t is not None and t > 0 and min(abs(math.log(t) - b) for b in LOG_TEMPERATURE_BOUNDS) < 0.1


def temperature_cell(t: float | None) -> str:
    return fmt(t, 2) + (' <span class="ci">at the bound</span>' if at_temperature_bound(t) else "")


def saliency_grid(path: Path, images: Sequence[np.ndarray], maps: Sequence[np.ndarray], captions: Sequence[str], columns: int = 4) -> Path:
    fig, axes = figs.image_grid(len(images), columns, (2.6, 2.9))
    for ax, image, cam, caption in zip(axes, images, maps, captions):
        ax.imshow(image, cmap="gray")
        ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=7.5)
    fig.tight_layout()
    return figs.save(fig, path)


def saliency_examples(probs: np.ndarray, targets: np.ndarray | None, count: int) -> list[tuple[int, int, int | None]]:
    """For the `count` labels with the most confident prediction, one example image each: [(row, label index, index of
    the label whose image it shares, or None)]. A label's candidates are its known positives (targets: 1, 0, NaN
    = left out), else every image. Distinct images with the largest total probability (an assignment: co-occurring
    findings such as Consolidation and Pneumonia would otherwise both take the one image where both are most probable);
    a label shares an image only when every candidate of it is taken, and then takes its most probable one."""
    order = [int(j) for j in np.argsort(-probs.max(axis=0), kind="stable")[:count]]
    candidates = []
    for j in order:
        positive = np.zeros(len(probs), dtype=bool) if targets is None else targets[:, j] == 1
        candidates.append(positive if positive.any() else np.ones(len(probs), dtype=bool))
    cost = np.stack([np.where(ok, -probs[:, j], len(order) + 1.0) for j, ok in zip(order, candidates)])  # a non-candidate costs more than any gain
    rows_of = dict(zip(*linear_sum_assignment(cost)))
    chosen: list[tuple[int, int, int | None]] = []
    for i, (j, ok) in enumerate(zip(order, candidates)):
        row = rows_of.get(i)
        if row is not None and ok[row]:
            chosen.append((int(row), j, None))
    taken = {row: j for row, j, _ in chosen}
    for i, (j, ok) in enumerate(zip(order, candidates)):
        if rows_of.get(i) is None or not ok[rows_of[i]]:
            row = int(np.flatnonzero(ok)[np.argmax(probs[ok, j])])
            chosen.append((row, j, taken.get(row)))
            taken.setdefault(row, j)
    position = {j: i for i, j in enumerate(order)}
    return sorted(chosen, key=lambda c: position[c[1]])


def saliency_section(runs: Path, ensemble, root: Path | None, manifest: Manifest | None, fig_dir: Path) -> str:
    """The evaluated split's images with the most confident positive findings (one image per label, distinct where the
    labels' positives allow), with the ensemble's maps."""
    from cxrdist.evaluation.prediction.models import load_fold_models
    from cxrdist.evaluation.prediction.saliency import ensemble_cams

    title = "Where the model looked"
    predictions = ensemble.predictions if ensemble is not None else None
    split = ensemble.metrics.get("split") if ensemble is not None else None
    if predictions is None or manifest is None or root is None or split not in manifest.splits:
        return section("saliency", title, "", note("Needs <code>cxrdist evaluate</code> and the shards it read."))
    try:
        models = load_fold_models(runs)
        labels = models[0].card.labels
        probs = predictions[[f"prob_{label}" for label in labels]].to_numpy(dtype=np.float64)
        target_columns = [f"target_{label}" for label in labels]
        targets = predictions[target_columns].to_numpy(dtype=np.float64) if set(target_columns) <= set(predictions) else None
        examples = saliency_examples(probs, targets, SALIENCY_IMAGES)
        chosen = [(str(predictions["key"].iloc[row]), j) for row, j, _ in examples]
        wanted = {key for key, _ in chosen}
        pixels = {s.key: s.image for s in read_shards(root, manifest.split(split).shards) if s.key in wanted}
        spec = models[0].card.image
        batch = torch.stack([eval_transform(decode_grayscale(pixels[key], spec.size), spec) for key, _ in chosen])
        maps = ensemble_cams([m.model for m in models], batch, [j for _, j in chosen], tta=True)
    except UserError as err:
        return section("saliency", title, "", note(esc(err)))
    shown = [decode_grayscale(pixels[key]) for key, _ in chosen]
    maps = [np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize(img.shape[::-1], Image.BILINEAR)) for m, img in zip(maps, shown)]
    captions = [f"{labels[j]} {probs[row, j]:.2f}" + ("" if shared is None else f"\n(same image as {labels[shared]})")
                for row, j, shared in examples]
    saliency_grid(fig_dir / "saliency.png", shown, maps, captions)
    shared_notes = "".join(note(f"{esc(labels[j])} is shown on the same image as {esc(labels[shared])}: "
                                f"every image where {esc(labels[j])} is {'positive' if positives(targets, j) else 'predicted'} is already shown.")
                           for _, j, shared in examples if shared is not None)
    return section("saliency", title, "Grad-CAM of each finding's refined logit, averaged over the fold models and the mirrored view, "
                   "on a test image where that finding is present (one image per finding, the most probable ones that are not "
                   "already shown).", figure("figures/saliency.png", "saliency maps") + shared_notes)


def positives(targets: np.ndarray | None, j: int) -> bool:
    return targets is not None and bool((targets[:, j] == 1).any())
