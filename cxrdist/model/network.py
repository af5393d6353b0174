"""The network: a timm backbone with a multilabel head, followed by the Label-Graph Refinement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from torch import nn

from cxrdist.data.spec import ImageSpec
from cxrdist.errors import UserError
from cxrdist.model.config import ModelConfig
from cxrdist.model.refine import LabelGraphRefinement

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class CXRNet(nn.Module):
    """backbone (any module mapping images to C logits) + optional refinement.

    A 1-channel input is replicated to 3 channels when the backbone takes 3 (a stride-0 expand, no
    copy), so the data pipeline may ship grayscale tensors. Normalising a (1, H, W) image with the
    3-value mean/std of `image_spec` broadcasts to the same 3 channels and is equally fine.
    """

    def __init__(
        self, backbone: nn.Module, refine: LabelGraphRefinement | None, in_chans: int = 3
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.refine = refine
        self.in_chans = in_chans
        self.channels_last = False  # set by place_model on CUDA; inputs follow the weights

    def forward_base(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone logits (B, C) before refinement, as fp32."""
        if x.ndim == 4 and x.shape[1] == 1 and self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Refined fp32 logits (B, C); the backbone logits when the refinement is disabled."""
        z = self.forward_base(x)
        return self.refine(z) if self.refine is not None else z


def place_model(model: CXRNet, device: torch.device | str) -> CXRNet:
    """Move to `device`; on CUDA also switch to channels_last (about 1.3x faster in bf16)."""
    device = torch.device(device)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model


def build_model(cfg: ModelConfig, num_labels: int) -> CXRNet:
    """The network for `cfg` with a `num_labels` head, on the CPU, in fp32.

    `pretrained_path` (a local file) wins over `pretrained` (timm's download). Either way timm
    drops the 1000-class classifier and, for in_chans=1, sums the first conv's RGB filters.
    """
    if num_labels < 1:
        raise UserError(f"the model needs at least one label, got {num_labels}")
    if not timm.is_model(cfg.backbone):
        raise UserError(f"model.backbone: {cfg.backbone!r} is not a timm model name")
    kwargs: dict[str, Any] = dict(
        num_classes=num_labels,
        in_chans=cfg.in_chans,
        drop_rate=cfg.drop_rate,
        drop_path_rate=cfg.drop_path_rate,
    )
    if cfg.pretrained_path:
        backbone = _create_from_file(cfg.backbone, Path(cfg.pretrained_path), kwargs)
    elif cfg.pretrained:
        backbone = _create_downloaded(cfg.backbone, kwargs)
    else:
        backbone = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    refine = None
    if cfg.refine.enabled:
        refine = LabelGraphRefinement(
            num_labels,
            alpha=cfg.refine.alpha,
            l1=cfg.refine.l1,
            detach=cfg.refine.detach,
            sparsity=cfg.refine.sparsity,
        )
    return CXRNet(backbone, refine, in_chans=cfg.in_chans)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a weights-only torch file (never a pickle)."""
    if not path.is_file():
        raise UserError(f"model.pretrained_path: {path} does not exist")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UserError(
            f"model.pretrained_path: {path} is not one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            weights = safetensors.torch.load_file(str(path), device="cpu")
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the user's file
        raise UserError(f"model.pretrained_path: cannot read {path} as weights: {_first_line(e)}") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # common checkpoint layouts
        if isinstance(weights, dict) and isinstance(weights.get(key), dict):
            weights = weights[key]
            break
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise UserError(f"model.pretrained_path: {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in weights.items()}


def _create_from_file(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    weights = read_weights(path)
    try:
        # timm's own loader adapts the first conv and the classifier (and runs any per-model
        # checkpoint filter); we hand it tensors we read safely ourselves.
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=weights), **kwargs
        )
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(
            f"model.pretrained_path: {path} does not fit backbone {name}: {_load_error(e)}"
        ) from None
    model.pretrained_cfg.pop("state_dict", None)  # don't keep (or EMA-copy) the loaded tensors
    return model


def _create_downloaded(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - network, hub and cache errors of many types
        raise UserError(
            f"model.pretrained: cannot download weights for {name} ({_first_line(e)}); "
            "without internet, set model.pretrained_path to a local file"
        ) from None


def image_spec(cfg: ModelConfig, img_size: int) -> ImageSpec:
    """The input the network expects at `img_size`: timm's normalisation and interpolation for the backbone."""
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.backbone)
    data_cfg = timm.data.resolve_data_config(
        pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg is not None else {}
    )
    mean, std = list(data_cfg["mean"]), list(data_cfg["std"])
    if cfg.in_chans == 1:  # the summed RGB filters see one channel: average the statistics
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return ImageSpec(size=img_size, channels=cfg.in_chans, mean=tuple(mean), std=tuple(std), interpolation=data_cfg["interpolation"])


def _load_error(error: BaseException, limit: int = 200) -> str:
    """torch's load_state_dict error says where on its second line; keep it short."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    from_torch = len(lines) > 1 and lines[0].startswith("Error(s) in loading")
    detail = lines[1] if from_torch else _first_line(error)
    return detail if len(detail) <= limit else detail[: limit - 3] + "..."


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
