"""The trainers' stderr, kept apart from the launcher's own.

`cxrdist train` shows the user everything its trainers write, as it comes (progress bars included), and
nothing of the launcher's failure page when the trainers' outcome files (training/launcher/outcome.py) already explain
the end. The two are told apart by where they are written, never by reading them: each trainer points its
stderr (fd 2, inherited by its DataLoader workers) at a FIFO that `cxrdist train` made and copies to its own.
"""

from __future__ import annotations

import codecs
import collections
import fcntl
import os
import select
import threading
from pathlib import Path

TRAINER_STDERR_ENV = "CXRDIST_TRAINER_STDERR"


def attach() -> None:
    """Trainer side, first thing at start: stderr to the FIFO named in the environment, if `cxrdist train` made one."""
    path = os.environ.get(TRAINER_STDERR_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # fails at once (ENXIO) when nobody reads: keep stderr then
    except OSError:
        return
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)  # writes wait, never drop
    os.dup2(fd, 2)
    os.close(fd)


class TrainerStderr:
    """Launcher side: make the FIFO in `directory` and copy whatever the trainers write to `sink` until close()."""

    def __init__(self, directory: Path, sink) -> None:
        self.path = Path(directory) / "trainer-stderr"
        os.mkfifo(self.path, 0o600)
        self.read_fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        # Our own writer end keeps the FIFO open between trainers (no end-of-file while none has attached yet).
        self.keep_fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        self.sink = sink
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._copy, daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        while True:
            readable, _, _ = select.select([self.read_fd], [], [], 0.2)
            if readable:
                self._forward()
            elif self.done.is_set():
                return

    def _forward(self) -> None:
        try:
            chunk = os.read(self.read_fd, 65536)
        except BlockingIOError:
            return
        if chunk:
            self.sink.write(self.decoder.decode(chunk))
            self.sink.flush()

    def close(self) -> None:
        """After the trainers are gone: copy what is left, then stop."""
        self.done.set()
        self.thread.join(timeout=30)
        os.close(self.read_fd)
        os.close(self.keep_fd)


class TailBuffer:
    """The launcher's own stderr, read continuously (a full pipe would block the launcher) and kept to its last
    `limit` bytes, to be shown only when the trainers did not explain a failure."""

    def __init__(self, fd: int, limit: int = 64 * 1024) -> None:
        self.fd, self.limit = fd, limit
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while chunk := os.read(self.fd, 65536):
            self.chunks.append(chunk)
            self.size += len(chunk)
            while self.size - len(self.chunks[0]) >= self.limit:
                self.size -= len(self.chunks.popleft())

    def text(self, timeout: float = 30) -> str:
        self.thread.join(timeout=timeout)
        return b"".join(self.chunks)[-self.limit:].decode("utf-8", "replace")
