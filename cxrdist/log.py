"""Logging for progress messages and warnings: the "cxrdist" logger, printed as the bare message (tqdm-safe,
so progress bars are not torn), INFO to stdout and WARNING and above to stderr. CXRDIST_LOG_LEVEL=DEBUG|WARNING|...
changes the level. Command results (what a command prints as its answer) stay plain prints.

Progress: a tqdm bar on a terminal; when stderr is not a terminal (a log file, a pipe, a batch job) one whole
line every CXRDIST_PROGRESS_EVERY seconds (default 30) and one at the end, never a carriage-return redraw."""

from __future__ import annotations

import logging
import os
import sys
import time

ROOT = "cxrdist"
PROGRESS_EVERY_ENV = "CXRDIST_PROGRESS_EVERY"  # seconds between progress lines when stderr is not a terminal
TERMINAL_ENV = "CXRDIST_TERMINAL"  # "1"/"0": set by `cxrdist train` for its trainers, whose stderr is its pipe
DEFAULT_PROGRESS_EVERY_S = 30.0


class TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            from tqdm import tqdm  # here: `cxrdist --help`/`info` start faster without it

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


class DropRecord(logging.Filter):
    """Drops the records a function of a third-party library logs that begin with `start` (a logging filter on the record:
    the message never reaches a handler)."""

    def __init__(self, function: str, start: str) -> None:
        super().__init__()
        self.function, self.start = function, start

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.funcName == self.function and str(record.msg).startswith(self.start))


# (logger, function, message start): third-party messages that tell a cxrdist user nothing.
QUIET = [
    # DeepSpeed (imported by accelerate even when it is not used) guessing its accelerator on a machine without a GPU, in
    # every process; on a CPU run that is the intended device, and a GPU run never logs it.
    ("DeepSpeed", "get_accelerator", "Setting accelerator to CPU"),
]


def quiet_third_party() -> None:
    """Installs the QUIET filters on their loggers (created here if the library has not made them yet: DeepSpeed's
    `create_logger` keeps a logger's filters). Call it before the library is imported."""
    for name, function, start in QUIET:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropRecord) and (f.function, f.start) == (function, start) for f in logger.filters):
            logger.addFilter(DropRecord(function, start))


def on_terminal() -> bool:
    forced = os.environ.get(TERMINAL_ENV)
    return forced == "1" if forced in ("0", "1") else sys.stderr.isatty()


def progress(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar on a terminal, else ProgressLines; both take update(n), set_postfix(**kw), close() and `with`."""
    if not enabled or on_terminal():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
    return ProgressLines(total, desc, unit, initial)


class ProgressLines:
    """Progress for a log file: tqdm's numbers on one line of stderr (no bar, no carriage return), at most every
    CXRDIST_PROGRESS_EVERY seconds, and once at the end unless that count was just printed."""

    FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.n, self.postfix, self.printed = initial, "", initial
        self.every = float(os.environ.get(PROGRESS_EVERY_ENV, DEFAULT_PROGRESS_EVERY_S))
        self.start = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self.emit()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def emit(self) -> None:
        self.last = time.monotonic()
        if self.n == self.printed:
            return
        self.printed = self.n
        from tqdm import tqdm

        line = tqdm.format_meter(self.n, self.total, self.last - self.start, prefix=self.desc, unit=self.unit, postfix=self.postfix or None,
                                 bar_format=self.FORMAT, initial=self.initial)
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.emit()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # the error's own line says where it stopped; a last count would make it two
            self.closed = True
