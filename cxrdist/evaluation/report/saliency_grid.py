"""The report's grid of Grad-CAM maps: per finding that has a location (not No Finding), one image of the evaluated split
with the fold ensemble's map, and under it what the panel is: the finding's probability, whether the finding is present in
that image, whether the image is shared with another finding, and whether the map looks outside the chest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from cxrdist.data.manifest import Manifest
from cxrdist.data.stream import read_shards
from cxrdist.data.transforms import decode_grayscale, eval_draft_side, eval_transform
from cxrdist.errors import UserError
from cxrdist.evaluation import figures as figs
from cxrdist.evaluation.prediction.saliency import CHEST_REGION, INSIDE_CHEST, chest_flag, chest_fraction, has_location, peak
from cxrdist.evaluation.report.html import esc, figure, note, section
from cxrdist.text import count

MAX_PANELS = 16  # 4 rows of 4: every finding of the CheXpert and NIH vocabularies; more would make a grid too long to read
TRUTH = {1.0: "present", 0.0: "absent"}  # a target; NaN (left out by the evaluation rule): "not scored"


def saliency_grid(path: Path, images: Sequence[np.ndarray], maps: Sequence[np.ndarray], captions: Sequence[str], columns: int = 4) -> Path:
    fig, axes = figs.image_grid(len(images), columns, (figs.PANEL_IN, 2.6))
    for ax, image, cam, caption in zip(axes, images, maps, captions):
        ax.imshow(image, cmap="gray")
        ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=figs.MIN_FONT_PT)
    fig.tight_layout()
    return figs.save(fig, path)


def saliency_examples(probs: np.ndarray, targets: np.ndarray | None, labels: Sequence[str], most: int) -> list[tuple[int, int, int | None]]:
    """For the `most` labels with a location (has_location) whose prediction is most confident, one example image each:
    [(row, label index, index of the label whose image it shares, or None)]. A label's candidates are its known positives
    (targets: 1, 0, NaN = left out), else every image. Distinct images with the largest total probability (an assignment:
    co-occurring findings such as Consolidation and Pneumonia would otherwise both take the one image where both are most
    probable); a label shares an image only when every candidate of it is taken, and then takes its most probable one."""
    located = np.array([has_location(label) for label in labels])
    order = [int(j) for j in np.argsort(-probs.max(axis=0), kind="stable") if located[j]][:most]
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


def truth(targets: np.ndarray | None, row: int, j: int) -> str:
    if targets is None:
        return "truth unknown"
    return TRUTH.get(float(targets[row, j]), "not scored")


def panel_caption(label: str, probability: float, what: str, shared: str | None, flag: str) -> str:
    lines = [figs.short(label, 22), f"p {probability:.2f} · {what}"]
    if shared:
        lines.append(figs.short(f"(image of {shared})", 24))
    if flag:
        lines.append(flag)
    return "\n".join(lines)


def saliency_section(runs: Path, ensemble, root: Path | None, manifest: Manifest | None, fig_dir: Path) -> str:
    """The evaluated split's images with the most confident findings (one image per finding with a location, distinct where
    the findings' positives allow), with the ensemble's maps, and notes for every panel that is not what it seems."""
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
        examples = saliency_examples(probs, targets, labels, MAX_PANELS)
        if not examples:
            return section("saliency", title, "", note("No finding with a location among the models' labels: nothing to map."))
        chosen = [(str(predictions["key"].iloc[row]), j) for row, j, _ in examples]
        wanted = {key for key, _ in chosen}
        pixels = {s.key: s.image for s in read_shards(root, manifest.split(split).shards) if s.key in wanted}
        spec = models[0].card.image
        batch = torch.stack([eval_transform(decode_grayscale(pixels[key], eval_draft_side(spec)), spec) for key, _ in chosen])
        maps = ensemble_cams([m.model for m in models], batch, [j for _, j in chosen], tta=True)
    except UserError as err:
        return section("saliency", title, "", note(esc(err)))
    shown = [decode_grayscale(pixels[key]) for key, _ in chosen]
    flags = [chest_flag(cam) for cam in maps]
    stretched = [np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize(img.shape[::-1], Image.BILINEAR)) for m, img in zip(maps, shown)]
    captions = [panel_caption(labels[j], probs[row, j], truth(targets, row, j), None if shared is None else labels[shared], flag)
                for (row, j, shared), flag in zip(examples, flags)]
    saliency_grid(fig_dir / "saliency.png", shown, stretched, captions)
    body = figure(fig_dir / "saliency.png", "saliency maps") + panel_notes(examples, labels, targets, maps, flags, split)
    return section("saliency", title, coverage_sentence(examples, labels, split), body)


def coverage_sentence(examples: list[tuple[int, int, int | None]], labels: Sequence[str], split: str) -> str:
    """What the grid shows and how many of the findings it covers, and why not all."""
    located = [label for label in labels if has_location(label)]
    shown = {labels[j] for _, j, _ in examples}
    left = [label for label in located if label not in shown]
    text = (f"Grad-CAM of each finding's refined logit, averaged over the fold models and the mirrored view, on an image of the "
            f"{esc(split)} split where that finding is present when there is one (under each panel: the ensemble's probability, "
            f"and whether the finding is present in that image). The grid covers {len(shown)} of the {count(len(located), 'finding')} "
            "that have a location")
    if left:
        text += f" (at most {MAX_PANELS} panels, the most confidently predicted findings first; not shown: {esc(', '.join(left))})"
    no_place = [label for label in labels if not has_location(label)]
    if no_place:
        text += f"; {esc(', '.join(no_place))} has no map: it is the absence of every finding, not a place on the image"
    return text + "."


def panel_notes(examples, labels, targets, maps, flags, split: str) -> str:
    notes = []
    for (row, j, shared), cam, flag in zip(examples, maps, flags):
        label = esc(labels[j])
        present = targets is not None and bool((targets[:, j] == 1).any())
        if not present:
            notes.append(f"{label}: no image of the {esc(split)} split where it is present ({'no targets' if targets is None else '0 positives'}), "
                         f"so its panel shows the image where it is most probable, where it is {truth(targets, row, j)}.")
        if shared is not None:
            notes.append(f"{label} is shown on the same image as {esc(labels[shared])}: every image where {label} is "
                         f"{'present' if present else 'predicted'} is already shown.")
        if flag:
            u, v = peak(cam)
            u0, u1, v0, v1 = CHEST_REGION
            notes.append(f"{label}: {flag}: {100 * chest_fraction(cam):.0f}% of the map's mass lies in the central chest region (u "
                         f"{u0:g}–{u1:g}, v {v0:g}–{v1:g} of the width and height; flagged below {100 * INSIDE_CHEST:.0f}%, or with the "
                         f"peak outside it) and its peak is at ({u:.2f}, {v:.2f}): the model's evidence for {label} is not where the finding is.")
    return "".join(note(n) for n in notes)
