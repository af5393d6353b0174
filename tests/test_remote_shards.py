"""Shards read from URLs through real servers on 127.0.0.1: HTTP (also one that drops connections) and S3 (moto)."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import islice

import pytest
import torch

from cxrdist.data.location import join
from cxrdist.data.datasets import load_manifest
from cxrdist.data.shards import read_shard
from cxrdist.data.spec import ImageSpec
from cxrdist.data.stream import StreamConfig, eval_loader, train_loader
from cxrdist.model.card import ModelCard
from shard_servers import S3_ENV, http_server, s3_server, upload_directory
from trainer_utils import REPO, explain, fast_overrides, launch_cpu, records

STREAM = StreamConfig(image=ImageSpec(32), batch_size=8, workers=1, shuffle_buffer=20, seed=1)


def batches(loader, n: int | None = None) -> list[dict]:
    return list(islice(iter(loader), n))


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"])


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cxrdist", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, cwd=REPO, env=env or os.environ.copy())


def test_http_streams_equal_local_ones_also_resumed(synth_shards):
    local = load_manifest(synth_shards)
    with http_server(synth_shards) as (url, _handler):
        remote = load_manifest(url)
        assert remote.identity() == local.identity()
        for rank in (0, 1):  # exact eval: the same samples per rank, in the same order
            want = batches(eval_loader(synth_shards, local, ["fold-0"], STREAM, rank, 2))
            assert_same_batches(batches(eval_loader(url, remote, ["fold-0"], STREAM, rank, 2)), want)
        splits = ["fold-1", "fold-2"]
        reference = batches(train_loader(synth_shards, local, splits, STREAM, 1, 2), 12)
        assert_same_batches(batches(train_loader(url, remote, splits, STREAM, 1, 2), 12), reference)
        assert_same_batches(batches(train_loader(url, remote, splits, STREAM, 1, 2, start_batch=7), 5), reference[7:])


def test_dropped_connections_are_retried_and_resume_where_they_broke(synth_shards):
    shard = load_manifest(synth_shards).split("fold-0").shards[0]
    want = list(read_shard(synth_shards / shard.file, shard))
    with http_server(synth_shards, cuts=2, cut_after=50_000) as (url, handler):
        got = list(read_shard(join(url, shard.file), shard))
        assert handler.gets == 3  # two bodies cut part-way, the third request finished the shard
    assert got == want


def test_connection_that_keeps_dropping_is_one_line(synth_shards, tmp_path):
    manifest_bytes = (synth_shards / "manifest.json").stat().st_size
    with http_server(synth_shards, cuts=-1, cut_after=manifest_bytes + 1) as (url, _handler):
        result = cli("verify", url)
    assert result.returncode == 2, explain(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreadable after 5 attempts" in lines[0] and "/fold-0/shard-000000.tar" in lines[0], result.stderr


def unnamed_datasets(value):
    """An eval record with its per-dataset figures listed without their names: one dataset's default name is the last
    part of its location (here the server's host:port against the directory's name)."""
    if isinstance(value, dict) and "per_dataset" in value:
        return {**value, "per_dataset": sorted(value["per_dataset"].values(), key=repr)}
    return value


@pytest.mark.slow
def test_training_from_http_in_two_processes_equals_training_from_local_copy(synth_shards, tmp_path):
    """Also: a user:password in the URL (sent as HTTP basic auth) is written nowhere and printed nowhere."""
    with http_server(synth_shards) as (url, _handler):
        remote = launch_cpu(fast_overrides(url.replace("http://", "http://alice:s3cret-pw@"), tmp_path / "http", **{"train.epochs": 1}))
    local = launch_cpu(fast_overrides(synth_shards, tmp_path / "local", **{"train.epochs": 1}))
    assert remote.returncode == 0, explain(remote)
    assert local.returncode == 0, explain(local)
    runs = [tmp_path / where / "demo" / "fold-0" for where in ("http", "local")]
    for kind, fields in (("train", ("loss", "grad_norm")), ("eval", ("ema", "live"))):
        got, want = ([{f: unnamed_datasets(r[f]) for f in fields} for r in records(run, kind)] for run in runs)
        assert got and got == want, kind
    assert ModelCard.read(runs[0] / "best").shards == url
    assert "s3cret-pw" not in remote.stdout + remote.stderr
    written = [path for path in (tmp_path / "http").rglob("*") if path.is_file() and b"s3cret-pw" in path.read_bytes()]
    assert not written, written
    assert f"shards: {url}" in (runs[0] / "config.yaml").read_text()


def test_s3_bucket_verify_stream_and_one_line_errors(synth_shards, monkeypatch):
    with s3_server(monkeypatch) as endpoint:
        upload_directory(synth_shards, "cxr", "chexpert/shards")
        bucket = "s3://cxr/chexpert/shards"
        ok = cli("verify", bucket)
        assert ok.returncode == 0 and ok.stdout.startswith("ok: "), explain(ok)
        assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in ok.stdout + ok.stderr

        local, remote = load_manifest(synth_shards), load_manifest(bucket)
        want = batches(eval_loader(synth_shards, local, ["test"], STREAM, 0, 1))
        assert_same_batches(batches(eval_loader(bucket, remote, ["test"], STREAM, 0, 1)), want)

        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        shard = remote.split("fold-1").shards[0].file
        body = bytearray((synth_shards / shard).read_bytes())
        body[len(body) // 2] ^= 0xFF  # one flipped bit pattern inside an image
        client.put_object(Bucket="cxr", Key=f"chexpert/shards/{shard}", Body=bytes(body))
        changed = cli("verify", bucket)
        assert changed.returncode == 2 and changed.stderr.count("\n") == 1, explain(changed)
        assert "sha256" in changed.stderr and shard in changed.stderr, explain(changed)

        missing = cli("verify", "s3://cxr/elsewhere")
        assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "manifest.json: not found" in missing.stderr, explain(missing)
