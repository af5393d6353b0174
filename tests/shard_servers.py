"""Real servers on 127.0.0.1 for the remote-shard tests: a static HTTP server (optionally one that cuts
connections part-way through a body, or stalls there), one with endless bodies, one that never answers, and an
S3-API server (moto's standalone server)."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

S3_ENV = {"AWS_ACCESS_KEY_ID": "cxrdist-test-key", "AWS_SECRET_ACCESS_KEY": "cxrdist-test-secret-do-not-print", "AWS_DEFAULT_REGION": "us-east-1"}


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; the first `cuts` GET bodies (all if cuts < 0) stop after `cut_after` bytes and the socket is shut."""

    cuts = 0
    cut_after = 0
    gets = 0
    stall = False  # a cut body stalls (the connection stays open, silent) instead of being shut
    token: str | None = None  # when set, a request without ?token=TOKEN (a pre-signed URL's query) is answered 403
    tar_status: int | None = None  # when set, every request for a .tar is answered with this status (a failing server)
    released: threading.Event
    lock = threading.Lock()

    def send_head(self):
        parts = urlsplit(self.path)
        if self.token is not None and parse_qs(parts.query).get("token") != [self.token]:
            self.send_error(403)
            return None
        if self.tar_status is not None and parts.path.endswith(".tar"):
            self.send_error(self.tar_status)
            return None
        return super().send_head()

    def copyfile(self, source, destination) -> None:
        with self.lock:
            type(self).gets += 1
            cut = self.cuts < 0 or self.gets <= self.cuts
        if not cut:
            return super().copyfile(source, destination)
        destination.write(source.read(self.cut_after))
        destination.flush()
        if self.stall:
            self.released.wait()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def http_server(directory: Path, cuts: int = 0, cut_after: int = 4096, stall: bool = False, token: str | None = None,
                tar_status: int | None = None):
    """(base URL, handler class) of a threaded HTTP server on 127.0.0.1 serving `directory`; with `stall`, the cut
    bodies hang silently after `cut_after` bytes until the server stops (see Handler for `token` and `tar_status`)."""
    released = threading.Event()
    handler = type("TestHandler", (Handler,), {"cuts": cuts, "cut_after": cut_after, "gets": 0, "stall": stall, "released": released,
                                               "token": token, "tar_status": tar_status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    with serving(server):
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}", handler
        finally:
            released.set()


@contextmanager
def serving(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class EndlessBody(http.server.BaseHTTPRequestHandler):
    """Answers every GET with 200 and a body of spaces without a length, until `limit` bytes (counted in `sent`)."""

    limit = 0
    sent = 0

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        chunk = b" " * (1 << 16)
        try:
            while type(self).sent < self.limit:
                self.wfile.write(chunk)
                type(self).sent += len(chunk)
        except OSError:  # the client hung up
            pass
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@contextmanager
def endless_server(limit: int):
    """(base URL, handler class) of a server whose every answer is an endless body (cut at `limit` bytes)."""
    handler = type("Endless", (EndlessBody,), {"limit": limit, "sent": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    with serving(server):
        yield f"http://127.0.0.1:{server.server_address[1]}", handler


@contextmanager
def silent_server():
    """The URL of a server that accepts connections and never answers (read nor write)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # the kernel completes the handshakes; nobody ever reads
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@contextmanager
def counting_silent_server():
    """(URL, the connections accepted so far) of a server that accepts every connection and never answers: how many
    attempts a client made, whatever each one waited."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:  # closed
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join()
        for connection in accepted:
            connection.close()


@contextmanager
def s3_server(monkeypatch):
    """The endpoint of a moto S3 server on 127.0.0.1; the AWS_* variables point boto/s3fs at it (also in child processes)."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()  # fsspec caches filesystems: none may keep another test's endpoint
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint}.items():
        monkeypatch.setenv(key, value)
    try:
        yield endpoint
    finally:
        S3FileSystem.clear_instance_cache()
        server.stop()


def upload_directory(directory: Path, bucket: str, prefix: str) -> None:
    """What `aws s3 sync DIR s3://bucket/prefix` does, with boto3."""
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory).as_posix()}")
