"""Preemption: SIGUSR1/SIGTERM set a flag; all ranks agree at a step boundary, checkpoint and exit."""

from __future__ import annotations

import signal

import torch

# EX_TEMPFAIL from sysexits.h: "temporary failure, retry later". slurm/train_folds.sh requeues on it.
EXIT_PREEMPTED = 75
# `accelerate launch` reports a worker's 75 as 1; this file in the run dir says "preempted" anyway.
PREEMPTED_MARKER = "PREEMPTED"
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> PreemptionFlag:
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, accelerator) -> bool:
        """True on every rank as soon as any rank got a signal (one all-reduce of a scalar)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
