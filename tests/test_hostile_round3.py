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
from shard_servers import http_server
from test_datasets import prepare_synthetic
from trainer_utils import DEMO_CONFIG, REPO, cpu_env, fast_overrides

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
