"""A resume under other settings stops with one line; another number of processes or loader workers is not another
setting (the sample order does not depend on them)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from cxrdist.errors import UserError
from cxrdist.training.config import load_config, to_dict
from cxrdist.training.resume_settings import changed, check_resume, current_settings, incomparable_score, model_settings
from cxrdist.training.topology import Topology
from trainer_utils import DEMO_CONFIG, TRAIN, cpu_env, explain, fast_overrides, records, run_single


def settings(*overrides: str, workers: int = 2, world: int = 2, shards=("a.tar", "b.tar"), global_batch: int = 32,
             partitions: int = 48) -> dict:
    cfg = load_config(DEMO_CONFIG, ["data.shards=/x", *overrides])
    return current_settings(to_dict(cfg), workers, Topology(world, cfg.data.batch_size, global_batch, partitions), list(shards))


def test_the_settings_issue_19_names_are_recorded_and_a_change_is_one_line_with_old_and_new_values():
    old = settings()
    assert {"data.batch_size", "data.label_policy", "train.lr", "eval.targets", "train.grad_accum", "data.workers", "world_size",
            "train_shards", "model.drop_rate", "loss.name", "train.global_batch", "data.partitions"} <= set(old)
    assert "train.epochs" not in old and "model.pretrained_path" not in old and "data.shards" not in old
    assert check_resume("ck", old, settings("train.epochs=7", "model.pretrained_path=/w.pth"), False, print) == []
    new = settings("data.batch_size=8", "train.lr=0.001", "data.label_policy=zeros")
    with pytest.raises(UserError) as err:
        check_resume("ck", old, new, False, print)
    text = str(err.value)
    assert "\n" not in text and "train.resume_changes=allow" in text
    assert f"data.batch_size={old['data.batch_size']!r}, now 8" in text and "train.lr=" in text and "now 0.001" in text
    assert f"data.label_policy={old['data.label_policy']!r}, now 'zeros'" in text
    said = []
    assert sorted(check_resume("ck", old, new, True, said.append)) == ["data.batch_size", "data.label_policy", "train.lr"]
    assert len(said) == 1 and "data.batch_size" in said[0]


@pytest.mark.parametrize("change", [{"shards": ("a.tar", "c.tar")}, {"overrides": ["train.grad_accum=2"]}, {"global_batch": 64},
                                    {"partitions": 24}, {"overrides": ["data.shuffle_buffer=7"]}, {"overrides": ["eval.targets=zeros"]}])
def test_what_the_sample_order_and_the_best_score_depend_on_is_checked(change):
    with pytest.raises(UserError, match="other settings"):
        check_resume("ck", settings(), settings(*change.pop("overrides", []), **change), False, print)


def test_a_checkpoint_from_before_the_pillow_resize_is_a_changed_setting():
    """Its best score was computed on torchvision-resized images: eval.resampler, not recorded then, counts as the legacy one."""
    old = {k: v for k, v in settings().items() if k != "eval.resampler"}
    assert settings()["eval.resampler"] == "pillow"
    with pytest.raises(UserError, match="eval.resampler='torchvision', now 'pillow'"):
        check_resume("ck", old, settings(), False, print)
    assert check_resume("ck", old, settings(), True, print) == ["eval.resampler"]
    assert incomparable_score(old, settings("train.lr=1")) == ["eval.resampler"]  # the stored best is dropped, with eval.targets'
    assert incomparable_score(settings(), settings("eval.targets=zeros", "train.lr=1")) == ["eval.targets"]
    assert incomparable_score({}, settings()) == []


def test_a_checkpoint_from_before_the_training_draft_decode_is_a_changed_setting():
    """Its best score was computed on stored JPEGs decoded at the input size: eval.decode, not recorded then, counts as that."""
    old = {k: v for k, v in settings().items() if k != "eval.decode"}
    with pytest.raises(UserError, match="eval.decode='img_size', now 'train_draft_side'"):
        check_resume("ck", old, settings(), False, print)
    assert incomparable_score(old, settings("train.lr=1")) == ["eval.decode"]  # the stored best is dropped
    assert incomparable_score({k: v for k, v in old.items() if k != "eval.resampler"}, settings()) == ["eval.resampler", "eval.decode"]


def test_another_number_of_processes_or_workers_is_not_a_changed_setting():
    assert check_resume("ck", settings(), settings(workers=5, world=4), False, print) == []
    assert settings(workers=5, world=4)["world_size"] == 4  # recorded all the same


def test_a_checkpoint_without_recorded_settings_resumes():
    assert check_resume("ck", {}, settings("train.lr=1"), False, print) == []


def final_ema(run_dir):
    from safetensors.torch import load_file

    return load_file(str(sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "ema.safetensors"))


@pytest.mark.slow
def test_a_changed_resume_is_refused_and_other_worker_counts_resume_bitwise(synth_shards, tmp_path):
    common = {"data.workers": 2, "model.backbone": "test_resnet", "train.epochs": 1, "model.drop_rate": 0.2, "data.batch_size": 8}
    reference = tmp_path / "ref"
    result = run_single(fast_overrides(synth_shards, reference, **common))
    assert result.returncode == 0, explain(result)

    resumed = tmp_path / "resumed"
    run_dir = resumed / "demo" / "fold-0"
    proc = subprocess.Popen([sys.executable, str(TRAIN), "--config", str(DEMO_CONFIG), *fast_overrides(synth_shards, resumed, **common)],
                            env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from test_train import wait_for_step

    wait_for_step(run_dir, 6, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, f"{out}\n{err}"
    config_before = (run_dir / "config.yaml").read_text()
    for change, named in (({"data.batch_size": 16, "train.lr": 0.01}, ["data.batch_size=8, now 16", "train.lr=", "now 0.01"]),
                          ({"data.shuffle_buffer": 7}, ["data.shuffle_buffer=100, now 7"]),
                          ({"eval.targets": "zeros"}, ["eval.targets='ignore_uncertain', now 'zeros'"])):
        result = run_single(fast_overrides(synth_shards, resumed, **{**common, **change}))
        assert result.returncode == 2, explain(result)
        line = result.stderr.strip().splitlines()
        assert len(line) == 1 and all(n in line[0] for n in named) and "train.resume_changes=allow" in line[0], result.stderr
        assert (run_dir / "config.yaml").read_text() == config_before

    # a checkpoint written before the evaluation resize moved to Pillow records no eval.resampler: refused, or with allow,
    # resumed without its best score (scored on torchvision-resized images)
    legacy = tmp_path / "legacy"
    shutil.copytree(resumed, legacy)
    for state_file in (legacy / "demo" / "fold-0" / "checkpoints").glob("step-*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        assert state["settings"].pop("eval.resampler") == "pillow"
        state_file.write_text(json.dumps(state))
    result = run_single(fast_overrides(synth_shards, legacy, **common))
    assert result.returncode == 2 and "eval.resampler='torchvision', now 'pillow'" in result.stderr, explain(result)
    result = run_single(fast_overrides(synth_shards, legacy, **{**common, "train.resume_changes": "allow"}))
    assert result.returncode == 0, explain(result)
    assert "eval.resampler changed: the stored best is not compared" in result.stdout + result.stderr

    # Another worker count (the main process alone here) is not another run: it resumes and ends bitwise equal to the
    # uninterrupted one, which read with 2 workers (before the canonical order, this was refused)
    result = run_single(fast_overrides(synth_shards, resumed, **{**common, "data.workers": 0}))
    assert result.returncode == 0, explain(result)
    assert "resumed from" in result.stdout + result.stderr
    a, b = final_ema(reference / "demo" / "fold-0"), final_ema(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads(sorted((run_dir / "checkpoints").glob("step-*"))[-1].joinpath("trainer_state.json").read_text())
    assert state["settings"]["data.workers"] == 0 and records(run_dir, "train")


def test_the_model_settings_lodo_compares_leave_out_the_stream_and_the_auto_topology():
    """lodo reuses a finished fold when the model it made is this run's: no workers, processes or shards, and the global
    batch and partitions only as configured (0 is resolved at a run's start, so any recorded value stands for it)."""
    cfg = load_config(DEMO_CONFIG, ["data.shards=/x"])
    model = model_settings(to_dict(cfg))
    assert {"data.workers", "world_size", "train_shards", "train.global_batch", "data.partitions"}.isdisjoint(model)
    assert model["eval.resampler"] == "pillow" and model["train.lr"] == cfg.train.lr
    assert changed(settings(global_batch=64, partitions=12), model) == {}
    pinned = model_settings(to_dict(load_config(DEMO_CONFIG, ["data.shards=/x", "train.global_batch=32"])))
    assert changed(settings(global_batch=64), pinned) == {"train.global_batch": (64, 32)}
    assert {k: v for k, v in settings().items() if k in model} == model  # what a run records, less its stream
