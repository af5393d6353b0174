"""Counters the training loop keeps on the device between two host reads: a log window's loss and sample counts, and
the runs of optimizer steps skipped for non-finite gradients."""

from __future__ import annotations

import torch


class Window:
    """Counters between two log lines."""

    def __init__(self) -> None:
        self.wait = self.total = 0.0
        self.loss_sum = 0.0
        self.batches = self.samples = self.corrupt = 0
        self.grad_norm: torch.Tensor | None = None  # of the last step, on the device until logged

    def add_batch(self, samples: int, corrupt: int, loss: torch.Tensor) -> None:
        self.batches += 1
        self.samples += samples
        self.corrupt += corrupt
        self.loss_sum = self.loss_sum + loss.float()  # stays on the device: no sync per step


class BadSteps:
    """Counts optimizer steps skipped for non-finite gradients on the device, so that the step never
    waits for the host; `read` brings the counts over (a sync) when the trainer logs or checkpoints."""

    def __init__(self, device: torch.device, in_row: int = 0) -> None:
        self.in_row = torch.full((), in_row, dtype=torch.int64, device=device)  # the current run of skipped steps
        self.worst = self.in_row.clone()  # the longest run seen since the last read
        self.total = torch.zeros((), dtype=torch.int64, device=device)  # skipped since the last read

    def add(self, skipped: torch.Tensor | bool) -> None:
        skipped = torch.as_tensor(skipped, device=self.in_row.device).to(torch.int64)
        self.in_row.add_(1).mul_(skipped)  # +1 when skipped, back to 0 when taken
        torch.maximum(self.worst, self.in_row, out=self.worst)
        self.total.add_(skipped)

    def read(self) -> tuple[int, int, int]:
        """(the current run, the longest run since the last read, skipped since the last read)."""
        in_row, worst, total = torch.stack([self.in_row, self.worst, self.total]).tolist()
        self.worst.copy_(self.in_row)
        self.total.zero_()
        return in_row, worst, total
