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


def check_shared_directory(accelerator, directory) -> None:
    """Every rank must see the same run directory (checkpoints are written into it by every rank, and
    resumed from it): rank 0 writes a random token there, every rank reads it back. On machines that do
    not share `directory` at the same path, every rank stops with one line naming the hosts that differ,
    instead of a rank failing mid-checkpoint on a directory that only exists elsewhere."""
    if accelerator.num_processes == 1:
        return
    import socket
    import uuid
    from pathlib import Path

    from accelerate.utils import broadcast_object_list, gather_object

    from cxrdist.atomic import atomic_write_text
    from cxrdist.errors import UserError
    from cxrdist.layout import SHARED_CHECK_FILE

    marker = Path(directory) / SHARED_CHECK_FILE
    token = uuid.uuid4().hex
    if accelerator.is_main_process:
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, token)
    # The broadcast ends after rank 0 wrote the token, the gather after every rank read it.
    token = broadcast_object_list([token])[0]
    try:
        seen = marker.read_text() == token
    except OSError:
        seen = False
    views = gather_object([(accelerator.process_index, socket.gethostname(), seen)])
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    blind = [(rank, host) for rank, host, ok in views if not ok]
    if blind:
        hosts = sorted({host for _, host in blind})
        raise UserError(
            f"{directory} is not one directory for every process: rank 0 ({views[0][1]}) wrote into it and "
            f"{len(blind)} rank(s) on {', '.join(hosts)} do not see it; output_dir (and the shards) must be on a "
            "filesystem every machine mounts at the same path, given the same on every machine"
        )
