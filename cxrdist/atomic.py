"""Atomic file writes: write a temporary file in the same directory, then rename it over the target,
so a reader (or a crash) never sees half a file. Every file cxrdist writes goes through here."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cxrdist.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)

@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to `path` for a writer that wants a file name (np.savez, DataFrame.to_csv);
    renamed onto `path` when the block ends without an error, removed otherwise. Keep `suffix` equal to
    the real extension when the writer appends one (np.savez adds .npz). Through a symlink, the file it points at is
    the one replaced (the link stays); a device or a pipe is never replaced by a file."""
    path = Path(path).resolve()
    refuse_special_file(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the target gets the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None:  # a failed write() names no file: name the one the user knows
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def written_together(*paths: Path) -> Iterator[list[Path]]:
    """Temporary paths for files that belong together (predictions and the metrics computed from them): all replace
    their targets when the block succeeds, none when a write fails (a full disk must not leave new predictions next to
    the previous metrics)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path, suffix=Path(path).suffix)) for path in paths]


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs) -> Iterator:
    """An open handle on a temporary file that replaces `path` (synced) when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def json_ready(value):
    """Strict JSON: NaN/inf -> null, tuples -> lists, numpy scalars and arrays -> Python."""
    import numpy as np  # here: commands that write no numbers (`cxrdist info`) start without numpy

    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def json_line(record: dict) -> str:
    """One strict-JSON line (NaN as null)."""
    return json.dumps(json_ready(record), allow_nan=False)


def atomic_write_json(path: Path, data, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(json_ready(data), indent=indent, allow_nan=False) + "\n")


def staging_directory(directory: Path) -> Path:
    """A hidden sibling of `directory` to build it in, named after this host and process, so that a
    later run can tell a leftover of a killed one (remove_stale_staging) from one still at work."""
    directory = Path(directory)
    return directory.with_name(f".{directory.name}.partial-{_host()}-{os.getpid()}")


def remove_stale_staging(directory: Path) -> list[Path]:
    """Delete the staging directories of `directory` left by runs on this host whose process is gone
    (killed with -9, the machine's OOM killer): they hold half a dataset. Those of live processes,
    and of other hosts sharing the file system, are left alone. Returns what was removed."""
    directory = Path(directory)
    prefix = f".{directory.name}.partial-{_host()}-"
    import psutil

    removed = []
    for path in directory.parent.glob(f"{glob_escape(prefix)}*"):
        pid = path.name[len(prefix):]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _host() -> str:
    return os.uname().nodename.replace("/", "_").replace("-", "_")


# ---------------------------------------------------------------- a write that failed: nothing of it left behind

FILESYSTEM_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                     errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG}
FULL_BELOW = 1 << 20  # bytes free: a file system this full failed the write for want of space


def filesystem_error(err: OSError) -> str | None:
    """The one line for a file system refusal (read-only, full, no permission, a file where a folder should be),
    naming the path; None for other errors (a bug shows its traceback)."""
    if err.errno not in FILESYSTEM_ERRNOS:
        return None
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err} (check that path: its permissions, free space, or a file standing where a folder should)"


def disk_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(nearest_existing(directory)).free < FULL_BELOW
    except OSError:
        return False


@contextlib.contextmanager
def removed_on_failure(partial: Path) -> Iterator[None]:
    """A block that writes into `partial` (a file or a directory being built): on any failure it is deleted (a half
    checkpoint on a full disk would go on holding the space), and the failure of a tensor writer on a full disk
    (torch and safetensors raise their own types) becomes the OSError (ENOSPC) it is, naming where."""
    partial = Path(partial)
    try:
        yield
    except Exception as err:
        full = not isinstance(err, OSError) and disk_full(partial.parent)  # measured before the space is given back
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial.parent)) from err
        raise


def replace_directory(partial: Path, directory: Path) -> Path:
    """Swap a completely written `partial` directory into place of `directory` (which may exist)."""
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    partial.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


# ---------------------------------------------------------------- output paths, checked before long work starts
# (a bad --out fails in one line, not after inference)


def nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: Path, flag: str = "--out", shown: Path | None = None) -> None:
    """`path` is, or can be created as, a directory this process may write into: its nearest existing folder takes a new
    file (tried: permission bits do not tell /proc or a read-only mount). Messages name `shown` (what the user gave,
    when `path` is its folder), else `path`."""
    name = shown if shown is not None else path
    with said_as_user_error(flag, name):
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag} {name}: exists and is not a directory")
        base = nearest_existing(path)
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {name}: cannot write there ({base} is not a writable directory)")
        try:
            with tempfile.TemporaryFile(dir=base):
                pass
        except OSError as err:
            raise UserError(f"{flag} {name}: cannot write there ({base}: {err.strerror})") from None


def check_writable_file(path: Path, flag: str = "--out", example: str = "preds.csv") -> None:
    """`path` names a regular file (not a directory, a device or a pipe) this process may create or replace."""
    with said_as_user_error(flag, path):
        path = Path(path)
        if path.is_dir():
            raise UserError(f"{flag} {path}: is a directory; give a file name such as {path / example}")
        refuse_special_file(path, flag)
        if path.exists() and not os.access(path, os.W_OK):
            raise UserError(f"{flag} {path}: the file is not writable")
        check_writable_dir(path.resolve().parent, flag, shown=path)


@contextlib.contextmanager
def said_as_user_error(flag: str, path) -> Iterator[None]:
    """A path the checks cannot even look at (a name longer than the file system takes, a loop of symlinks)."""
    try:
        yield
    except OSError as err:
        raise UserError(f"{flag} {path}: {err.strerror or err}") from None


def refuse_special_file(path: Path, flag: str = "") -> None:
    """An atomic write renames a new file over its target: over /dev/null or a pipe that would replace the device."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # not there (yet): a new file
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise UserError(f"{flag + ' ' if flag else ''}{path}: not a regular file (a device, a pipe or a socket); give the path of a file to write")


def check_not_an_input(path: Path, inputs, flag: str = "--out") -> None:
    """No command writes over what it reads: `path` may not be one of the files in `inputs` (also when reached
    through another name: a hard or symbolic link) nor lie inside one of its directories (a finished model's best/)."""
    path = Path(path)
    for source in map(Path, inputs):
        if source.is_dir() and (source.resolve() == path.resolve() or source.resolve() in path.resolve().parents):
            raise UserError(f"{flag} {path}: inside {source}, which this command reads; write somewhere else")
        if same_file(path, source):
            raise UserError(f"{flag} {path}: is the input {source}; write to a new file")


def same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()
