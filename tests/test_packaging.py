"""Entry points and packaging: the installed wheel carries the demo config; `-m cxrdist.train` works like the script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


@pytest.mark.slow
def test_installed_wheel_finds_its_demo_config_outside_the_checkout(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True)
    wheel = next(wheels.glob("cxrdist-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = "import cxrdist.demo.one_dataset as d; print(d.__file__); print(d.DEMO_CONFIG); print(d.DEMO_CONFIG.is_file())"
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=clean_env(PYTHONPATH=str(site)), capture_output=True, text=True,
                         check=True)
    module, config, exists = out.stdout.split()
    assert Path(module).is_relative_to(site) and Path(config).is_relative_to(site) and exists == "True", out.stdout
    info = subprocess.run([sys.executable, "-m", "cxrdist", "info", "--config", config, "--no-manifest"], cwd=elsewhere,
                          env=clean_env(PYTHONPATH=str(site)), capture_output=True, text=True)
    assert info.returncode == 0 and info.stdout.split() == ["demo", "runs", "0"], info.stdout + info.stderr


def test_info_prints_experiment_and_fold_count(synth_shards):
    from cxrdist.data.datasets import load_manifest

    config = REPO / "cxrdist" / "configs" / "demo.yaml"
    out = subprocess.run([sys.executable, "-m", "cxrdist", "info", "--config", str(config), f"data.shards={synth_shards}", "output_dir=x"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["demo", "x", str(load_manifest(synth_shards).num_folds)], out.stderr
    bad = subprocess.run([sys.executable, "-m", "cxrdist", "info", "--config", str(config), "train.nope=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "train.nope" in bad.stderr


@pytest.mark.slow
def test_accelerate_launch_module_form_runs_the_trainer(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "cxrdist.train", "--config", str(tmp_path / "nope.yaml")]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert done.returncode != 0
    assert f"cxrdist train: error: --config {tmp_path / 'nope.yaml'}: no such file" in done.stderr, done.stderr
