"""Label-Graph Refinement: z' = z + alpha * sigmoid(z) @ A, with a learned, sparse A.

A is C x C; row = source label, column = target label, so A[i, j] > 0 means "evidence for label
i raises the logit of label j". The diagonal is held at zero (a label does not refine itself),
A starts at zero (training starts exactly at the baseline), and the refinement runs in fp32
whatever the autocast context.

Sparsity, two modes:
- "proximal" (default): after every optimizer step the caller runs `proximal_step(lr, optimizer)`,
  which soft-thresholds A. Couplings without enough support in the data become exactly 0.
- "subgradient": the paper's code, `l1 * |A|.sum()` added to the loss. Under Adam a coupling then
  oscillates around zero with an amplitude of about one learning rate, never reaching it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from cxrdist.errors import UserError
from cxrdist.model import zero_state
from cxrdist.model.config import SPARSITY_MODES

ZERO_TOLERANCE = 1e-6  # |a| at or below this counts as "no coupling" in reports


def clip_coefficient(total_norm: torch.Tensor | float | None, max_norm: float) -> torch.Tensor | float:
    """The factor `torch.nn.utils.clip_grad_norm_(params, max_norm)` multiplied the gradients by
    (1.0 when clipping is off, did not bite, or the norm is unknown or non-finite). A tensor norm
    gives a tensor on its device, so the training step never waits for the host."""
    if total_norm is None or not max_norm > 0 or not math.isfinite(max_norm):
        return 1.0
    if isinstance(total_norm, torch.Tensor):
        norm = total_norm.detach().float()
        return torch.where(torch.isfinite(norm), (max_norm / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(norm))
    if not math.isfinite(total_norm):
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


class LabelGraphRefinement(nn.Module):
    def __init__(
        self,
        num_labels: int,
        alpha: float = 0.3,
        l1: float = 1e-3,
        detach: bool = False,
        sparsity: str = "proximal",
    ) -> None:
        super().__init__()
        if sparsity not in SPARSITY_MODES:
            raise UserError(
                f"model.refine.sparsity: {sparsity!r} is not one of {', '.join(SPARSITY_MODES)}"
            )
        if l1 < 0:
            raise UserError(f"model.refine.l1 must be >= 0, got {l1}")
        self.num_labels = num_labels
        self.alpha = float(alpha)
        self.l1 = float(l1)
        self.detach = bool(detach)
        self.sparsity_mode = sparsity
        self.weight = nn.Parameter(torch.zeros(num_labels, num_labels))
        # Multiplying by the mask in forward gives the diagonal an exactly-zero gradient, so no
        # optimizer (momentum, Adam) can move it; enforce_zero_diagonal() covers in-place edits.
        self.register_buffer("off_diagonal", 1.0 - torch.eye(num_labels), persistent=False)
        self._warned_no_adam_state = False

    @property
    def A(self) -> nn.Parameter:  # noqa: N802 - the name used in the formula and the docs
        return self.weight

    def coupling(self) -> torch.Tensor:
        """A in fp32 with its diagonal masked to zero."""
        return self.weight.float() * self.off_diagonal.float()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            source = z.detach() if self.detach else z
            return z + self.alpha * (torch.sigmoid(source) @ self.coupling())

    def l1_penalty(self) -> torch.Tensor:
        """The term to add to the loss: 0 in proximal mode (the prox step applies it)."""
        if self.sparsity_mode == "proximal" or self.l1 == 0:
            return self.weight.new_zeros((), dtype=torch.float32)
        return self.l1 * self.coupling().abs().sum()

    @torch.no_grad()
    def proximal_step(self, lr: torch.Tensor | float, optimizer: torch.optim.Optimizer | None = None,
                      scale: torch.Tensor | float = 1.0) -> None:
        """Soft-threshold A in place after an optimizer step: a <- sign(a) * max(|a| - t, 0).

        t = lr * l1 is the exact proximal step of plain SGD on loss + l1 * |A|. With an Adam-type
        `optimizer` (Adam, AdamW; also behind accelerate's wrapper) whose state for A is reachable,
        t is divided per entry by Adam's denominator sqrt(v_hat) + eps, the proximal step in the
        metric Adam actually steps in ("proximal Adam"). Without that, an Adam step moves an
        entry by about lr while the threshold is lr * l1, and L1 has almost no effect.
        `lr` is the learning rate of A's parameter group for the step just taken. `scale` is the
        factor gradient clipping multiplied the gradients by in that step (`clip_coefficient`):
        clipping scales the data gradient, and with it Adam's denominator, so an unscaled threshold
        would grow by 1/scale and the L1 weight would mean more the larger the other parameters'
        gradients. Scaled, the L1 term is clipped together with the loss, exactly as the subgradient
        mode's `l1 * |A|` is, and the optimum is the same at every gradient norm. No-op in
        subgradient mode. Call it only after a step that was taken (not one skipped by the fp16
        GradScaler, not an accumulation micro-step).

        Under DeepSpeed ZeRO-1/2 the optimizer steps an fp32 master copy of A, partitioned over the
        ranks, and would overwrite an edit of the module's A at its next step: there the step reads
        the whole master and Adam state (model/zero_state.py; a collective, so every rank calls it),
        thresholds the master, and writes it back together with the module's copy. Every rank
        computes the same result from the same gathered values, so A stays bitwise equal across ranks.
        """
        if self.sparsity_mode != "proximal":
            return
        threshold: torch.Tensor | float = lr * self.l1 * scale
        master = zero_state.full_master(self.weight)  # None unless DeepSpeed ZeRO keeps A's master copy
        denominator = self._adam_denominator(optimizer, partitioned=master is not None) if optimizer is not None else None
        if denominator is not None:
            threshold = threshold / denominator
        elif optimizer is not None and not isinstance(optimizer, torch.optim.SGD):
            self._warn_no_adam_state(optimizer)
        w = self.weight if master is None else master
        shrunk = w.sign() * (w.abs() - threshold).clamp(min=0)
        shrunk.diagonal().zero_()
        if master is None:
            w.copy_(shrunk)
        else:  # the master is a gathered copy: write it back where DeepSpeed keeps it
            zero_state.write_master(self.weight, shrunk)

    def _adam_denominator(self, optimizer: torch.optim.Optimizer, partitioned: bool = False) -> torch.Tensor | None:
        """sqrt(v_hat) + eps for A from a torch Adam-type optimizer's state (DeepSpeed ZeRO's when
        `partitioned`), else None."""
        found = zero_state.adam_second_moment(self.weight, optimizer) if partitioned else self._adam_state(optimizer)
        if found is None:
            return None
        second_moment, step, group = found
        # The step count stays a tensor (on the device for fused Adam): reading it would sync the host.
        bias_correction = 1.0 - group["betas"][1] ** torch.as_tensor(step, dtype=torch.float32)
        return (second_moment.float() / bias_correction).sqrt() + group["eps"]

    def _adam_state(self, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, object, dict] | None:
        """(exp_avg_sq (max_exp_avg_sq with amsgrad), step, param group) of A in a torch Adam-type optimizer."""
        states = getattr(optimizer, "state", None)
        state = states.get(self.weight) if hasattr(states, "get") else None
        groups = getattr(optimizer, "param_groups", ())
        group = next((g for g in groups if any(p is self.weight for p in g["params"])), None)
        if not state or group is None or "betas" not in group:
            return None
        if "exp_avg_sq" not in state or "step" not in state:
            return None
        key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in state else "exp_avg_sq"
        return state[key], state["step"], group

    def _warn_no_adam_state(self, optimizer: object) -> None:
        if self._warned_no_adam_state:
            return
        self._warned_no_adam_state = True
        warnings.warn(
            f"LabelGraphRefinement.proximal_step: no Adam state for A in {type(optimizer).__name__}; "
            "using the plain threshold lr * l1, a far weaker penalty under an adaptive optimizer",
            stacklevel=3,
        )

    @torch.no_grad()
    def enforce_zero_diagonal(self) -> None:
        self.weight.diagonal().zero_()

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of off-diagonal entries with |a| <= 1e-6 (1.0 for a single label)."""
        off = self.off_diagonal.bool()
        count = int(off.sum())
        if count == 0:
            return 1.0
        zeros = (self.weight.float().abs() <= ZERO_TOLERANCE) & off
        return int(zeros.sum()) / count

    @torch.no_grad()
    def top_couplings(
        self, label_names: Sequence[str], k: int = 10
    ) -> list[tuple[str, str, float]]:
        """The k largest couplings by magnitude as (source, target, value); zeros left out."""
        if len(label_names) != self.num_labels:
            raise ValueError(f"{len(label_names)} label names for {self.num_labels} labels")
        a = self.coupling().cpu()
        magnitude = a.abs().flatten()
        order = torch.argsort(magnitude, descending=True, stable=True)
        result = []
        for index in order[:k].tolist():
            if magnitude[index] <= ZERO_TOLERANCE:
                break
            source, target = divmod(index, self.num_labels)
            result.append((label_names[source], label_names[target], float(a[source, target])))
        return result

    def extra_repr(self) -> str:
        return (
            f"num_labels={self.num_labels}, alpha={self.alpha}, l1={self.l1}, "
            f"detach={self.detach}, sparsity={self.sparsity_mode!r}"
        )
