"""Where shards live: a local directory or a URL (https://, s3://, gs://, ... any fsspec scheme).

The one place that opens a shard or a manifest. Local paths are opened with `open()`. URLs go through
fsspec (s3fs for s3://, aiohttp for http(s)://), as streams read block by block, never downloaded
whole first. A read that fails with a transient error (connection dropped, timeout, 5xx) is retried
with exponential backoff on a fresh connection that resumes at the byte where the last one broke, so a
reader never sees the hiccup; one that keeps failing raises `ShardReadFailed` with a one-line reason.
Existence checks go through the same attempts. Each attempt is ONE request with one timeout: the layers
below (fsspec's size probe before a stream, botocore's and s3fs's own retries) are switched off, so a
silent server costs one round of ATTEMPTS waits, the documented bound, not a product of rounds.

A URL root is kept as a `str` (a `Path` would fold "s3://b" into "s3:/b"); a local root as a `Path`.
Credentials come from the usual environment (AWS_* variables or ~/.aws for s3, fsspec's own config);
`display()` strips user:password@ and query strings (pre-signed tokens) before a location is printed
or recorded in a card.
"""

from __future__ import annotations

import io
import math
import os
import re
import time
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

from cxrdist.errors import UserError

Location = str | Path

ATTEMPTS = 5  # reads of one block before giving up: waits of 0.5, 1, 2, 4 s in between
BACKOFF_S = 0.5
URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
TIMEOUT_VARIABLE = "CXRDIST_NET_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0  # to connect, and between two pieces of a response: a silent server is a failed attempt


NOT_TRANSIENT_TEXT = {FileNotFoundError: "not found", PermissionError: "access denied"}


