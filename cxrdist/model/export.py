"""A trained model on disk: model.safetensors (EMA weights, fp32) + model.json (its ModelCard)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cxrdist.atomic import removed_on_failure, replace_directory
from cxrdist.errors import UserError, one_line
from cxrdist.layout import CARD_FILE, WEIGHTS_FILE
from cxrdist.model.card import ModelCard
from cxrdist.model.network import CXRNet, build_model


def save_model(directory: Path, model: torch.nn.Module, card: ModelCard) -> Path:
    """Write weights + card to a temporary directory, then swap it into place (through a symlink: where it points)."""
    directory = Path(directory).resolve()
    partial = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in model.state_dict().items()}
    with removed_on_failure(partial):
        save_file(state, str(partial / WEIGHTS_FILE))
        card.write(partial)
    return replace_directory(partial, directory)


def load_model(directory: Path, device: str | torch.device = "cpu") -> tuple[CXRNet, ModelCard]:
    directory = Path(directory)
    if not (directory / CARD_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise UserError(f"{directory}: not a trained model (needs {CARD_FILE} and {WEIGHTS_FILE})")
    card = ModelCard.read(directory)
    try:
        model = build_model(card.model, card.num_labels)
    except Exception as err:  # noqa: BLE001 -- a backbone timm does not know, settings it rejects: a bad card
        raise UserError(f"{directory / CARD_FILE}: not a usable model card ({type(err).__name__}: {one_line(err)})") from None
    weights = directory / WEIGHTS_FILE
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as err:  # noqa: BLE001 -- truncated file, foreign tensors, another architecture
        raise UserError(f"{weights}: does not hold the weights {CARD_FILE} describes ({type(err).__name__}: {one_line(err)})") from None
    return model.to(device).eval(), card
