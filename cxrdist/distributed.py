"""The one place an Accelerator is made, with the rule for several CPU processes."""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    """Processes the launcher started (1 outside `accelerate launch` / torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(**kwargs):
    """An Accelerator; several CPU processes (tests, demo, DeepSpeed on CPU) talk over gloo, and accelerate
    would not count the DeepSpeed processes without it. A lone process must not ask for a process group."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(backend="gloo")] if world_size() > 1 and not torch.cuda.is_available() else []
    return Accelerator(kwargs_handlers=handlers, **kwargs)
