"""Plain dataclasses for the network, the Label-Graph Refinement and the loss.

The trainer's config composes them (OmegaConf structured configs), so every field is typed and
has a default; the defaults are the paper's recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from cxrdist.errors import UserError

SPARSITY_MODES = ("proximal", "subgradient")
LOSS_NAMES = ("asl", "bce")


@dataclass
class RefineConfig:
    """Label-Graph Refinement z' = z + alpha * sigmoid(z) @ A (see cxrdist.model.refine)."""

    enabled: bool = True  # false = ablation: the plain backbone, no A at all
    alpha: float = 0.3
    l1: float = 1e-3
    detach: bool = False  # stop gradients into the backbone through sigmoid(z)
    sparsity: str = "proximal"  # "proximal" (exact zeros) | "subgradient" (the paper's code)

    def __post_init__(self) -> None:
        one_of("model.refine.sparsity", self.sparsity, SPARSITY_MODES)
        within("model.refine.alpha", self.alpha, 0.0, math.inf)
        within("model.refine.l1", self.l1, 0.0, math.inf)


@dataclass
class ModelConfig:
    backbone: str = "seresnext101_32x4d"
    pretrained: bool = False  # true: timm's normal download (needs internet)
    pretrained_path: Optional[str] = None  # local .safetensors or weights-only .pth/.bin/.pt
    # 3 (default): the grayscale image is replicated to 3 channels, so ImageNet weights are used
    # exactly as trained; 1: timm sums the first conv's RGB filters (adapt_input_conv).
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    refine: RefineConfig = field(default_factory=RefineConfig)

    def __post_init__(self) -> None:
        one_of("model.in_chans", self.in_chans, (1, 3))
        within("model.drop_rate", self.drop_rate, 0.0, 1.0, below=True)
        within("model.drop_path_rate", self.drop_path_rate, 0.0, 1.0, below=True)


@dataclass
class LossConfig:
    name: str = "asl"  # "asl" | "bce"
    gamma_neg: float = 4.0
    gamma_pos: float = 0.0
    clip: float = 0.05
    eps: float = 1e-8
    pos_weight: Optional[list[float]] = None  # one per label (or one for all); weights the positive term

    def __post_init__(self) -> None:
        one_of("loss.name", self.name, LOSS_NAMES)
        within("loss.gamma_neg", self.gamma_neg, 0.0, math.inf)
        within("loss.gamma_pos", self.gamma_pos, 0.0, math.inf)
        within("loss.clip", self.clip, 0.0, 1.0, below=True)
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise UserError(f"loss.eps must be a number > 0, got {self.eps}")
        if self.pos_weight is not None:  # its length is checked against the labels when the loss is built
            if not self.pos_weight or not all(math.isfinite(w) and w > 0 for w in self.pos_weight):
                raise UserError(f"loss.pos_weight must be numbers > 0 (one per label, or one for all), got {list(self.pos_weight)}")


def within(field_name: str, value: float, low: float, high: float, below: bool = False) -> None:
    """A number in [low, high] (or [low, high) with `below`); NaN never is."""
    inside = value >= low and (value < high if below else value <= high)
    if not (inside and not math.isnan(value)):
        bound = f"[{low:g}, {high:g}{')' if below else ']'}" if math.isfinite(high) else f">= {low:g} (and finite)"
        raise UserError(f"{field_name} must be {'in ' if math.isfinite(high) else ''}{bound}, got {value}")
    if math.isinf(value):
        raise UserError(f"{field_name} must be finite, got {value}")


def one_of(field_name: str, value, allowed: tuple) -> None:
    """A setting restricted to a few names: the error names the field, the value and the choices."""
    if value not in allowed:
        raise UserError(f"{field_name}: {value!r} is not one of {', '.join(map(str, allowed))}")
