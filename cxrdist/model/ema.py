"""EMA of the WHOLE network (backbone, head and the refinement's A) in fp32, via timm.

The paper's code averaged the backbone only and validated the EMA backbone with the live
refinement; here `ModelEma.module` is a complete CXRNet used as is for evaluation and export.
One addition to timm's plain average: in proximal mode the averaged A keeps the live A's exact
zeros (see `_keep_live_support`), so the exported matrix is as sparse as the trained one.

Pass the bare model: `ModelEma(accelerator.unwrap_model(model), ...)` and
`ema.update(accelerator.unwrap_model(model), step)`. DDP, DeepSpeed (ZeRO-1/2 keep whole
parameters on every rank) and torch.compile wrappers are unwrapped here too, as a safety net.
Create it before `accelerator.prepare` so the copy starts in fp32 and on no wrapper.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.utils import ModelEmaV3
from torch import nn

from cxrdist.model.refine import LabelGraphRefinement


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DeepSpeed / torch.compile wrappers."""
    from accelerate.utils import extract_model_from_parallel  # heavy import, only when training

    return extract_model_from_parallel(model, keep_torch_compile=False)


class ModelEma:
    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9998,
        warmup: bool = True,
        warmup_power: float = 2 / 3,
        update_after_step: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        """decay: the target decay. warmup: ramp it as 1 - step^-warmup_power, step from 1 (timm's
        schedule; 0.99 at step 1,000 with power 2/3), so early weights fade fast. device: keep
        the copy elsewhere (e.g. "cpu") to save accelerator memory.
        """
        self._ema = ModelEmaV3(
            unwrap(model),
            decay=decay,
            use_warmup=warmup,
            warmup_power=warmup_power,
            update_after_step=update_after_step,
            device=torch.device(device) if device is not None else None,
            dtype=torch.float32,
        )
        self._keys_checked = False

    @property
    def module(self) -> nn.Module:
        """The averaged network (eval mode): call it for evaluation, save it for export."""
        return self._ema.module

    def decay_at(self, step: int | None) -> float:
        """The decay update(model, step) uses; step None = the target decay, no warm-up."""
        return self._ema.get_decay(step)

    def update(self, model: nn.Module, step: int | None = None, skipped: torch.Tensor | bool = False) -> None:
        """After each optimizer step: ema = d * ema + (1 - d) * model, d = decay_at(step).

        timm's warm-up copies the model outright (d = 0) at steps <= update_after_step + 1.
        `skipped`: the optimizer skipped this step (non-finite gradients): the EMA stays as it was. A device
        tensor is applied on the device (the weight of the model becomes 0), so the step never waits for the host.
        """
        model = unwrap(model)
        if not self._keys_checked:
            ours, theirs = list(self.module.state_dict()), list(model.state_dict())
            if ours != theirs:  # timm pairs tensors by position, so names must line up
                raise ValueError("ModelEma.update: the model's state_dict keys differ from the EMA's")
            self._keys_checked = True
        if isinstance(skipped, torch.Tensor):
            self._update_unless(model, self.decay_at(step), skipped)
        elif not skipped:
            self._ema.update(model, step)
        self._keep_live_support(model)

    @torch.no_grad()
    def _update_unless(self, model: nn.Module, decay: float, skipped: torch.Tensor) -> None:
        """timm's update with the model's weight (1 - d) multiplied by `skipped == False` on the device; integer buffers
        (BatchNorm's batch counter) are kept on a skipped step too."""
        ema_values, model_values = list(self.module.state_dict().values()), list(model.state_dict().values())
        weight = (~skipped).to(device=ema_values[0].device, dtype=torch.float32) * (1.0 - decay)
        floats = [(e, m.to(device=e.device, dtype=e.dtype)) for e, m in zip(ema_values, model_values) if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], [weight] * len(floats))
        for e, m in zip(ema_values, model_values):
            if not e.is_floating_point():
                e.copy_(torch.where(skipped.to(e.device), e, m.to(e.device)))

    @torch.no_grad()
    def _keep_live_support(self, model: nn.Module) -> None:
        """Zero the averaged A where the live A is exactly zero (proximal mode).

        A plain average never reaches zero (an entry the prox step zeroed decays as d^k), so
        without this the exported A would be dense with tiny values; the live model's support
        is the sparsity the method learns, and the average smooths the values on it.
        """
        for averaged, live in zip(self.module.modules(), model.modules()):
            if isinstance(live, LabelGraphRefinement) and live.sparsity_mode == "proximal":
                averaged.weight.masked_fill_(live.weight.to(averaged.weight.device) == 0, 0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged network's state dict (plain CXRNet keys, ready for model.safetensors)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state_dict)
