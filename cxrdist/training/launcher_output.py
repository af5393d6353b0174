"""The launcher's stderr, minus its own failure page.

When a trainer exits non-zero, `accelerate launch` raises CalledProcessError (one process) or torch
elastic's ChildFailedError with its boxed report (several), so a user error the trainer already said in
one line ended in a page of launcher traceback. This filter passes the trainers' output through as it
comes (tqdm's carriage-return updates included), drops exactly those launcher pages and elastic's own
log lines, and keeps the trainer's exit code they name. Any other traceback (a bug in a trainer) is shown.
"""

from __future__ import annotations

import codecs
import os
import re
import threading

TRACEBACK = "Traceback (most recent call last):"
LAUNCHER_ERRORS = ("subprocess.CalledProcessError:", "torch.distributed.elastic.multiprocessing.errors.ChildFailedError")
CHILD_EXIT = re.compile(r"(?:exit status|exitcode\s*:)\s*(-?\d+)")
ELASTIC_LOG = re.compile(r"^[EWI]\d{4} .*torch/distributed/elastic/")  # "E1127 12:00:00 ... api.py:...] failed (exitcode: 2) ..."
PARTIAL_ELASTIC_LOG = re.compile(r"^[EWI](\d{0,3}$|\d{4}( |$))")
RULE = "=" * 20


class LauncherStderr:
    def __init__(self, sink) -> None:
        self.sink = sink
        self.pending = ""  # the current line, not yet ended
        self.block: list[str] | None = None  # a traceback being read
        self.in_box = False  # inside ChildFailedError's ===== box
        self.rules_seen = 0
        self.child_code: int | None = None

    def feed(self, text: str) -> None:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.line(line + "\n")
        if self.pending and self.block is None and not self.in_box and not self.may_be_dropped(self.pending):
            self.sink.write(self.pending)  # a progress bar redraw: out at once
            self.pending = ""
        self.sink.flush()

    @staticmethod
    def may_be_dropped(start: str) -> bool:
        """Whether a line beginning with `start` may turn out to be one this filter drops (so wait for its end)."""
        return TRACEBACK.startswith(start) or (PARTIAL_ELASTIC_LOG.match(start) is not None and "\r" not in start)

    def close(self) -> None:
        if self.pending:
            self.line(self.pending)
        if self.block:  # cut off mid-traceback: show it
            self.sink.write("".join(self.block))
        self.sink.flush()

    def line(self, line: str) -> None:
        if self.in_box:
            self.note_exit(line)
            self.rules_seen += line.startswith(RULE)
            self.in_box = self.rules_seen < 2
        elif self.block is not None:
            self.block.append(line)
            if line.startswith(TRACEBACK) or line[:1] in (" ", "\t", "\n", ""):
                return
            if line.startswith(LAUNCHER_ERRORS):  # the exception line closes the launcher's traceback
                self.note_exit(line)
                self.in_box, self.rules_seen = "ChildFailedError" in line, 0
            else:
                self.sink.write("".join(self.block))
            self.block = None
        elif line.startswith(TRACEBACK):
            self.block = [line]
        elif not ELASTIC_LOG.match(line):
            self.sink.write(line)

    def note_exit(self, line: str) -> None:
        """Keep the first trainer exit code, but prefer a real one (2: a user error) over a signal death (-15): when one
        rank fails, torch elastic terminates its peers, and their reports may come first."""
        match = CHILD_EXIT.search(line)
        if match is None:
            return
        code = int(match.group(1))
        if self.child_code is None or (self.child_code < 0 < code):
            self.child_code = code


def pump(fd: int, stderr: LauncherStderr) -> threading.Thread:
    """Copy the pipe `fd` through `stderr` in a thread until the writer closes it."""
    def copy() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := os.read(fd, 65536):
            stderr.feed(decoder.decode(chunk))
        stderr.feed(decoder.decode(b"", final=True))
        stderr.close()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread
