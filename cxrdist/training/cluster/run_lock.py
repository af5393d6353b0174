"""One training run per run directory at a time.

Run twice (a second terminal, a duplicated SLURM submission, `--fold all` next to a single fold), two
trainers would interleave checkpoints, metrics.jsonl lines and best/ exports in one directory. Rank 0
holds a POSIX record lock (`fcntl.lockf`, which NFS and Lustre pass on to the server) on the run
directory's lock file for as long as its process lives; the kernel drops it when the process dies,
kill -9 included, so a requeued job never finds a stale lock. A second run finds it held and every one
of its ranks stops with one line naming the holder. A filesystem without locks is said once and not
enforced.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from cxrdist.errors import UserError
from cxrdist.layout import RUN_LOCK_FILE
from cxrdist.log import get_logger

LOG = get_logger("train")
HELD = (errno.EACCES, errno.EAGAIN)


def lock_run_dir(run_dir: Path) -> int | None:
    """The open, locked file descriptor (keep it open), or None where the filesystem has no locks;
    UserError when another process holds the lock."""
    path = Path(run_dir) / RUN_LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = path.read_text(errors="replace").strip() if err.errno in HELD else ""
        os.close(fd)
        if err.errno in HELD:
            raise UserError(f"{run_dir}: another run is training in this directory ({holder or 'holder unknown'}); "
                            "wait for it or stop it, or give this run another experiment name") from None
        LOG.warning(f"cxrdist: cannot lock {path} ({os.strerror(err.errno)}): make sure no other run trains in {run_dir}")
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return fd


def hold_run_lock(accelerator, run_dir: Path) -> int | None:
    """Collective: rank 0 takes the lock; when it cannot, every rank raises the same UserError."""
    from accelerate.utils import broadcast_object_list

    fd, message = None, None
    if accelerator.is_main_process:
        try:
            fd = lock_run_dir(run_dir)
        except UserError as err:
            message = str(err)
    if accelerator.num_processes > 1:
        message = broadcast_object_list([message])[0]
    if message:
        raise UserError(message)
    return fd


def release_run_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing drops the lock
