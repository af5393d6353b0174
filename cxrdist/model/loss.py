"""Multilabel losses on fp32 logits with a mask for ignored (U-Ignore) entries.

Reduction: the mean over the unmasked entries of the batch (in training, of the whole optimizer step:
every rank's and micro-batch's unmasked entries, cxrdist/training/steps/global_mean.py). The original ASL (and timm before
1.0.2x) returns the SUM over the batch and the labels; timm's current default ('batchmean')
divides that by the batch size. Our mean = sum / (number of unmasked entries), so the loss
scale, and with it the learning rate and the L1 weight, does not change with batch size, label
count or how many entries a policy masks. With no mask, ASL-sum = our value * B * C.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cxrdist.errors import UserError
from cxrdist.model.config import LossConfig


def masked_mean(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over entries where mask is nonzero; masked entries get an exactly-zero gradient."""
    if mask is None:
        return loss.mean()
    keep = mask.to(device=loss.device) != 0
    return masked_sum(loss, mask) / keep.sum().clamp(min=1).to(loss.dtype)


def masked_sum(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum over entries where mask is nonzero (training divides by the global count: training/steps/global_mean.py)."""
    if mask is None:
        return loss.sum()
    keep = mask.to(device=loss.device) != 0
    return torch.where(keep, loss, torch.zeros_like(loss)).sum()


class AsymmetricLoss(nn.Module):
    """ASL (Ridnik et al. 2021) for multilabel targets, elementwise in fp32.

    L = -y * (1 - p)^gamma_pos * log(p) * pos_weight
        - (1 - y) * p_m^gamma_neg * log(1 - p_m),   p_m = max(p - clip, 0)
    with log arguments clamped at eps, exactly as the ASL reference code. Soft targets work.
    """

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        pos_weight: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if gamma_neg < 0 or gamma_pos < 0:
            raise UserError(f"loss: gammas must be >= 0, got {gamma_neg} and {gamma_pos}")
        if not 0 <= clip < 1:
            raise UserError(f"loss.clip must be in [0, 1), got {clip}")
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.clip = float(clip)
        self.eps = float(eps)
        self.register_buffer("pos_weight", _as_tensor(pos_weight), persistent=False)

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        y = targets.to(device=x.device, dtype=torch.float32)
        p = torch.sigmoid(x)
        p_neg = 1 - p
        if self.clip > 0:
            p_neg = (p_neg + self.clip).clamp(max=1)
        log_pos = y * torch.log(p.clamp(min=self.eps))
        if self.pos_weight is not None:
            log_pos = log_pos * self.pos_weight.to(x.device)
        log_likelihood = log_pos + (1 - y) * torch.log(p_neg.clamp(min=self.eps))
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            p_true = p * y + p_neg * (1 - y)
            gamma = self.gamma_pos * y + self.gamma_neg * (1 - y)
            log_likelihood = log_likelihood * torch.pow(1 - p_true, gamma)
        return -log_likelihood

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return masked_mean(self.elementwise(logits, targets), mask)

    def masked_sum(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return masked_sum(self.elementwise(logits, targets), mask)


class MaskedBCEWithLogits(nn.Module):
    """Binary cross-entropy on fp32 logits with pos_weight and the same masked mean."""

    def __init__(self, pos_weight: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", _as_tensor(pos_weight), persistent=False)

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        pos_weight = self.pos_weight.to(x.device) if self.pos_weight is not None else None
        y = targets.to(device=x.device, dtype=torch.float32)
        return F.binary_cross_entropy_with_logits(x, y, pos_weight=pos_weight, reduction="none")

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return masked_mean(self.elementwise(logits, targets), mask)

    def masked_sum(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return masked_sum(self.elementwise(logits, targets), mask)


def build_loss(cfg: LossConfig, num_labels: int | None = None) -> nn.Module:
    """The configured loss; with `num_labels`, pos_weight's length is checked now, not at step 1."""
    pos_weight = list(cfg.pos_weight) if cfg.pos_weight is not None else None
    if pos_weight is not None and num_labels is not None and len(pos_weight) not in (1, num_labels):
        raise UserError(
            f"loss.pos_weight has {len(pos_weight)} values but there are {num_labels} labels"
        )
    if cfg.name == "bce":
        return MaskedBCEWithLogits(pos_weight)
    return AsymmetricLoss(cfg.gamma_neg, cfg.gamma_pos, cfg.clip, cfg.eps, pos_weight)


def _as_tensor(values: Sequence[float] | torch.Tensor | None) -> torch.Tensor | None:
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        return values.detach().float()
    return torch.tensor([float(v) for v in values], dtype=torch.float32)
