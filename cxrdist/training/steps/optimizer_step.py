"""The guarded optimizer step: gradient clipping, a step skipped for non-finite gradients (decided on the device where
the optimizer allows it, so the step needs no host sync), and which skipped steps count toward train.max_bad_steps
(training/steps/bad_steps.py), under DDP, DeepSpeed ZeRO-1/2 and fp16 loss scaling alike."""

from __future__ import annotations

import torch

from cxrdist.training.steps.bad_steps import is_bad_deepspeed_fp16_step, is_bad_step


class GuardedStep:
    def __init__(self, accelerator, model, optimizer, deepspeed: bool, grad_clip: float) -> None:
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.deepspeed, self.grad_clip = deepspeed, grad_clip

    def clip(self) -> torch.Tensor | None:
        """The gradient norm before clipping, as a device tensor. DeepSpeed clips itself and hands back its own
        norm as a Python float (already read on the host), or None; the float is wrapped so one path follows."""
        clip = self.grad_clip
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        if norm is None or isinstance(norm, torch.Tensor):
            return None if norm is None else norm.detach()
        return torch.tensor(float(norm), device=self.accelerator.device)

    def step(self, grad_norm: torch.Tensor | None) -> torch.Tensor | bool:
        """Step unless the gradients are non-finite; returns whether the step was skipped, as a device
        tensor where the decision stays on the device (no host sync), else as a bool."""
        acc = self.accelerator
        inner = self.optimizer.optimizer
        if acc.mixed_precision == "fp16" or grad_norm is None:
            self.optimizer.step()  # fp16: the GradScaler itself skips inf/NaN steps (and syncs to tell)
            return acc.optimizer_step_was_skipped
        skipped = ~torch.isfinite(grad_norm)
        if getattr(inner, "_step_supports_amp_scaling", False):  # fused: the kernel skips when found_inf is 1
            inner.found_inf = skipped.float()
            try:
                self.optimizer.step()
            finally:
                del inner.found_inf
            return skipped
        if not bool(skipped):  # an optimizer that cannot take the decision on the device
            self.optimizer.step()
        return bool(skipped)

    def is_bad(self, skipped: torch.Tensor | bool, grad_norm: torch.Tensor | None, loss_finite: torch.Tensor) -> torch.Tensor | bool:
        """Whether the step counts toward train.max_bad_steps: a non-finite loss or skipped step, except the fp16
        GradScaler's loss-scale calibration (training/steps/bad_steps.py). Decided on the device, except under fp16,
        whose scaler has synced already."""
        scaler = getattr(self.accelerator, "scaler", None)
        if self.deepspeed and self.accelerator.mixed_precision == "fp16":
            loss_scaler = self.deepspeed_loss_scaler()  # `skipped` is the engine's overflow flag
            return is_bad_deepspeed_fp16_step(bool(loss_finite), bool(skipped), float(loss_scaler.cur_scale),
                                              float(getattr(loss_scaler, "min_scale", loss_scaler.cur_scale)),
                                              bool(getattr(loss_scaler, "dynamic", False)))
        if self.accelerator.mixed_precision != "fp16" or scaler is None:
            return skipped | ~loss_finite if isinstance(skipped, torch.Tensor) else skipped or not bool(loss_finite)
        grads_finite = grad_norm is None or bool(torch.isfinite(grad_norm))
        return is_bad_step(bool(loss_finite), grads_finite, bool(skipped), float(scaler.get_scale()))

    def deepspeed_loss_scaler(self):
        """DeepSpeed's own dynamic (or static) loss scaler of its ZeRO-1/2 optimizer, under fp16."""
        return self.optimizer.optimizer.loss_scaler

    def loss_scale(self) -> float | None:
        """The fp16 loss scale now (DeepSpeed's scaler or torch's GradScaler), None without one. A host read: log time only."""
        if self.accelerator.mixed_precision != "fp16":
            return None
        if self.deepspeed:
            return float(self.deepspeed_loss_scaler().cur_scale)
        scaler = getattr(self.accelerator, "scaler", None)
        return None if scaler is None else float(scaler.get_scale())
