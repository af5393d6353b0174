"""`cxrdist predict`: the fold ensemble (with flip TTA) on new radiographs (PNG, JPEG, DICOM).

A new image goes through exactly what a prepared and evaluated one goes through, in data/preprocess.py (the
module `cxrdist export` ships beside an exported model): read, bone bright, long side <= the card's max_size,
the encode/decode round trip of the shards' image format (JPEG q95 by default: the model was trained, validated
and calibrated on the stored pixels, not the source's), the eval stream's decode and resize, and the same model
views and averaging as `evaluate`. So the probabilities equal those `evaluate` gives for the same image in a shard,
and those of the exported model fed by its preprocess.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxrdist.atomic import check_not_an_input, check_writable_dir, check_writable_file
from cxrdist.data.ingest.images import IMAGE_SUFFIXES, is_dicom
from cxrdist.errors import UserError
from cxrdist.evaluation.prediction.coverage import say_coverage
from cxrdist.evaluation.prediction.decisions import DEFAULT_POINT, decisions, find_operating_point
from cxrdist.evaluation.prediction.image_files import ImageFiles
from cxrdist.evaluation.scoring.outputs import write_predictions_csv
from cxrdist.log import get_logger, progress
from cxrdist.text import count
from cxrdist.evaluation.prediction.models import (
    FoldModel,
    ensemble_probabilities,
    groups_by_preprocessing,
    load_fold_models,
    model_probabilities,
    view_modules,
)

DEFAULT_OUT = Path("preds.csv")
LOG = get_logger("predict")


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given; folders searched recursively for PNG/JPEG/DICOM (DICOM also without a suffix)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(images_under(path))
        else:
            raise UserError(f"{path}: no such file or directory")
    return list(dict.fromkeys(found))  # a file named twice is predicted once


def images_under(folder: Path) -> list[Path]:
    """PNG/JPEG/DICOM files below `folder`, sorted. A subfolder or file that vanishes or cannot be read while the folder
    is searched is passed over (os.walk ignores those errors), never a crash."""
    found = []
    for parent, _, names in os.walk(folder):
        for name in names:
            p = Path(parent) / name
            if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or (not p.suffix and is_dicom(p))):
                found.append(p)
    return sorted(found)


def image_settings(models: list[FoldModel]) -> dict:
    """How prepare stored images for these models ({"format", "max_size", "quality"}), from the model card."""
    return models[0].card.stored_image


def collate(items: list) -> dict:
    good = [(i, views) for i, views in items if not isinstance(views, str)]
    bad = [(i, why) for i, why in items if isinstance(why, str)]
    images = [torch.stack([views[g] for _, views in good]) for g in range(len(good[0][1]))] if good else []
    return {"index": [i for i, _ in good], "images": images, "bad": bad}


@torch.no_grad()
def predict_files(models: list[FoldModel], paths: list[Path], image: dict, tta: bool, batch_size: int, workers: int,
                  device) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
    """(indices of readable files, ensemble probabilities (N, C) float64, [(index, why) unreadable])."""
    groups = groups_by_preprocessing(models)
    specs = [group[0].card.image for group in groups]
    modules = [view_modules(group, tta) for group in groups]
    loader = DataLoader(ImageFiles(paths, image, specs), batch_size=batch_size, num_workers=workers, collate_fn=collate)
    indices, bad = [], []
    logits: dict[str, list[np.ndarray]] = {name: [] for group in modules for name in group}
    with progress(len(paths), "predict", "img") as bar:
        for batch in loader:
            bad.extend(batch["bad"])
            for why in (w for _, w in batch["bad"]):
                LOG.warning(f"cxrdist predict: skipped unreadable {why}")
            if batch["index"]:
                indices.extend(batch["index"])
                for images, group in zip(batch["images"], modules):
                    images = images.to(device)
                    for name, module in group.items():
                        logits[name].append(module(images).float().cpu().numpy())
            bar.update(len(batch["index"]) + len(batch["bad"]))
    if not indices:
        return [], np.zeros((0, models[0].card.num_labels)), bad
    stacked = {name: np.concatenate(parts) for name, parts in logits.items()}
    per_model = {m.name: model_probabilities(stacked, m.name, tta) for m in models}
    return indices, ensemble_probabilities(per_model), bad


def run_predict(
    runs: Path,
    images: list[Path],
    out: Path = DEFAULT_OUT,
    tta: bool = True,
    batch_size: int = 32,
    workers: int = 2,
    cam: Path | None = None,
    cam_threshold: float = 0.5,
    cam_top: int = 3,
    operating_point: str = DEFAULT_POINT,
) -> Path:
    """Probabilities of the fold ensemble for every readable image; writes `out` (path, prob_<label>..., and after each
    its decision call_<label> at `operating_point` when `cxrdist evaluate` chose thresholds for these models), and with
    `cam` a Grad-CAM overlay per image and finding (see evaluation/prediction/saliency.py) into that folder."""
    if batch_size < 1 or workers < 0:
        raise UserError(f"batch size must be >= 1 and workers >= 0 (got {batch_size}, {workers})")
    if cam is not None and (cam_top < 1 or not 0 <= cam_threshold <= 1):
        raise UserError(f"--cam-top must be >= 1 and --cam-threshold within [0, 1] (got {cam_top}, {cam_threshold})")
    check_writable_file(Path(out))
    if cam is not None:
        check_writable_dir(Path(cam), "--cam")  # a file there is said now, not after the inference
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = load_fold_models(runs, device)  # a wrong --runs is said before a long search of --images
    files = collect_images(images)
    if not files:
        raise UserError(f"no PNG, JPEG or DICOM files in {', '.join(map(str, images))}")
    check_not_an_input(out, [*files, *(m.directory for m in models)])
    if cam is not None:
        check_not_an_input(cam, [*files, *(m.directory for m in models)], "--cam")
    say_coverage("predict", runs, [m.card for m in models])
    labels = models[0].card.labels
    point, why_not = find_operating_point(runs, [m.name for m in models], labels, operating_point)
    settings = image_settings(models)
    indices, probs, bad = predict_files(models, files, settings, tta, batch_size, workers, device)
    if not indices:
        raise UserError(f"none of the {count(len(files), 'image file')} could be read (first: {bad[0][1]})")
    out = Path(out)
    paths = [str(files[i]) for i in indices]
    if point is None:
        write_predictions_csv(out, {"path": paths}, probs, labels)
        LOG.warning(f"cxrdist predict: warning: probabilities only, no operating-point decisions: {why_not}")
    else:
        write_predictions_csv(out, {"path": paths, "operating_point": [point.name] * len(paths)}, probs, labels,
                              calls=decisions(probs, labels, point))
        LOG.info(f"cxrdist predict: call_<label> = positive where the probability reaches the threshold for {point.describe()}, "
                 f"chosen on the out-of-fold predictions ({point.source})")
    if cam is not None:
        from cxrdist.evaluation.prediction.saliency import write_file_cams

        index, maps = write_file_cams(Path(cam), models, [files[i] for i in indices], probs, settings, tta, cam_threshold, cam_top)
        flagged = int((maps["chest_flag"] != "").sum())
        if flagged:
            LOG.warning(f"cxrdist predict: warning: {count(flagged, 'map')} of {len(maps)} look outside the chest (chest_flag in {index}): "
                        "there the model's evidence is not where a finding would be")
    return out
