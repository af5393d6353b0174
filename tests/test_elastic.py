"""Elastic determinism in real processes on real tar shards (CPU, gloo): the global batches (sample keys per optimizer
step, as the trainer records them with logging.batch_keys) are the same on 1, 2 and 4 processes and with 0, 1 and 3
loader workers; a run stopped by SIGTERM on 2 processes resumes on 1 and on 4 (DDP and DeepSpeed ZeRO-2) with the
global batches of the uninterrupted run and its weights within the stated tolerance; a killed rank is restarted by
the launcher inside the same job; a user error is not restarted; a checkpoint of the old format is refused."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from trainer_utils import (DEMO_CONFIG, LAUNCH, REPO, TRAIN, cpu_env, deepspeed_env, explain, fast_overrides, free_port, launch_cpu,
                           records, run_single, wait_for_step)

pytestmark = pytest.mark.slow

# One epoch of the 382 training samples of fold 0: 11 steps of 32, in micro-batches of 8 (4, 2 and 1 accumulated per
# step on 1, 2 and 4 processes). A small learning rate and few steps: Adam turns the rounding differences of another
# reduction order into weight differences that grow with both (README: what the trainer guarantees).
SETTINGS = {"data.batch_size": 8, "train.global_batch": 32, "train.epochs": 1, "train.lr": 3e-4, "logging.batch_keys": "true"}
# Largest |difference| of an EMA parameter (BatchNorm running statistics excluded: they are rank 0's) allowed against the
# uninterrupted run on 2 processes of the same engine. Measured with these settings (4 canonical partitions; and with
# 48): 1.2e-7 (6e-8) on 1 process, 2.2e-7 (5e-7) on 4, resumed 3e-8 .. 1.2e-7 (3e-8 .. 6e-8) with DDP and 3e-8 .. 6e-8
# (6e-8 .. 1.9e-6) with ZeRO-2. A resume that lost Adam's moments, the schedule or the batches would move weights by
# about the learning rate, 3e-4.
WEIGHT_TOLERANCE = 2e-5
STEPS = 11
DS_CONFIG = REPO / "launch" / "deepspeed_zero2.yaml"


def run_dir(out: Path) -> Path:
    return out / "demo" / "fold-0"


def batch_keys(out: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir(out) / "batch_keys.jsonl").read_text().splitlines()]


def ema_parameters(out: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run_dir(out) / "checkpoints").glob("step-*"))[-1]
    weights = load_file(str(newest / "ema.safetensors"))
    return {k: v.float() for k, v in weights.items() if "running_" not in k and "num_batches_tracked" not in k}


def largest_difference(a: Path, b: Path) -> float:
    wa, wb = ema_parameters(a), ema_parameters(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def world_sizes(out: Path, after_step: int = 0) -> set[int]:
    return {r["world_size"] for r in records(run_dir(out), "train") if r["step"] > after_step}


def train(shards: Path, out: Path, processes: int, workers: int, deepspeed: bool = False, resumed_at: int = 0,
          **extra) -> subprocess.CompletedProcess:
    args = fast_overrides(shards, out, **{**SETTINGS, "data.workers": workers, **extra})
    if deepspeed:
        cmd = LAUNCH + ["--config_file", str(DS_CONFIG), "--num_processes", str(processes), "--mixed_precision", "no",
                        "--main_process_port", str(free_port()), str(TRAIN), "--config", str(DEMO_CONFIG), *args]
        result = subprocess.run(cmd, env=deepspeed_env(processes), cwd=REPO, capture_output=True, text=True, timeout=900)
    else:
        result = launch_cpu(args, processes=processes, timeout=900) if processes > 1 else run_single(args, timeout=900)
    assert result.returncode == 0, explain(result)
    assert world_sizes(out, resumed_at) == {processes}  # CXRDIST_EXPECT_WORLD_SIZE checked it inside too
    return result


def cxrdist_train(shards: Path, out: Path, processes: int, *extra_args: str, env: dict | None = None, **overrides) -> subprocess.Popen:
    args = fast_overrides(shards, out, **{**SETTINGS, "data.workers": 1, **overrides})
    cmd = [sys.executable, "-m", "cxrdist", "train", "--config", str(DEMO_CONFIG), "--processes", str(processes), *extra_args, *map(str, args)]
    return subprocess.Popen(cmd, env=env or cpu_env(processes), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def preempted(shards: Path, out: Path, processes: int, *extra_args: str, env: dict | None = None) -> int:
    """A run stopped by SIGTERM to `cxrdist train` (forwarded to the trainers) in the middle of its epoch; its step."""
    proc = cxrdist_train(shards, out, processes, *extra_args, env=env)
    wait_for_step(run_dir(out), 4, proc, timeout=600)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 75, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    state = json.loads((sorted((run_dir(out) / "checkpoints").glob("step-*"))[-1] / "trainer_state.json").read_text())
    assert 4 <= state["step"] < STEPS  # mid-epoch
    return state["step"]


def resumed_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def uninterrupted(synth_shards, tmp_path_factory) -> dict[tuple[int, int], Path]:
    """The same run on (processes, loader workers) = (1, 0), (2, 3), (4, 1): every process count and every worker count."""
    runs = {}
    for processes, workers in [(2, 3), (1, 0), (4, 1)]:
        runs[processes, workers] = tmp_path_factory.mktemp(f"p{processes}w{workers}")
        train(synth_shards, runs[processes, workers], processes, workers)
    return runs


def test_the_global_batches_are_the_same_on_1_2_4_processes_and_0_1_3_workers(uninterrupted):
    reference = batch_keys(uninterrupted[2, 3])
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert all(len(r["micro_batches"]) == 4 and all(len(keys) == 8 for keys in r["micro_batches"]) for r in reference)
    every = [k for r in reference for keys in r["micro_batches"] for k in keys]
    assert len(set(every)) > 0.9 * len(every)  # one epoch: nearly every sample once (the partitions cut passes apart)
    for run in uninterrupted.values():
        assert batch_keys(run) == reference
    # the weights agree within the tolerance; the same number of processes with another worker count is bitwise equal
    assert largest_difference(uninterrupted[1, 0], uninterrupted[2, 3]) < WEIGHT_TOLERANCE
    assert largest_difference(uninterrupted[4, 1], uninterrupted[2, 3]) < WEIGHT_TOLERANCE


def test_sigterm_on_2_processes_then_resume_on_1_and_on_4_continues_the_same_global_batches(uninterrupted, synth_shards, tmp_path):
    reference = uninterrupted[2, 3]
    stopped = preempted(synth_shards, tmp_path / "stopped", 2)
    for processes in (1, 4):
        out = resumed_copy(tmp_path / "stopped", tmp_path / f"on{processes}")
        result = train(synth_shards, out, processes, 1, resumed_at=stopped)
        assert f"resumed from {run_dir(out)}/checkpoints/step-{stopped:08d}" in result.stdout
        assert batch_keys(out) == batch_keys(reference)
        assert largest_difference(out, reference) < WEIGHT_TOLERANCE


def test_deepspeed_zero2_stopped_on_2_processes_resumes_on_1_and_on_4_through_a_universal_checkpoint(uninterrupted, synth_shards, tmp_path):
    pytest.importorskip("deepspeed")
    reference = tmp_path / "ds-reference"
    train(synth_shards, reference, 2, 1, deepspeed=True)
    assert list((run_dir(reference) / "checkpoints").glob("step-*/pytorch_model/*zero_pp_rank_1_*optim_states.pt"))  # ZeRO really ran
    assert batch_keys(reference) == batch_keys(uninterrupted[2, 3])
    stopped = preempted(synth_shards, tmp_path / "stopped", 2, "--launch-config", str(DS_CONFIG), env=deepspeed_env(2))
    for processes in (1, 4):
        out = resumed_copy(tmp_path / "stopped", tmp_path / f"on{processes}")
        result = train(synth_shards, out, processes, 1, deepspeed=True, resumed_at=stopped)
        assert f"step-{stopped:08d} was written by 2 process(es): converting its ZeRO state" in result.stdout
        assert not list((run_dir(out) / "checkpoints").glob(".universal-*"))
        assert batch_keys(out) == batch_keys(reference)
        assert largest_difference(out, reference) < WEIGHT_TOLERANCE


def trainer_of_rank(command: psutil.Process, rank: int) -> psutil.Process:
    """The trainer process of `rank` under `cxrdist train` (not one of its DataLoader workers, which inherit its RANK)."""
    ranked = [p for p in command.children(recursive=True) if "RANK" in p.environ()]
    pids = {p.pid for p in ranked}
    [found] = [p for p in ranked if p.ppid() not in pids and p.environ()["RANK"] == str(rank)]
    return found


def test_a_killed_rank_is_restarted_in_the_same_job_and_the_run_ends_0(uninterrupted, synth_shards, tmp_path):
    out = tmp_path / "restarted"
    proc = cxrdist_train(synth_shards, out, 2, "--max-restarts", "2", **{"train.checkpoint_every": 3})
    wait_for_step(run_dir(out), 5, proc, timeout=600)
    victim = trainer_of_rank(psutil.Process(proc.pid), 1)
    victim.kill()
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:  # say where it stood (the leftover check then ends the processes)
        alive = [(p.pid, p.environ().get("RANK"), p.environ().get("TORCHELASTIC_RESTART_COUNT")) for p in psutil.Process(proc.pid).children(True)]
        pytest.fail(f"no end 600 s after killing rank 1 (pid {victim.pid}); alive (pid, rank, restart): {alive}; "
                    f"last records: {(run_dir(out) / 'metrics.jsonl').read_text()[-600:]}")
    assert proc.returncode == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    assert "--max_restarts 2 --rdzv_backend c10d" in stdout and "resumed from" in stdout
    assert batch_keys(out) == batch_keys(uninterrupted[2, 3])
    steps = [r["step"] for r in records(run_dir(out), "train")]
    # every step trained, those after the last checkpoint again (none when the kill landed just after a checkpoint)
    assert steps[-1] == STEPS and sorted(set(steps)) == list(range(1, STEPS + 1))


def test_a_user_error_is_not_restarted(synth_shards, tmp_path):
    """5 canonical partitions cannot be split over 2 processes: every trainer raises that on its first start; restarts
    would only repeat it (a line per start), so the first start's trainers stop the launcher's restarts."""
    proc = cxrdist_train(synth_shards, tmp_path, 2, "--max-restarts", "3", **{"data.partitions": 5})
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    errors = [line for line in stderr.splitlines() if line.startswith("cxrdist train: error:")]
    assert len(errors) == 1 and "cannot be split evenly over 2 processes" in errors[0], stderr[-3000:]


@pytest.mark.parametrize("value", ["-1", "101"])
def test_a_restart_limit_that_is_negative_or_absurd_is_one_line(synth_shards, tmp_path, value):
    proc = cxrdist_train(synth_shards, tmp_path, 2, "--max-restarts", value)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and stderr.strip().count("\n") == 0 and "expected 0 (no restarts) to 100" in stderr, stderr
    assert not (tmp_path / "demo").exists()


def test_a_checkpoint_of_the_old_format_is_refused_with_one_line(uninterrupted, synth_shards, tmp_path):
    out = resumed_copy(uninterrupted[1, 0], tmp_path / "old")
    newest = sorted((run_dir(out) / "checkpoints").glob("step-*"))
    for checkpoint in newest:  # as an earlier cxrdist wrote them: a per-rank batch count, no format
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        state.pop("format")
        state["batches"] = state["step"] * 4
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    def files() -> dict:
        return {p: p.read_bytes() for p in run_dir(out).rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    result = run_single(fast_overrides(synth_shards, out, **{**SETTINGS, "data.workers": 0, "train.epochs": 2}))
    assert result.returncode == 2, explain(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "has format 1 (an earlier cxrdist" in lines[0] and "train.resume=never" in lines[0], result.stderr
    assert files() == before
