"""Relative paths in a config file resolve against the config file's folder (training/config.py), overrides on the command
line against the working directory; a config written for the old rule gets one line that says what to write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_datasets import prepare_synthetic
from trainer_utils import REPO, explain

from cxrdist.errors import UserError
from cxrdist.training.config import load_config


def write_config(path: Path, shards: str, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"experiment: x\noutput_dir: runs\ndata:\n  shards: {shards}\n{extra}")
    return path


def test_inputs_in_a_config_resolve_against_its_folder_and_overrides_against_the_working_directory(tmp_path, monkeypatch):
    config = write_config(tmp_path / "project" / "configs" / "c.yaml",
                          "\n    - {location: ../data/a, name: a}\n    - ../data/b\n    - https://host.example/c/shards\n    - /abs/d",
                          "model:\n  pretrained_path: weights/w.safetensors\n")
    monkeypatch.chdir(tmp_path)  # anywhere else
    cfg = load_config(config)
    folder = tmp_path / "project"
    assert cfg.data.shards == [{"location": str(folder / "data" / "a"), "name": "a"}, str(folder / "data" / "b"),
                               "https://host.example/c/shards", "/abs/d"]
    assert cfg.model.pretrained_path == str(folder / "configs" / "weights" / "w.safetensors")
    assert cfg.output_dir == "runs"  # an output: where the command runs, as every --out
    overridden = load_config(config, ["data.shards=mine/shards", "model.pretrained_path=w2.safetensors"])
    assert overridden.data.shards == "mine/shards" and overridden.model.pretrained_path == "w2.safetensors"  # typed here: from here
    single = load_config(write_config(tmp_path / "other" / "c.yaml", "../shards"))
    assert single.data.shards == str(tmp_path / "shards")


def test_a_config_written_for_the_working_directory_is_told_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "data" / "x").mkdir(parents=True)  # there relative to where the user runs, not relative to configs/
    config = write_config(tmp_path / "configs" / "c.yaml", "data/x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        load_config(config)
    assert "relative to the config file's folder" in str(err.value) and "'../data/x'" in str(err.value) and "\n" not in str(err.value)
    assert load_config(config, ["data.shards=data/x"]).data.shards == "data/x"  # the same path given on the command line is fine


def test_cxrdist_info_reads_the_manifest_the_config_names_from_anywhere(tmp_path):
    prepare_synthetic(tmp_path / "project" / "data", seed=1, n=40, folds=2)  # project/data/shards
    config = write_config(tmp_path / "project" / "configs" / "c.yaml", "../data/shards")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "cxrdist", "info", "--config", str(config)], capture_output=True, text=True, cwd=elsewhere,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stdout.split("\t") == ["x", "runs", "2\n"], explain(done)
