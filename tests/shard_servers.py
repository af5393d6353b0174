"""Real servers on 127.0.0.1 for the remote-shard tests: a static HTTP server (optionally one that cuts
connections part-way through a body) and an S3-API server (moto's standalone server)."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

S3_ENV = {"AWS_ACCESS_KEY_ID": "cxrdist-test-key", "AWS_SECRET_ACCESS_KEY": "cxrdist-test-secret-do-not-print", "AWS_DEFAULT_REGION": "us-east-1"}


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; the first `cuts` GET bodies (all if cuts < 0) stop after `cut_after` bytes and the socket is shut."""

    cuts = 0
    cut_after = 0
    gets = 0
    lock = threading.Lock()

    def copyfile(self, source, destination) -> None:
        with self.lock:
            type(self).gets += 1
            cut = self.cuts < 0 or self.gets <= self.cuts
        if not cut:
            return super().copyfile(source, destination)
        destination.write(source.read(self.cut_after))
        destination.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def http_server(directory: Path, cuts: int = 0, cut_after: int = 4096):
    """(base URL, handler class) of a threaded HTTP server on 127.0.0.1 serving `directory`."""
    handler = type("TestHandler", (Handler,), {"cuts": cuts, "cut_after": cut_after, "gets": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


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
