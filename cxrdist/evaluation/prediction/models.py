"""The fold models of an experiment and how they see an image: loading them, their views (image and
horizontal mirror) and the averaging of views (TTA) and models (the ensemble). Used by `evaluate` and `predict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxrdist.data.location import Location, display, shard_root
from cxrdist.data.manifest import has_manifest
from cxrdist.data.stream import StreamConfig
from cxrdist.data.datasets import recorded_root
from cxrdist.errors import UserError
from cxrdist.evaluation.scoring.gathered import probabilities
from cxrdist.layout import BEST_DIR, CARD_FILE, FOLD_PREFIX, fold_best_dirs, fold_name
from cxrdist.model.card import ModelCard
from cxrdist.model.export import load_model
from cxrdist.model.network import CXRNet, place_model

HFLIP = "/hflip"


# ---------------------------------------------------------------- the fold models


@dataclass
class FoldModel:
    name: str  # "fold-0", ...
    directory: Path  # the best/ directory
    model: CXRNet
    card: ModelCard


def model_dirs(runs: Path) -> list[Path]:
    """The trained models under `runs`: EXP/fold-*/best, or one fold directory, or one best/ directory."""
    runs = Path(runs)
    if not runs.is_dir():
        raise UserError(f"{runs}: no such runs directory")
    if (runs / CARD_FILE).is_file():
        return [runs]
    if (runs / BEST_DIR / CARD_FILE).is_file():
        return [runs / BEST_DIR]
    found = fold_best_dirs(runs)
    if not found:
        raise UserError(f"{runs}: no trained fold models (expected {FOLD_PREFIX}K/{BEST_DIR}/{CARD_FILE}; has training finished?)")
    return found


def load_fold_models(runs: Path, device: torch.device | str = "cpu") -> list[FoldModel]:
    """Every fold's best model, on `device`, in eval mode; they must share one label list."""
    models = []
    for directory in model_dirs(runs):
        model, card = load_model(directory, "cpu")
        name = fold_name(card.fold)
        models.append(FoldModel(name, directory, place_model(model, device).eval(), card))
    labels = models[0].card.labels
    for other in models[1:]:
        if other.card.labels != labels:
            raise UserError(f"{other.directory}: its labels differ from those of {models[0].directory}; an ensemble needs one label list")
    for other in models[1:]:  # fold models of different datasets are not one ensemble (nor one export)
        if other.card.dataset != models[0].card.dataset:
            raise UserError(f"{other.directory}: trained on another dataset than {models[0].directory} (the model cards' "
                            "dataset identities differ); ensemble one experiment's folds")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise UserError(f"{runs}: several models claim the same fold ({', '.join(names)})")
    return models


def stream_config(card: ModelCard, batch_size: int, workers: int) -> StreamConfig:
    return StreamConfig(card.image, batch_size=batch_size, workers=workers)


def groups_by_preprocessing(models: list[FoldModel]) -> list[list[FoldModel]]:
    """Models that see the same input tensor (image size, channels, normalisation) share one pass."""
    groups: dict[tuple, list[FoldModel]] = {}
    for m in models:
        groups.setdefault(m.card.image, []).append(m)
    return list(groups.values())


def shards_root(models: list[FoldModel], override: Location | None = None) -> Location:
    """The prepared shard directory (or URL) the models were trained on (or `override`)."""
    if override is not None:
        root = shard_root(override)
    else:
        roots = {display(recorded_root(m.card.shards)): recorded_root(m.card.shards) for m in models}
        if len(roots) > 1:
            raise UserError(f"the fold models were trained on different shard directories ({'; '.join(sorted(roots))}); "
                            "pass the one to use")
        root = roots.popitem()[1]
    if not isinstance(root, tuple) and not has_manifest(root):
        raise UserError(f"{display(root)}: the models' shard directory has no manifest.json (moved? pass the shard directory explicitly)")
    return root


# ---------------------------------------------------------------- views and averaging


class Flipped(nn.Module):
    """The model applied to the horizontally mirrored image (refinement included)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.flip(x, dims=[-1]))


def view_modules(models: list[FoldModel], tta: bool) -> dict[str, nn.Module]:
    """{"fold-0": model, "fold-0/hflip": mirrored model, ...}: the names under which logits are kept."""
    modules: dict[str, nn.Module] = {}
    for m in models:
        modules[m.name] = m.model
        if tta:
            modules[m.name + HFLIP] = Flipped(m.model)
    return modules


def model_probabilities(logits: dict[str, np.ndarray], name: str, tta: bool) -> np.ndarray:
    """One model's float64 probabilities: sigmoid of each view's refined logits, averaged over views."""
    views = [logits[name]] + ([logits[name + HFLIP]] if tta else [])
    return np.mean([probabilities(v) for v in views], axis=0)


def ensemble_probabilities(per_model: dict[str, np.ndarray]) -> np.ndarray:
    return np.mean(np.stack(list(per_model.values())), axis=0)
