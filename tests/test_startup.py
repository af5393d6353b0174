"""Start-up: `cxrdist --help` and `cxrdist info` import only what they use (no torch, timm, accelerate, deepspeed,
wandb, numba), checked in a fresh interpreter; the README states the measured times."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainer_utils import DEMO_CONFIG, REPO

HEAVY = ("torch", "timm", "accelerate", "deepspeed", "wandb", "torchvision", "matplotlib", "sklearn", "webdataset", "numba")

PROBE = """
import json, sys
from cxrdist.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})), file=sys.stderr)
"""


def imported_after(args: list[str]) -> set[str]:
    run = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    return set(json.loads(run.stderr.strip().splitlines()[-1])), run


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["info", "--config", str(DEMO_CONFIG), "--no-manifest"]])
def test_light_commands_import_no_heavy_module(args):
    modules, run = imported_after(args)
    assert not modules & set(HEAVY), f"cxrdist {' '.join(args)} imported {sorted(modules & set(HEAVY))}"
    assert "cxrdist" in modules


def test_info_reading_the_manifest_imports_no_heavy_module(synth_shards):
    modules, run = imported_after(["info", "--config", str(DEMO_CONFIG), f"data.shards={synth_shards}"])
    assert run.stdout.split()[-1] == "3", run.stdout + run.stderr[-2000:]  # the fold count of the manifest
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_the_probe_sees_a_heavy_import():
    modules, _ = imported_after(["evaluate", "--runs", "/nonexistent-runs-dir"])  # evaluate needs torch: the probe must notice
    assert "torch" in modules
