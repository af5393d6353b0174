"""Shared fixtures: small synthetic datasets prepared into real shards, made once per session."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

# Two cores shared by the test process and the processes it starts: one thread each avoids
# oversubscription that makes tiny-model steps 10-20x slower.
torch.set_num_threads(1)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# DeepSpeed's JIT-built ops (and their build lock) in this venv, not in ~/.cache shared with other checkouts.
os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")

REPO = Path(__file__).resolve().parents[1]

# Orphans of the processes a test starts (a launcher's trainers whose parent was killed) become children of
# this process instead of init's, so the check below sees them.
PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
LEFTOVER_GRACE_S = 30  # processes a test ended may take a moment to exit (a slurmstepd, a loaded machine)


def live_descendants() -> dict[int, psutil.Process]:
    """Running processes below this one, less the ones forked from it without a new program (DataLoader workers and
    pools of an iterator the test process still holds: they go with their Python objects, and killing one would
    make torch fail the whole session)."""
    me = psutil.Process()
    alive = {}
    for p in me.children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and not (p.ppid() == me.pid and p.cmdline() == me.cmdline()):
                alive[p.pid] = p
        except psutil.Error:
            pass
    return alive


@pytest.fixture(autouse=True)
def no_process_left_behind(request):
    """A test that leaves a process running fails, and the process (with its process group) is killed."""
    before = set(live_descendants())
    yield
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := {pid: p for pid, p in live_descendants().items() if pid not in before}) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not left:
        return
    described = []
    for p in left.values():
        try:
            described.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
            group = os.getpgid(p.pid)
            if group != os.getpgid(0):  # its own group (a launcher, a daemon): end all of it
                os.killpg(group, signal.SIGKILL)
            else:
                p.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
    pytest.fail(f"{request.node.nodeid} left {len(left)} process(es) running (now killed): " + "; ".join(described), pytrace=False)


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """720 synthetic radiographs stored at 64 px: 3 patient-grouped folds of 3 shards each (uneven over 2 ranks x 2 workers) + a test split."""
    from trainer_utils import synthetic_shards

    return synthetic_shards(tmp_path_factory.mktemp("synth"), n=720, folds=3, samples_per_shard=70)


# ==== evaluation, predict and report (tests/test_evaluate.py, test_predict.py, test_report.py) ====


@pytest.fixture(scope="session")
def trained_experiment(synth_shards, tmp_path_factory) -> Path:
    """runs/ens with folds 0 and 1 really trained (1 epoch, test_resnet, 64 px), both at once."""
    import subprocess
    import sys

    from trainer_utils import DEMO_CONFIG, TRAIN, cpu_env, fast_overrides

    out = tmp_path_factory.mktemp("ens-runs")
    overrides = fast_overrides(synth_shards, out, **{"train.epochs": 1, "experiment": "ens"})
    procs = [
        subprocess.Popen([sys.executable, str(TRAIN), "--config", str(DEMO_CONFIG), "--fold", str(k), *overrides],
                         env=cpu_env(1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for k in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for k, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"training fold {k} failed:\n{log[-4000:]}"
    return out / "ens"


@pytest.fixture(scope="session")
def evaluated_experiment(trained_experiment) -> tuple[Path, dict]:
    """`cxrdist evaluate` (both folds, flip TTA) on the test split, written to runs/ens/ensemble."""
    from cxrdist.evaluation.prediction.ensemble import run_evaluate

    metrics = run_evaluate(trained_experiment, split="test", tta=True, batch_size=32, workers=1, resamples=200)
    return trained_experiment, metrics


# ==== end of evaluation section ====
