"""Grad-CAM saliency maps of the fold ensemble (pytorch-grad-cam), and overlays written as PNG.

The explained score is a label's refined logit z' (the model's output, so the Label-Graph
Refinement is included: evidence for a coupled label counts). Every fold model is explained; with
flip TTA each model is also explained on the mirrored image and that map is mirrored back before
averaging, so a map is in the coordinates of the image as given. Each map is scaled to [0, 1]
(pytorch-grad-cam's per-image min-max) before the maps are averaged.

The explained layer is the deepest feature stage of the timm backbone that still has at least
MIN_CELLS cells across the input (layer4 of a ResNet at 380 px has 12; at 64 px it has 2, and a
2x2 map cannot say heart from apex, so there layer2 with 8 is taken).

A map that looks outside the chest is flagged (`chest_flag`): less than half its mass lies inside CHEST_REGION, a central
box of the image, or its peak lies outside it. The box holds the lungs and heart of every synthetic radiograph
(data/synth/render.py, 60 patients in PA, AP and lateral views: u 0.11-0.89, v 0.05-0.74 of the width and height) with a
margin for real films, whose costophrenic angles sit lower; a map spread evenly puts 71% of its mass inside. No Finding (the
absence of every finding, not a place) gets no map.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrdist.atomic import atomic_open, atomic_path
from cxrdist.data.spec import ImageSpec
from cxrdist.data.transforms import channel_stats, decode_grayscale
from cxrdist.errors import UserError
from cxrdist.evaluation.prediction.image_files import ImageFiles, stored_pixels
from cxrdist.evaluation.prediction.models import Flipped, groups_by_preprocessing
from cxrdist.model.network import CXRNet

MIN_CELLS = 7
DEFAULT_THRESHOLD = 0.5
DEFAULT_TOP = 3
CHEST_REGION = (0.08, 0.92, 0.03, 0.88)  # u0, u1, v0, v1: fractions of the image's width and height
INSIDE_CHEST = 0.5  # a map with less of its mass inside CHEST_REGION is flagged


def grad_cam_classes():
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise UserError("saliency maps need the grad-cam package: pip install 'cxrdist[saliency]'") from None
    return GradCAM, ClassifierOutputTarget


def target_layer(model: CXRNet, img_size: int) -> nn.Module:
    """The deepest backbone stage with >= MIN_CELLS cells across an `img_size` input (else the deepest)."""
    info = getattr(model.backbone, "feature_info", None)
    stages = [s for s in (info or []) if isinstance(s, dict) and s.get("module")]
    if not stages:
        raise UserError(f"saliency maps need a convolutional timm backbone with feature_info; {type(model.backbone).__name__} has none")
    fitting = [s for s in stages if img_size // int(s["reduction"]) >= MIN_CELLS]
    chosen = fitting[-1] if fitting else stages[-1]
    return model.backbone.get_submodule(chosen["module"])


def ensemble_cams(models: Sequence[CXRNet], images: torch.Tensor, label_index: Sequence[int], tta: bool) -> np.ndarray:
    """(B, H, W) maps in [0, 1]: image b explained for label `label_index[b]`, averaged over models and views."""
    GradCAM, ClassifierOutputTarget = grad_cam_classes()
    targets = [ClassifierOutputTarget(int(j)) for j in label_index]
    maps = []
    for model in models:
        layer = target_layer(model, images.shape[-1])
        views = [(model, False)] + ([(Flipped(model), True)] if tta else [])
        for module, mirrored in views:
            with GradCAM(model=module, target_layers=[layer]) as cam:
                grayscale = cam(input_tensor=images, targets=targets)
            maps.append(grayscale[:, :, ::-1] if mirrored else grayscale)
    return np.mean(maps, axis=0)


def peak(cam: np.ndarray) -> tuple[float, float]:
    """(u, v) of the map's maximum as fractions of width and height (pixel centres)."""
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return (col + 0.5) / cam.shape[1], (row + 0.5) / cam.shape[0]


