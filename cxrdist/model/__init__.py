"""Model and objective: network + Label-Graph Refinement, losses, EMA, parameter groups."""

from cxrdist.model.config import LossConfig, ModelConfig, RefineConfig
from cxrdist.model.ema import ModelEma
from cxrdist.model.loss import AsymmetricLoss, MaskedBCEWithLogits, build_loss
from cxrdist.model.network import CXRNet, build_model, model_card, place_model
from cxrdist.model.params import param_groups
from cxrdist.model.refine import LabelGraphRefinement

__all__ = [
    "AsymmetricLoss",
    "CXRNet",
    "LabelGraphRefinement",
    "LossConfig",
    "MaskedBCEWithLogits",
    "ModelConfig",
    "ModelEma",
    "RefineConfig",
    "build_loss",
    "build_model",
    "model_card",
    "param_groups",
    "place_model",
]
