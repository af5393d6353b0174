"""Checks of output paths made before long work starts, so a bad --out fails in one line, not after inference."""

from __future__ import annotations

import os
from pathlib import Path

from cxrdist.errors import UserError


def nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: Path, flag: str = "--out") -> None:
    """`path` is, or can be created as, a directory this process may write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory")
    base = nearest_existing(path)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write there ({base} is not a writable directory)")


def check_writable_file(path: Path, flag: str = "--out") -> None:
    """`path` names a file (not a directory) this process may create or replace."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name such as {path / 'preds.csv'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: the file is not writable")
    check_writable_dir(path.parent, flag)
