"""Hostile inputs, round 3 (issue 31): each case a careless or hostile user could hit over what wave 3 added, and the
round-2 cases that still fell short, with its exit code, one error line, no traceback, and what is left on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shard_servers import S3_ENV, counting_silent_server, http_server
from test_datasets import prepare_synthetic
from trainer_utils import DEMO_CONFIG, REPO, cpu_env, fast_overrides

from cxrdist.data.location import ATTEMPTS, TIMEOUT_VARIABLE, join

SECRET = "hunter2-do-not-print"


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m cxrdist ARGS` as a user runs it; the timeout is a guard against hangs, far above the expected time."""
    return subprocess.run([sys.executable, "-m", "cxrdist", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env or os.environ.copy())


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://reader:{SECRET}@", 1)


# ---------------------------------------------------------------- secrets: the "to resume" line


@pytest.fixture(scope="module")
def two_small_datasets(tmp_path_factory) -> Path:
    """Two prepared synthetic hospitals under one folder (served over HTTP as /a and /b)."""
    base = tmp_path_factory.mktemp("two-datasets")
    for name, seed in (("a", 3), ("b", 5)):
        prepare_synthetic(base / name, seed=seed, n=80, folds=2)
    return base


def stop_after_first_steps(command: list[str], metrics: Path) -> subprocess.CompletedProcess:
    """Run `command`, Ctrl-C it once its trainer has logged steps, and return what it said."""
    env = {**cpu_env(1), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3000):
            if metrics.exists() and metrics.read_text().count("\n") >= 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "lodo"])
def test_the_resume_line_shows_no_password_of_data_shards(two_small_datasets, tmp_path, command):
    with http_server(two_small_datasets) as (url, _handler):
        secret_url = with_credentials(url)
        if command == "train":
            shards, metrics = f"{secret_url}/a/shards", tmp_path / "runs" / "demo" / "fold-0" / "metrics.jsonl"
        else:
            shards = json.dumps([{"location": f"{secret_url}/{name}/shards", "name": name} for name in ("a", "b")])
            metrics = tmp_path / "runs" / "demo-without-a" / "fold-0" / "metrics.jsonl"
        overrides = fast_overrides(shards, tmp_path / "runs", **{"train.epochs": 50, "data.workers": 0})
        extra = ["--workers", "0"] if command == "lodo" else []
        done = stop_after_first_steps([sys.executable, "-m", "cxrdist", command, "--config", str(DEMO_CONFIG), "--processes", "1",
                                       *extra, *overrides], metrics)
    assert done.returncode == 75, (done.stdout[-3000:], done.stderr[-3000:])
    [line] = [x for x in done.stderr.splitlines() if "to resume, run the same command again: " in x]
    assert f"{url}/a/shards" in line and SECRET not in line and "reader:" not in line, line
    assert SECRET not in done.stdout + done.stderr


# ---------------------------------------------------------------- remote reads: one round of attempts, the right words


@pytest.mark.parametrize("scheme", ["http", "s3"])
def test_a_silent_server_costs_one_round_of_single_requests(scheme):
    """The documented bound: ATTEMPTS attempts, each ONE request waiting CXRDIST_NET_TIMEOUT_S (not fsspec's HEAD and GET
    first, nor botocore's and s3fs's own retries under ours: 10 and 125 requests before)."""
    with counting_silent_server() as (url, accepted):
        env = {**os.environ, TIMEOUT_VARIABLE: "1"}
        if scheme == "s3":
            env.update({**S3_ENV, "AWS_ENDPOINT_URL_S3": url})
        result = cli("verify", f"{url}/shards" if scheme == "http" else "s3://bucket/shards", env=env, timeout=900)
        requests = len(accepted)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"/shards/manifest.json: unreadable after {ATTEMPTS} attempts (" in line and "Timeout" in line, line
    assert requests == ATTEMPTS, f"{requests} requests to a silent server, not one per attempt ({ATTEMPTS})"


def test_a_url_with_a_query_token_reads_every_file_with_it(synth_shards):
    """A pre-signed URL: files are joined to the path, before the query (not appended after it: 'not valid JSON')."""
    with http_server(synth_shards.parent, token="t0ken") as (url, _handler):
        result = cli("verify", f"{url}/shards?token=t0ken")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"match {url}/shards/manifest.json") and "t0ken" not in result.stdout + result.stderr


def test_join_keeps_the_query_after_the_path():
    assert join("https://h/data/shards?X-Sig=abc&e=1", "fold-0/shard-000000.tar") == "https://h/data/shards/fold-0/shard-000000.tar?X-Sig=abc&e=1"
    assert join("s3://bucket/shards/", "manifest.json") == "s3://bucket/shards/manifest.json"


@pytest.mark.parametrize("status, words", [(500, "the server failed (HTTP 500) after 5 attempts"), (403, "access denied (HTTP 403)")])
def test_a_failing_existence_check_is_not_called_missing(synth_shards, status, words):
    with http_server(synth_shards, tar_status=status) as (url, _handler):
        result = cli("verify", url, env={**os.environ, TIMEOUT_VARIABLE: "5"})
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert ".tar: " in line and words in line and "missing" not in line, line