def chest_fraction(cam: np.ndarray) -> float:
    """The share of a map's mass (its values summed) that lies inside CHEST_REGION (pixel centres); 0 for an empty map."""
    height, width = cam.shape
    u0, u1, v0, v1 = CHEST_REGION
    cols, rows = (np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height
    inside = np.outer((rows >= v0) & (rows <= v1), (cols >= u0) & (cols <= u1))
    total = float(np.clip(cam, 0, None).sum())
    return float(np.clip(cam, 0, None)[inside].sum()) / total if total > 0 else 0.0


PEAK_OUTSIDE, MASS_OUTSIDE = "peak outside the chest", "map mostly outside the chest"


def chest_flag(cam: np.ndarray) -> str:
    """Why the map looks outside the chest ("" when it does not): less than INSIDE_CHEST of its mass inside CHEST_REGION,
    or its peak outside it."""
    if chest_fraction(cam) < INSIDE_CHEST:
        return MASS_OUTSIDE
    if not cam.max() > cam.min():  # a flat map has no peak
        return ""
    u, v = peak(cam)
    u0, u1, v0, v1 = CHEST_REGION
    return "" if u0 <= u <= u1 and v0 <= v <= v1 else PEAK_OUTSIDE


def has_location(label: str) -> bool:
    """False for No Finding (also spelled No_Finding, or with a dataset suffix): the absence of every finding has no place
    on the image to show."""
    return not label.replace("_", " ").strip().lower().startswith("no finding")


def findings_to_explain(probs: np.ndarray, threshold: float, top: int, labels: Sequence[str] | None = None) -> list[list[int]]:
    """Per image: the labels with probability >= threshold, highest first, at most `top`; with `labels`, only those that
    have a location (not No Finding)."""
    shown = [True] * np.shape(probs)[1] if labels is None else [has_location(label) for label in labels]
    chosen = []
    for row in np.asarray(probs):
        order = [int(j) for j in np.argsort(-row, kind="stable") if row[j] >= threshold and shown[j]]
        chosen.append(order[:top])
    return chosen


def display_image(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A preprocessed (C, H, W) tensor back to an (H, W, 3) float image in [0, 1] (first channel)."""
    gray = image[0].float().numpy() * std[0] + mean[0]
    return np.repeat(np.clip(gray, 0, 1)[:, :, None], 3, axis=2)


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the map (stretched to the image's size) over the image."""
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if cam.shape != image.shape[:2]:
        cam = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize(image.shape[1::-1], Image.BILINEAR))
    return show_cam_on_image(image.astype(np.float32), np.clip(cam, 0, 1).astype(np.float32), use_rgb=True, image_weight=0.6)


def stored_rgb(gray: np.ndarray) -> np.ndarray:
    """An 8-bit grayscale image as it was stored (prepare's long side, not the model's input size), (H, W, 3) in [0, 1]."""
    return np.repeat((gray.astype(np.float32) / 255.0)[:, :, None], 3, axis=2)


def captioned(rgb: np.ndarray, caption: str) -> np.ndarray:
    """The image under a black band with `caption` written in it (the image itself left uncovered)."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = rgb.shape[:2]
    size = max(10, min(width, 1024) // 20)
    font = ImageFont.load_default(size=size)
    band = size + size // 2
    canvas = Image.new("RGB", (width, height + band))
    canvas.paste(Image.fromarray(rgb), (0, band))
    ImageDraw.Draw(canvas).text((size // 3, size // 4), caption, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def write_overlays(
    out: Path, names: Sequence[str], images: torch.Tensor, probs: np.ndarray, models: Sequence[CXRNet], labels: Sequence[str], spec: ImageSpec,
    tta: bool, threshold: float = DEFAULT_THRESHOLD, top: int = DEFAULT_TOP, stored: Sequence[np.ndarray] | None = None,
) -> list[dict]:
    """One overlay PNG per (image, finding to explain) in `out`, captioned with the finding and its probability, drawn
    on `stored` (the 8-bit images at their stored size) when given, else on the model input; returns rows
    (name, label, probability, peak, share of the map inside the chest region, chest_flag, file)."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = findings_to_explain(probs, threshold, top, labels)
    pairs = [(b, j) for b, js in enumerate(chosen) for j in js]
    if not pairs:
        return []
    cams = ensemble_cams(models, images[[b for b, _ in pairs]], [j for _, j in pairs], tta)
    rows = []
    for (b, j), cam in zip(pairs, cams):
        file = out / f"{slug(names[b])}__{slug(labels[j])}.png"
        background = stored_rgb(stored[b]) if stored is not None else display_image(images[b], *channel_stats(spec))
        flag = chest_flag(cam)
        caption = f"{labels[j]} {probs[b, j]:.2f}" + (f" - {flag}" if flag else "")
        write_png(file, captioned(overlay(background, cam), caption))
        u, v = peak(cam)
        rows.append({"name": names[b], "label": labels[j], "probability": float(probs[b, j]), "peak_u": u, "peak_v": v,
                     "chest_fraction": chest_fraction(cam), "chest_flag": flag, "file": file.name})
    return rows


CAMS_COLUMNS = ["path", "name", "label", "probability", "peak_u", "peak_v", "chest_fraction", "chest_flag", "file"]


def write_file_cams(
    out: Path, fold_models, files: Sequence[Path], probs: np.ndarray, image: dict, tta: bool,
    threshold: float = DEFAULT_THRESHOLD, top: int = DEFAULT_TOP, batch_size: int = 16,
) -> tuple[Path, pd.DataFrame]:
    """`cxrdist predict --cam`: overlays for the files (preprocessed as predict does) + an index, cams.csv (and its rows)."""
    if len(groups_by_preprocessing(fold_models)) > 1:
        raise UserError("--cam needs fold models that take the same preprocessed input")
    card = fold_models[0].card
    dataset = ImageFiles(list(files), image, [card.image])
    names = [f"{i:05d}_{Path(f).stem}" for i, f in enumerate(files)]
    rows = []
    for start in range(0, len(files), batch_size):
        batch = torch.stack([dataset[i][1][0] for i in range(start, min(start + batch_size, len(files)))])
        stored = [decode_grayscale(stored_pixels(files[i], image)) for i in range(start, start + len(batch))]
        found = write_overlays(out, names[start:], batch, probs[start : start + len(batch)], [m.model for m in fold_models],
                               card.labels, card.image, tta, threshold, top, stored)
        rows.extend({"path": str(files[names.index(r["name"])]), **r} for r in found)
    index = out / "cams.csv"
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=CAMS_COLUMNS)
    with atomic_open(index, "w", newline="") as handle:
        table.to_csv(handle, index=False)
    return index, table