class ShardReadFailed(OSError):
    """A remote read that failed ATTEMPTS times; `line` is the message (tar readers append to args)."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


def is_url(location: Location) -> bool:
    return isinstance(location, str) and bool(URL_PATTERN.match(location))


def shard_root(location: Location) -> Location:
    """A shard directory as given by the user: URL -> str without a trailing slash, else Path (several datasets,
    data/datasets.py, stay the tuple of their entries: each shard knows its own location)."""
    if isinstance(location, tuple):
        return location
    return location.rstrip("/") if is_url(location) else Path(location)


def join(root: Location, relative: str) -> Location:
    """`relative` under `root`; under a URL it joins the path, before any query string (a pre-signed token)."""
    root = shard_root(root)
    if not isinstance(root, str):
        return root / relative
    parts = urlsplit(root)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{relative}"))


def display(location: Location) -> str:
    """The location as it may be printed or recorded: no user:password@, no query string."""
    if isinstance(location, tuple):  # several datasets (data/datasets.py)
        return ", ".join(display(entry.location) for entry in location)
    if not is_url(location):
        return str(location)
    parts = urlsplit(location)
    try:
        port = parts.port
    except ValueError:  # not a number: left out, like the rest of what cannot be trusted
        port = None
    host = (parts.hostname or "") + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def redact(text: str) -> str:
    """`text` (a command line, a log line, an error message) with every URL in it in its display form."""
    return URL_IN_TEXT.sub(lambda match: display(match.group(0)), text)


def resolved(root: Location) -> str:
    """What a model card records as the shard directory: an absolute path, or the displayable URL (for several datasets,
    data/datasets.py, their entries as dicts)."""
    if isinstance(root, tuple):
        return [entry.to_dict() for entry in root]
    root = shard_root(root)
    return display(root) if isinstance(root, str) else str(root.resolve())


def exists(location: Location) -> bool:
    """Whether the file is there: False only for a "not found" answer; a server that fails (HTTP 5xx), refuses access,
    is unreachable or stays silent through every attempt is a UserError saying which."""
    if not is_url(location):
        return Path(location).is_file()
    fs = filesystem(location)
    # fsspec's HTTP check says False for any status >= 400 and any connection error unless strict.
    check = (lambda: fs.exists(location, strict=True)) if is_http(fs) else (lambda: fs.exists(location))
    try:
        return bool(with_retries(location, check))
    except FileNotFoundError:
        return False
    except (ShardReadFailed, PermissionError) as err:
        raise UserError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - network stacks raise many types; the message says which
        if refused_credentials(err):
            raise UserError(credentials_line(location, err)) from None
        raise UserError(f"{display(location)}: cannot reach ({reason(err)})") from None


def is_http(fs) -> bool:
    return getattr(fs, "protocol", None) in ("http", "https", ("http", "https"))


def refused_credentials(err: BaseException | None) -> BaseException | None:
    """The HTTP 401 or 403 behind `err` (fsspec raises one as FileNotFoundError from it), or None: final (asking again without
    other credentials cannot help), and worth saying how to give them."""
    while err is not None:
        if getattr(err, "status", None) in (401, 403) and type(err).__name__ == "ClientResponseError":
            return err
        err = err.__cause__
    return None


def credentials_line(location: str, err: BaseException) -> str:
    host, status = urlsplit(location).hostname or "HOST", refused_credentials(err).status
    return (f"{display(location)}: the server refuses the request (HTTP {status}: credentials missing or wrong); give them as "
            f"training took them: a user:password in the URL (data.shards, or --shards of evaluate/report), or, for a location "
            f"recorded without them (a model card), a netrc file: $NETRC or ~/.netrc holding 'machine {host} login USER password PASSWORD'")


def read_text(location: Location, limit: int) -> str:
    """A small file (a manifest) whole, refused when it is larger than `limit` bytes (an endless body, a wrong URL)."""
    with open_shard(location) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{display(location)}: larger than {limit // 2**20} MiB, not a file cxrdist wrote")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UserError(f"{display(location)}: not text (UTF-8); not a file cxrdist wrote") from None


def open_shard(location: Location) -> BinaryIO:
    """A binary, sequential stream of a local file or a URL (retrying, see the module doc)."""
    if not is_url(location):
        return open(location, "rb")
    return io.BufferedReader(RetryingStream(location), buffer_size=1 << 20)


# ---------------------------------------------------------------- remote streams


def filesystem(url: str):
    import fsspec

    ignore_unclosed_connection_warnings()
    try:
        return without_own_retries(fsspec.core.url_to_fs(url, **timeout_options(url))[0])
    except ImportError as err:  # e.g. "Install s3fs to access S3"
        raise UserError(f"{display(url)}: {reason(err)} (for s3://: pip install 'cxrdist[s3]')") from None
    except ValueError as err:  # an unknown protocol
        raise UserError(f"{display(url)}: {reason(err)}") from None


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{TIMEOUT_VARIABLE}={text}: expected a number of seconds > 0")
    return value


def timeout_options(url: str) -> dict:
    """fsspec options that bound the wait to connect and for the next piece of a response (never the whole
    transfer: a large shard on a slow link is fine while bytes keep coming), with no retries below ours."""
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        import aiohttp

        # trust_env: a user:password for the host from $NETRC or ~/.netrc (a model card records its URL without them)
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout_s(), sock_read=timeout_s()),
                                  "trust_env": True}}
    if scheme in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout_s(), "read_timeout": timeout_s(), "retries": {"total_max_attempts": 1}}}
    return {}


def without_own_retries(fs):
    """s3fs retries each call 5 times on top of botocore (a class attribute, not an option): once here, ours around it."""
    if getattr(fs, "retries", None) is not None:
        fs.retries = 1
    return fs



def transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, TimeoutError, EOFError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        errors.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(errors)


def transient_cause(err: BaseException) -> BaseException | None:
    """The failure worth another attempt behind `err`, or None when `err` is final (not found, access denied, an HTTP
    status other than 5xx, 408 and 429). fsspec's HTTP says FileNotFoundError also for a server it cannot reach, raised
    from the connection error: that one is retried."""
    if refused_credentials(err):
        return None
    if isinstance(err, NOT_TRANSIENT):
        cause = err.__cause__
        return transient_cause(cause) if isinstance(err, FileNotFoundError) and cause is not None else None
    status = http_status(err)
    if status is not None and status < 500 and status not in (408, 429):
        return None
    return err if isinstance(err, transient_errors()) else None


def http_status(err: BaseException) -> int | None:
    """The HTTP status of an error response (aiohttp's ClientResponseError), else None."""
    status = getattr(err, "status", None)
    return status if isinstance(status, int) and 100 <= status <= 599 else None


def final_error(url: str, err: BaseException) -> BaseException:
    """A failure no other attempt can change, said again without the URL's user:password or token."""
    if refused_credentials(err):
        return ShardReadFailed(credentials_line(url, err))
    status = http_status(err)
    if status in (401, 403):
        return PermissionError(f"{display(url)}: access denied (HTTP {status})")
    if status is not None:
        return UserError(f"{display(url)}: the server refused the request (HTTP {status} {getattr(err, 'message', '')})".rstrip())
    if isinstance(err, NOT_TRANSIENT):
        return type(err)(f"{display(url)}: {NOT_TRANSIENT_TEXT.get(type(err), 'cannot be read')}")
    return err


def with_retries(url: str, call, before_retry=lambda: None):
    """call() until it succeeds, ATTEMPTS times at most, waiting BACKOFF_S, 2x BACKOFF_S, ... between attempts (after
    before_retry() drops what the failed attempt left). A final failure is raised at once (final_error)."""
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - sorted into final and transient just below
            failure = transient_cause(err)
            if failure is None:
                final = final_error(url, err)
                if final is err:
                    raise
                raise final from None
            before_retry()
            if attempt + 1 == ATTEMPTS:
                raise ShardReadFailed(f"{display(url)}: {failed_how(failure)} after {ATTEMPTS} attempts ({reason(failure)})") from None
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def failed_how(failure: BaseException) -> str:
    if is_unreachable(failure):
        return "server unreachable"
    status = http_status(failure)
    return f"the server failed (HTTP {status})" if status is not None else "unreadable"


def is_unreachable(err: BaseException) -> bool:
    """No connection at all (refused, unknown host), as opposed to one that broke or went silent."""
    import socket

    try:
        from aiohttp import ClientConnectorError
    except ImportError:
        ClientConnectorError = ConnectionRefusedError  # noqa: N806 - the same role without aiohttp
    return isinstance(err, (ConnectionRefusedError, socket.gaierror, ClientConnectorError)) and not isinstance(err, TimeoutError)


def reason(err: BaseException) -> str:
    text = redact(str(err).strip().splitlines()[0]) if str(err).strip() else ""
    if not text and err.__cause__ is not None:  # fsspec's bare FSTimeoutError: the socket's timeout behind it says more
        return reason(err.__cause__)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class RetryingStream(io.RawIOBase):
    """Reads a URL front to back; on a transient error reopens it at the current offset and goes on."""

    def __init__(self, url: str) -> None:
        self.url, self.position, self.handle = url, 0, None
        self.call_with_retries(lambda: None)  # open now: a missing file fails here, not at the first read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.call_with_retries(lambda: self.handle.read(len(buffer)))
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def close(self) -> None:
        self.drop_handle()
        super().close()

    def call_with_retries(self, read):
        def attempt():
            if self.handle is None:
                self.handle = self.open_at(self.position)
            return read()

        return with_retries(self.url, attempt, before_retry=self.drop_handle)

    def open_at(self, offset: int):
        fs = filesystem(self.url)
        # http(s) as one streaming GET (works with servers that ignore Range); object stores read ranges of blocks.
        streaming = is_http(fs)
        handle = http_stream(fs, self.url) if streaming else fs.open(self.url, "rb")
        if offset and not streaming:
            handle.seek(offset)
        else:
            remaining = offset
            while remaining:
                skipped = len(handle.read(min(remaining, 1 << 20)))
                if not skipped:
                    raise EOFError(f"stream ended at byte {offset - remaining} of the {offset} already read")
                remaining -= skipped
        return handle

    def drop_handle(self) -> None:
        if self.handle is not None:
            try:
                release_connection(self.handle)
                self.handle.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too; it is dropped anyway
                pass
            self.handle = None


def http_stream(fs, url: str):
    """fsspec's streaming HTTP file, without the HEAD and GET that fs.open() sends first to learn a size a stream does
    not need (two more waits of the timeout on a silent server, per attempt)."""
    from fsspec.asyn import sync
    from fsspec.implementations.http import HTTPStreamFile

    return HTTPStreamFile(fs, url, mode="rb", loop=fs.loop, session=sync(fs.loop, fs.set_session), asynchronous=fs.asynchronous, **fs.kwargs)


def release_connection(handle) -> None:
    """Close an fsspec HTTP stream's response now, on its event loop (its close() only schedules that,
    and aiohttp then warns "Unclosed connection" on stderr at exit)."""
    loop, close = getattr(handle, "loop", None), getattr(handle, "_close", None)
    if loop is not None and close is not None:
        from fsspec.asyn import sync

        sync(loop, close, timeout=5)


def ignore_unclosed_connection_warnings() -> None:
    """aiohttp reports a connection dropped mid-body and garbage-collected later as "Unclosed connection" on
    stderr, sometimes at exit; after a retry that is expected noise, so fsspec's event loop drops those reports."""
    from fsspec.asyn import get_loop

    loop = get_loop()  # one per process (a new one after fork, in DataLoader workers)
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(drop_unclosed_reports)


def drop_unclosed_reports(loop, context: dict) -> None:
    if not str(context.get("message", "")).startswith("Unclosed"):
        loop.default_exception_handler(context)
