"""A trained model on disk: model.safetensors (EMA weights, fp32) + model.json (everything to rebuild it)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cxrdist.errors import UserError, one_line
from cxrdist.model.config import ModelConfig, RefineConfig
from cxrdist.model.network import CXRNet, build_model

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
MODEL_FORMAT_VERSION = 1


def save_model(directory: Path, model: torch.nn.Module, card: dict) -> Path:
    """Write weights + card to a temporary directory, then swap it into place."""
    directory = Path(directory)
    partial = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(partial / WEIGHTS_FILE))
    (partial / CARD_FILE).write_text(json.dumps({"format_version": MODEL_FORMAT_VERSION, **card}, indent=2, default=float))
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    partial.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def model_config_from_card(card: dict) -> ModelConfig:
    fields = dict(card["model"])
    refine = RefineConfig(**fields.pop("refine"))
    return ModelConfig(**{**fields, "pretrained": False, "pretrained_path": None}, refine=refine)


def load_model(directory: Path, device: str | torch.device = "cpu") -> tuple[CXRNet, dict]:
    directory = Path(directory)
    card_path, weights = directory / CARD_FILE, directory / WEIGHTS_FILE
    if not card_path.is_file() or not weights.is_file():
        raise UserError(f"{directory}: not a trained model (needs {CARD_FILE} and {WEIGHTS_FILE})")
    try:
        card = json.loads(card_path.read_text())
        model = build_model(model_config_from_card(card), len(card["labels"]))
    except Exception as err:  # noqa: BLE001 -- JSON, missing keys, a backbone timm does not know: all mean a bad card
        raise UserError(f"{card_path}: not a usable model card ({type(err).__name__}: {one_line(err)})") from None
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as err:  # noqa: BLE001 -- truncated file, foreign tensors, another architecture
        raise UserError(f"{weights}: does not hold the weights {CARD_FILE} describes ({type(err).__name__}: {one_line(err)})") from None
    return model.to(device).eval(), card


def model_config_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)
