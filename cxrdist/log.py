"""Logging for progress messages and warnings: the "cxrdist" logger, printed as the bare message (tqdm-safe,
so progress bars are not torn), INFO to stdout and WARNING and above to stderr. CXRDIST_LOG_LEVEL=DEBUG|WARNING|...
changes the level. Command results (what a command prints as its answer) stay plain prints."""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

ROOT = "cxrdist"


class TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def get_logger(name: str) -> logging.Logger:
    """cxrdist.<name>; the first call installs the handler on the "cxrdist" logger."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, TqdmHandler) for h in root.handlers):
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("CXRDIST_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(f"{ROOT}.{name}")
