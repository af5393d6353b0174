"""Hostile inputs to train / evaluate / predict (issue 11): no code runs from a checkpoint, no silent
wrong result, one line for every user error, and what is on disk afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_utils import DEMO_CONFIG, REPO, cpu_env, explain, fast_overrides, run_single

from cxrdist.cli import main

pytestmark = pytest.mark.timeout(900)


def one_line(text: str, needle: str) -> None:
    lines = [line for line in text.strip().splitlines() if "error" in line.lower() or "Traceback" in line]
    assert "Traceback" not in text, text[-3000:]
    assert len(lines) == 1, text[-3000:]
    assert needle.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def run(synth_shards, tmp_path_factory) -> Path:
    """One short epoch (batch 32), a checkpoint every step, so the last one is written before the one evaluation at the
    very end (whatever the step count; with every 5 steps, 11 steps ended with a checkpoint after it and hid the bug).
    Every test here shares it (copying it when it changes files): each trainer start costs more than the training itself on a loaded machine."""
    out = tmp_path_factory.mktemp("hostile-run")
    result = run_single(fast_overrides(synth_shards, out, **SHORT))
    assert result.returncode == 0, explain(result)
    assert len(checkpoints(out / "demo" / "fold-0")) >= 2
    return out / "demo" / "fold-0"


SHORT = {"train.epochs": 1, "data.batch_size": 32, "train.checkpoint_every": 1, "train.eval_every": 100000, "train.keep_checkpoints": 5}


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"))


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / "demo" / "fold-0"
    shutil.copytree(run_dir, target)
    return target


def other_shards(synth_shards: Path, tmp_path: Path, change) -> Path:
    """The same shard files under a manifest that says another seed / label order (a re-prepared dataset)."""
    target = tmp_path / "other-shards"
    shutil.copytree(synth_shards, target)
    manifest = json.loads((target / "manifest.json").read_text())
    change(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


# ---------------------------------------------------------------- 7: the best score survives checkpoints and resumes


def test_the_last_checkpoint_knows_the_final_evaluation(run):
    state = json.loads((checkpoints(run)[-1] / "trainer_state.json").read_text())
    card = json.loads((run / "best" / "model.json").read_text())
    assert state["best_auc"] == pytest.approx(card["metrics"]["ema"]["macro_auc"])
    assert state["best_step"] == card["step"] == state["step"]


def test_a_truncated_newest_checkpoint_falls_back_and_a_resume_never_replaces_a_better_best_model(run, synth_shards, tmp_path):
    """The crash this models: the newest checkpoint was cut short, and an evaluation after the checkpoint resumed from
    exported a better best model than any to come. The resume must skip the broken one (saying so) and keep best/."""
    copy = copy_run(run, tmp_path)
    newest, previous = checkpoints(copy)[-1], checkpoints(copy)[-2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    card_path = copy / "best" / "model.json"
    card = json.loads(card_path.read_text())
    card["metrics"]["ema"]["macro_auc"] = 0.999
    card_path.write_text(json.dumps(card))
    assert json.loads((previous / "trainer_state.json").read_text())["best_auc"] == float("-inf")  # written before any evaluation
    result = run_single(fast_overrides(synth_shards, tmp_path / "runs", **SHORT))
    assert result.returncode == 0, explain(result)
    text = result.stdout + result.stderr
    assert f"skipping checkpoint {newest.name}" in text and f"resumed from {previous}" in text
    assert json.loads(card_path.read_text())["metrics"]["ema"]["macro_auc"] == 0.999


# ---------------------------------------------------------------- 3: no code runs from a checkpoint


class WouldRunCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(run: Path, tmp_path: Path, victim: str) -> tuple[Path, Path]:
    """A copy of the run's newest checkpoint whose `victim` file is a pickle that creates `marker` when unpickled."""
    checkpoint = tmp_path / "foreign-checkpoint"
    shutil.copytree(checkpoints(run)[-1], checkpoint)
    marker = tmp_path / "pwned"
    torch.save({"state": WouldRunCode(marker)}, checkpoint / victim)
    return checkpoint, marker


