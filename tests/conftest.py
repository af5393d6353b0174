"""Shared fixtures: small synthetic datasets prepared into real shards, made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores shared by the test process and the processes it starts: one thread each avoids
# oversubscription that makes tiny-model steps 10-20x slower.
torch.set_num_threads(1)

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


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
