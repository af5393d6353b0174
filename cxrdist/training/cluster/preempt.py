"""Preemption: SIGUSR1/SIGTERM set a flag; all ranks agree at a step boundary, checkpoint and exit."""

from __future__ import annotations

import os
import shlex
import signal
import sys

import torch

# EX_TEMPFAIL from sysexits.h: "temporary failure, retry later". slurm/train_folds.sh requeues on it.
EXIT_PREEMPTED = 75
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Set by `cxrdist train` for its trainers: the command the user typed, which resumes the run.
RESUME_COMMAND_ENV = "CXRDIST_RESUME_COMMAND"


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


def signal_meaning(name: str, environ=os.environ) -> str:
    """What a stop signal most likely was, in words (SIGINT: Ctrl-C; under SLURM: its preemption or time limit)."""
    slurm = "SLURM_JOB_ID" in environ
    if name == "SIGINT":
        return "Ctrl-C (SIGINT)"
    if name == "SIGUSR1":
        return ("SLURM's warning signal (sbatch --signal) ahead of a preemption or the time limit (SIGUSR1)" if slurm
                else "a preemption warning (SIGUSR1)")
    if name == "SIGTERM":
        return "SLURM's preemption, scancel or time limit (SIGTERM)" if slurm else "a termination request (SIGTERM: kill or a scheduler)"
    return f"a stop request ({name})" if name else "a stop request on another rank"


def own_command() -> str:
    """The command that started this trainer: `cxrdist train`'s (passed down), the launcher's
    (accelerate launch / torchrun start the trainer processes themselves), or this process's own; its URLs without
    their user:password@ or query token, as every line shows them."""
    from cxrdist.data.location import redact

    if os.environ.get(RESUME_COMMAND_ENV):
        return redact(os.environ[RESUME_COMMAND_ENV])
    if "LOCAL_RANK" in os.environ:
        import psutil

        try:
            return redact(shlex.join(psutil.Process().parent().cmdline()))
        except psutil.Error:
            pass
    return redact(shlex.join(sys.orig_argv))


def stop_explanation(name: str, environ=os.environ) -> str:
    """What stopped the trainer and how to resume, for its 'preempted' line. Under `cxrdist train` the trainer
    only sees the signal that command passes on: that command says what it received and how to resume."""
    if RESUME_COMMAND_ENV in environ:
        return "asked to stop by `cxrdist train`"
    if "SLURM_JOB_ID" in environ:
        return (f"stopped by {signal_meaning(name, environ)}; slurm/train_folds.sh requeues the task on this exit code and it resumes; "
                f"elsewhere run the same command again: {own_command()}")
    return f"stopped by {signal_meaning(name, environ)}; to resume, run the same command again: {own_command()}"


class ReceivedSignals:
    """The signals this process receives while in the `with` block, whichever handler takes them (Python's
    wakeup fd sees every one): `cxrdist train` says what stopped it though its launcher code handles them."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __enter__(self) -> ReceivedSignals:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        os.set_blocking(self._read, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        return self

    def collect(self) -> list[str]:
        try:
            while chunk := os.read(self._read, 64):
                self.names += [signal.Signals(n).name if n in signal.valid_signals() else f"signal {n}" for n in chunk]
        except BlockingIOError:
            pass
        return self.names

    def __exit__(self, *exc) -> None:
        self.collect()
        signal.set_wakeup_fd(self._previous)
        os.close(self._read)
        os.close(self._write)