@pytest.mark.parametrize("victim", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_unread(run, tmp_path, victim):
    """What the trainer calls before restoring anything (named by train.resume=PATH, or found by resume=auto)."""
    from cxrdist.errors import UserError
    from cxrdist.training.checkpoint import find_resume

    checkpoint, marker = crafted_checkpoint(run, tmp_path, victim)
    with pytest.raises(UserError, match=victim):
        find_resume(tmp_path, str(checkpoint))
    auto = tmp_path / "runs" / "checkpoints"
    shutil.copytree(checkpoints(run)[-2], auto / checkpoints(run)[-2].name)
    shutil.copytree(checkpoint, auto / "step-99999999")
    said = []
    path, _ = find_resume(auto.parent, "auto", said.append)
    assert path.name == checkpoints(run)[-2].name and victim in said[0]
    assert not marker.exists()


def test_a_crafted_pickle_never_runs_in_the_trainer(run, synth_shards, tmp_path):
    checkpoint, marker = crafted_checkpoint(run, tmp_path, "custom_checkpoint_0.pkl")  # accelerate unpickles it fully
    result = run_single(fast_overrides(synth_shards, tmp_path / "runs", **{**SHORT, "train.resume": checkpoint}))
    assert result.returncode == 2, explain(result)
    one_line(result.stderr, "custom_checkpoint_0.pkl")
    assert not marker.exists()


# ---------------------------------------------------------------- 4, 5: never mix datasets


CHANGES = {"seed": lambda m: m.update(seed=m["seed"] + 1), "label-order": lambda m: m.update(labels=m["labels"][::-1])}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_the_dataset_identity_tells_a_re_prepared_dataset(synth_shards, tmp_path, change):
    from cxrdist.data.datasets import load_manifest

    assert load_manifest(other_shards(synth_shards, tmp_path, change)).identity() != load_manifest(synth_shards).identity()


def test_resuming_onto_other_shards_is_refused(run, synth_shards, tmp_path):
    copy = copy_run(run, tmp_path)
    before = sorted(p.name for p in (copy / "checkpoints").iterdir())
    shards = other_shards(synth_shards, tmp_path, CHANGES["label-order"])
    result = run_single(fast_overrides(shards, tmp_path / "runs", **{**SHORT, "train.epochs": 3}))
    assert result.returncode == 2, explain(result)
    one_line(result.stderr, "other shards")
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before


def test_evaluate_refuses_shards_of_another_dataset(run, synth_shards, tmp_path, capsys):
    shards = other_shards(synth_shards, tmp_path, lambda m: m.update(seed=m["seed"] + 1))
    out = tmp_path / "eval"
    assert main(["evaluate", "--runs", str(run / "best"), "--split", "test", "--shards", str(shards), "--out", str(out), "--workers", "0"]) == 2
    one_line(capsys.readouterr().err, "another dataset")
    assert not out.exists()


# ---------------------------------------------------------------- bad model files, bad --out: one line, before any work


def broken_model(run: Path, tmp_path: Path, how: str) -> Path:
    model = tmp_path / "model"
    shutil.copytree(run / "best", model)
    if how == "truncated":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "foreign":
        from safetensors.torch import save_file

        save_file({"something": torch.zeros(3)}, str(model / "model.safetensors"))
    else:
        card = json.loads((model / "model.json").read_text())
        card["model"]["backbone"] = "resnet18" if how == "other-backbone" else "no_such_net"
        (model / "model.json").write_text(json.dumps(card))
    return model


@pytest.mark.parametrize("how", ["truncated", "foreign", "other-backbone", "unknown-backbone"])
def test_a_broken_model_is_one_line_in_evaluate_and_predict(run, tmp_path, capsys, how):
    model = broken_model(run, tmp_path, how)
    assert main(["evaluate", "--runs", str(model), "--out", str(tmp_path / "eval"), "--workers", "0"]) == 2
    one_line(capsys.readouterr().err, "model")
    image = next((tmp_path.parent).glob("**/*.png"), None) or _an_image(tmp_path)
    assert main(["predict", "--runs", str(model), "--images", str(image), "--out", str(tmp_path / "p.csv"), "--workers", "0"]) == 2
    one_line(capsys.readouterr().err, "model")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("how", ["truncated", "foreign"])
def test_a_broken_model_is_one_line_in_report(run, tmp_path, capsys, how):
    """The report reads the weights only for the coupling matrix (it builds no network, so a card naming a backbone
    timm lacks is reported as is); weights that are unreadable or lack the card's A are one line, no report."""
    experiment = tmp_path / "exp"
    shutil.copytree(run, experiment / "fold-0", ignore=shutil.ignore_patterns("checkpoints"))
    shutil.rmtree(experiment / "fold-0" / "best")
    shutil.copytree(broken_model(run, tmp_path, how), experiment / "fold-0" / "best")
    code = main(["report", "--runs", str(experiment), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2, err
    one_line(err, "model")
    assert not (tmp_path / "report").exists()


def _an_image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "x.png"
    Image.new("L", (64, 64), 128).save(path)
    return path


@pytest.mark.parametrize("target", ["directory", "under-a-file"])
def test_predict_checks_out_before_inference(run, tmp_path, capsys, target):
    image = _an_image(tmp_path)
    if target == "directory":
        out = tmp_path / "existing"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "preds.csv"
    assert main(["predict", "--runs", str(run / "best"), "--images", str(image), "--out", str(out), "--workers", "0"]) == 2
    err = capsys.readouterr()
    one_line(err.err, "--out")
    assert "predict:" not in err.out  # no progress bar: refused before inference
    if target == "directory":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------- config: one line, the user's text kept


@pytest.mark.parametrize("value", ["-0.1", "nan", "inf"])
def test_a_bad_learning_rate_is_one_line(synth_shards, tmp_path, capsys, value):
    assert main(["train", "--config", str(DEMO_CONFIG), f"data.shards={synth_shards}", f"output_dir={tmp_path}", f"train.lr={value}"]) == 2
    one_line(capsys.readouterr().err, "train.lr")
    assert not any(tmp_path.iterdir())


def test_a_string_override_keeps_the_users_text():
    from cxrdist.training.config import load_config

    cfg = load_config(DEMO_CONFIG, ["experiment=on", "train.resume=no", "train.epochs=3"])
    assert cfg.experiment == "on" and cfg.train.resume == "no" and cfg.train.epochs == 3
    assert cfg.run_dir.parent.name == "on"


# ---------------------------------------------------------------- 11: signals reach the trainer, nothing is orphaned


def test_sigterm_to_cxrdist_train_checkpoints_and_leaves_no_process(synth_shards, tmp_path):
    import psutil

    overrides = fast_overrides(synth_shards, tmp_path / "runs", **{"train.epochs": 50})
    env = {**cpu_env(1), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "cxrdist", "train", "--config", str(DEMO_CONFIG), "--processes", "1", *overrides],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "runs" / "demo" / "fold-0" / "metrics.jsonl"
    for _ in range(1500):
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    assert any("train.py" in " ".join(p.cmdline()) for p in descendants)
    # The same command again while it trains: refused in one line (training/cluster/run_lock.py), the running one untouched.
    again = subprocess.run([sys.executable, "-m", "cxrdist", "train", "--config", str(DEMO_CONFIG), "--processes", "1", *overrides],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2, again.stderr[-3000:]
    one_line(again.stderr, "another run is training in this directory")
    assert any(f"pid {p.pid} on " in again.stderr for p in descendants), again.stderr  # names the trainer that holds it
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "preempted" in out
    gone, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert list((tmp_path / "runs" / "demo" / "fold-0" / "checkpoints").glob("step-*"))
    # The lock died with its process: the next run takes it (a requeued job never meets a stale lock).
    done = fast_overrides(synth_shards, tmp_path / "runs", **{"train.epochs": 1})
    after = subprocess.run([sys.executable, "-m", "cxrdist", "train", "--config", str(DEMO_CONFIG), "--processes", "1", *done],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert after.returncode == 0 and "another run" not in after.stderr, after.stderr[-3000:]
