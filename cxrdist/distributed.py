"""The one place an Accelerator is made: the backend rule for several CPU processes and the collective timeout."""

from __future__ import annotations

import os
from datetime import timedelta

# Seconds a collective may wait for the other ranks (torch's own default is 30 minutes for gloo).
DEFAULT_DIST_TIMEOUT = 600


def world_size() -> int:
    """Processes the launcher started (1 outside `accelerate launch` / torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(dist_timeout: float = DEFAULT_DIST_TIMEOUT, **kwargs):
    """An Accelerator. With several processes the process group gets `dist_timeout`: a rank whose peer vanished
    (node lost, no TCP reset) fails after that many seconds instead of hanging. Several CPU processes (tests, demo,
    DeepSpeed on CPU) talk over gloo, and accelerate would not count the DeepSpeed processes without it; on CUDA the
    backend stays accelerate's nccl. A lone process must not ask for a process group."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    if world_size() > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=dist_timeout)))
    return Accelerator(kwargs_handlers=handlers, **kwargs)
