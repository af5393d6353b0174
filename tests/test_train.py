"""The distributed trainer in real processes on real shards (2 CPU processes over gloo)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import tarfile
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cxrdist.data.datasets import load_manifest
from cxrdist.data.manifest import write_manifest
from cxrdist.model.card import ModelCard
from trainer_utils import (DEMO_CONFIG, LAUNCH, REPO, TRAIN, cpu_env, deepspeed_env, explain, fast_overrides, final_ema, free_port, label_aucs,
                           launch_cpu, launch_deepspeed, records, run_single, single_process_auc, wait_for_step)

pytestmark = pytest.mark.slow


# torch.compile on CPU for the multi-process tests: aot_eager traces forward and backward like inductor does, in seconds.
COMPILED = {"train.compile": "true", "train.compile_devices": "all", "train.compile_backend": "aot_eager"}


def csv_auc(path: Path, labels: list[str]) -> float:
    return float(np.mean(label_aucs(pd.read_csv(path), labels)))


@pytest.fixture(scope="module")
def two_process_run(synth_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    args = fast_overrides(synth_shards, out,
                          **{"data.workers": 2, "model.backbone": "resnet10t", "train.epochs": 5, "train.lr": 3e-3, "train.ema_decay": 0.9})
    # Rank 1 is slow at every checkpoint (tests/slow_rank/sitecustomize.py): it sleeps inside save_state, before it writes
    # its random states; rank 0 must wait for it before renaming the partial checkpoint into place (test_run_files).
    env = cpu_env(2, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests" / "slow_rank"), os.environ.get("PYTHONPATH")])),
                  CXRDIST_TEST_SLOW_RANK="1:2")  # the checkout under test stays first for `import cxrdist` (as in test_lost_host.py)
    result = launch_cpu(args + ["--fold", "0"], processes=2, timeout=900, env=env)
    assert result.returncode == 0, explain(result)
    return out / "demo" / "fold-0", result


def test_two_processes_learn(two_process_run):
    run_dir, _ = two_process_run
    train = records(run_dir, "train")
    assert {r["world_size"] for r in train} == {2}
    first, last = np.mean([r["loss"] for r in train[:3]]), np.mean([r["loss"] for r in train[-3:]])
    assert last < 0.8 * first, (first, last)
    evals = records(run_dir, "eval")
    assert max(e["ema"]["macro_auc"] for e in evals) > 0.65
    assert 0.0 <= evals[-1]["sparsity"] <= 1.0


def test_gathered_auc_equals_one_process_and_sklearn(two_process_run, synth_shards):
    run_dir, _ = two_process_run
    gathered = ModelCard.read(run_dir / "best").metrics["ema"]["macro_auc"]
    alone = single_process_auc(run_dir / "best", synth_shards, fold=0)
    assert abs(alone["macro_auc"] - gathered) <= 1e-9
    labels = load_manifest(synth_shards).labels
    assert abs(csv_auc(run_dir / "best" / "val_predictions.csv", labels) - gathered) <= 1e-9
    keys = pd.read_csv(run_dir / "best" / "val_predictions.csv")["key"]
    assert keys.is_unique and len(keys) == load_manifest(synth_shards).num_samples(["fold-0"])


def test_run_files(two_process_run):
    run_dir, _ = two_process_run
    assert (run_dir / "config.yaml").is_file() and (run_dir / "val_predictions.csv").is_file()
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert 1 <= len(checkpoints) <= 3 and not any(p.name.startswith(".partial") for p in checkpoints)
    assert set(load_file(str(run_dir / "best" / "model.safetensors"))) >= {"refine.weight"}
    for checkpoint in checkpoints:  # every rank's part, although rank 1 was slow at each checkpoint
        assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}


def test_sigterm_then_resume_is_bitwise_equal_to_an_uninterrupted_run(synth_shards, tmp_path):
    common = {"data.workers": 1, "model.backbone": "test_resnet", "train.epochs": 2, "model.drop_rate": 0.2}
    reference = tmp_path / "ref"
    result = run_single(fast_overrides(synth_shards, reference, **common))
    assert result.returncode == 0, explain(result)

    resumed = tmp_path / "resumed"
    args = [sys.executable, str(TRAIN), "--config", str(DEMO_CONFIG), *fast_overrides(synth_shards, resumed, **common)]
    proc = subprocess.Popen(args, env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(resumed / "demo" / "fold-0", 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, f"{out}\n{err}"
    steps_per_epoch = len([r for r in records(reference / "demo" / "fold-0", "train") if r["epoch"] <= 1.0])
    newest = sorted((resumed / "demo" / "fold-0" / "checkpoints").glob("step-*"))[-1]
    interrupted_at = json.loads(newest.joinpath("trainer_state.json").read_text())["step"]
    assert 0 < interrupted_at < steps_per_epoch  # mid-epoch
    result = run_single(fast_overrides(synth_shards, resumed, **common))
    assert result.returncode == 0, explain(result)
    assert "resumed from" in result.stdout + result.stderr
    a, b = final_ema(reference / "demo" / "fold-0"), final_ema(resumed / "demo" / "fold-0")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(synth_shards, tmp_path):
    args = fast_overrides(synth_shards, tmp_path, **{"train.checkpoint_every": 3, "train.epochs": 1})
    result = run_single(args, env=cpu_env(1, CXRDIST_KILL_IN_CHECKPOINT=6))
    assert result.returncode == -signal.SIGKILL, explain(result)
    checkpoints = tmp_path / "demo" / "fold-0" / "checkpoints"
    assert (checkpoints / "step-00000003").is_dir() and (checkpoints / ".partial-step-00000006").is_dir()
    assert not (checkpoints / "step-00000006").exists()
    result = run_single(args)
    assert result.returncode == 0, explain(result)
    assert "step-00000003" in result.stdout + result.stderr
    assert not list(checkpoints.glob(".partial-*"))


def test_bad_config_key_is_one_line(synth_shards, tmp_path):
    result = run_single(fast_overrides(synth_shards, tmp_path) + ["train.epoch=3"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.epoch" in lines[0] and "Traceback" not in result.stderr


def corrupt_one_training_sample(shards: Path, target: Path) -> None:
    """A shard whose first image does not decode, recorded as it is in the manifest (size, sha256): the shard is whole,
    one image in it is bad (readers refuse a shard that differs from its manifest entry before decoding anything)."""
    shutil.copytree(shards, target)
    manifest = load_manifest(target)
    entry = manifest.splits["fold-1"].shards[0]
    shard = target / entry.file
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for i, (member, data) in enumerate(members):
            if i == 0:
                data = b"\x89PNG garbage" * 3
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    entry.bytes, entry.sha256 = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
    write_manifest(target, manifest)


def test_corrupt_sample_is_skipped_and_counted(synth_shards, tmp_path):
    shards = tmp_path / "shards"
    corrupt_one_training_sample(synth_shards, shards)
    # 1 of the 382 samples: at the first log line (16 samples seen, log_every=1) at most 1 in 16, 6.25%
    result = run_single(fast_overrides(shards, tmp_path / "ok", **{"train.epochs": 1, "data.max_corrupt_fraction": 0.07}))
    assert result.returncode == 0, explain(result)
    assert records(tmp_path / "ok" / "demo" / "fold-0", "train")[-1]["corrupt_total"] == 1
    result = run_single(fast_overrides(shards, tmp_path / "strict", **{"train.epochs": 1, "data.max_corrupt_fraction": 0.0}))
    assert result.returncode == 2 and "failed to decode" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def launch_two_machines(args_per_machine: list[list[str]], timeout: int) -> list[tuple[int, str, str]]:
    """One `accelerate launch --num_machines 2` per machine rank (1 process each, main 127.0.0.1): (exit code, stdout, stderr) each."""
    port = free_port()
    procs = []
    for rank, args in enumerate(args_per_machine):
        cmd = LAUNCH + ["--multi_gpu", "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                        "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN), "--config",
                        str(DEMO_CONFIG), *args]
        procs.append(subprocess.Popen(cmd, env=cpu_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_multi_node_path_on_one_host(synth_shards, tmp_path):
    """Two `accelerate launch` with --num_machines 2 (ranks 0 and 1, main 127.0.0.1) train and gather; the model is
    compiled (aot_eager: dynamo + AOT autograd without code generation) inside DDP, in one graph."""
    args = [str(a) for a in fast_overrides(synth_shards, tmp_path, **{"train.epochs": 1, **COMPILED})] + ["--fold", "1"]
    for code, out, err in launch_two_machines([args, args], timeout=600):
        assert code == 0, f"{out}\n{err}"
    run_dir = tmp_path / "demo" / "fold-1"
    assert {r["world_size"] for r in records(run_dir, "train")} == {2}
    assert {r["graph_breaks"] for r in records(run_dir, "train")} == {0}
    gathered = ModelCard.read(run_dir / "best").metrics["ema"]["macro_auc"]
    assert abs(single_process_auc(run_dir / "best", synth_shards, fold=1)["macro_auc"] - gathered) <= 1e-9


def test_an_output_dir_the_machines_do_not_share_is_one_line(synth_shards, tmp_path):
    """Two machines given different output_dir (as when it is not on a shared filesystem): every rank stops at the
    start with one line naming the problem, before any checkpoint could half-exist on one of them."""
    per_machine = [[str(a) for a in fast_overrides(synth_shards, tmp_path / f"machine{rank}", **{"train.epochs": 1})] + ["--fold", "0"]
                   for rank in (0, 1)]
    for code, _out, err in launch_two_machines(per_machine, timeout=300):
        assert code != 0
        lines = [line for line in err.splitlines() if line.startswith("cxrdist train: error:")]
        assert len(lines) == 1 and "is not one directory for every process" in lines[0], err[-3000:]
        assert 'File "' + str(REPO / "cxrdist") not in err, err[-3000:]  # no traceback through our code (the launcher's own page stays)
    assert not list((tmp_path / "machine0").rglob("checkpoints")) and not list((tmp_path / "machine1").rglob("checkpoints"))


def test_a_run_directory_in_use_stops_every_rank_with_one_line(synth_shards, tmp_path):
    """This test process holds the run directory's lock (as a running trainer would): both ranks of a new run stop
    at once, exit 2, one line; nothing is written into the directory."""
    from cxrdist.training.cluster.run_lock import lock_run_dir, release_run_lock

    run_dir = tmp_path / "demo" / "fold-0"
    held = lock_run_dir(run_dir)
    try:
        result = launch_cpu(fast_overrides(synth_shards, tmp_path, **{"train.epochs": 1}) + ["--fold", "0"], timeout=300)
    finally:
        release_run_lock(held)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("cxrdist train: error:")]
    assert len(lines) == 1 and "another run is training in this directory" in lines[0], explain(result)
    assert f"pid {os.getpid()} on " in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


def test_deepspeed_zero2_trains_evaluates_and_resumes_on_two_cpu_processes(synth_shards, tmp_path):
    """Through launch/deepspeed_zero2.yaml + its JSON with "auto" fields (first start JIT-builds an op); a second start
    with one more epoch resumes from DeepSpeed's checkpoint, which must pass the safe (weights-only) checkpoint check.
    The model is compiled (aot_eager) inside DeepSpeed's engine, so its checkpoint holds the compiled module's names, and
    trained in bf16 as on a GPU (DeepSpeed casts the weights; the inputs follow, the EMA stays fp32)."""
    pytest.importorskip("deepspeed")

    def launch(epochs: int) -> subprocess.CompletedProcess:
        # demo.yaml says "no"; "auto" takes the launcher's bf16
        overrides = fast_overrides(synth_shards, tmp_path, **{"train.epochs": epochs, "train.mixed_precision": "auto", **COMPILED})
        return launch_deepspeed(overrides, precision="bf16")

    result = launch(1)
    assert result.returncode == 0, explain(result)
    run_dir = tmp_path / "demo" / "fold-0"
    assert {r["world_size"] for r in records(run_dir, "train")} == {2}
    assert {r["precision"] for r in records(run_dir, "train")} == {"bf16"}
    assert ModelCard.read(run_dir / "best").model.refine.sparsity == "proximal"  # the mode it trained with: DeepSpeed keeps it
    assert all(np.isfinite(r["loss"]) for r in records(run_dir, "train"))
    assert load_file(str(run_dir / "best" / "model.safetensors"))["refine.weight"].dtype == torch.float32
    evals = records(run_dir, "eval")
    assert evals and 0.0 < evals[-1]["ema"]["macro_auc"] < 1.0
    assert (run_dir / "best" / "model.safetensors").is_file()
    first_steps = records(run_dir, "train")[-1]["step"]

    resumed = launch(2)
    assert resumed.returncode == 0, explain(resumed)
    assert "resumed from" in resumed.stdout + resumed.stderr, explain(resumed)
    steps = [r["step"] for r in records(run_dir, "train")]
    assert steps[-1] == 2 * first_steps and sorted(set(steps)) == steps  # continued, not restarted


def test_deepspeed_zero3_is_refused_with_one_line(synth_shards, tmp_path):
    pytest.importorskip("deepspeed")
    cmd = LAUNCH + ["--use_deepspeed", "--zero_stage", "3", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                    "--main_process_port", str(free_port()), str(TRAIN), "--config", str(DEMO_CONFIG), *fast_overrides(synth_shards, tmp_path)]
    result = subprocess.run(cmd, env=deepspeed_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("cxrdist train: error:")]
    assert len(errors) == 1 and "ZeRO-3" in errors[0], explain(result)
