"""The training loss as ONE masked mean over every unmasked entry of an optimizer step: all ranks'
and all accumulated micro-batches' entries, as the README states.

A per-micro-batch mean would weigh entries by how many their rank and micro-batch happen to have
unmasked (one rank with 10 entries of loss 1, another with 2 of loss 0: 0.5 instead of 10/12).
Instead, before the first backward of an accumulation group the unmasked entries of its K
micro-batches are counted and all-reduced over the W ranks (N), and each micro-batch's masked
loss SUM is scaled by W*K/N: accelerate divides each backward by K and DDP averages gradients over
W, so the step's gradient is that of (sum of every masked loss) / N.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class GlobalMaskedMean:
    def __init__(self, world_size: int, micro_batches: int) -> None:
        self.world_size, self.micro_batches = world_size, micro_batches
        self.scale: torch.Tensor | None = None

    def start_group(self, masks: Iterable[torch.Tensor], all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device) -> torch.Tensor:
        """Count this rank's unmasked entries in the group's micro-batches (host masks: no sync), sum over ranks on
        the device; returns N as a device tensor (read it only where a sync is fine)."""
        local = torch.stack([(mask != 0).sum() for mask in masks]).sum().reshape(1)  # a tensor: no host read
        if torch.device(device).type == "cuda":  # pinned: the copy is asynchronous, no host sync in the step
            local = local.to(torch.float32).pin_memory()
        total = all_reduce_sum(local.to(device=device, dtype=torch.float32, non_blocking=True))[0]
        self.scale = self.world_size * self.micro_batches / total.clamp(min=1)
        return total

    def __call__(self, masked_sum: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate for one micro-batch, from its masked loss sum."""
        if self.scale is None:
            raise RuntimeError("start_group() must count the accumulation group before its first backward")
        return masked_sum * self.scale
