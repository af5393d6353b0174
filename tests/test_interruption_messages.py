"""An interrupted training says what stopped it (Ctrl-C, SIGTERM, SLURM's preemption or warning signal) and the
exact command that resumes it: the trainer its own launcher's command, `cxrdist train` its own."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

from trainer_utils import DEMO_CONFIG, REPO, TRAIN, cpu_env, fast_overrides

from cxrdist.training.cluster.preempt import RESUME_COMMAND_ENV, signal_meaning, stop_explanation


def test_each_signal_is_said_in_words():
    slurm = {"SLURM_JOB_ID": "7"}
    assert signal_meaning("SIGINT", {}) == "Ctrl-C (SIGINT)"
    assert "SLURM's preemption" in signal_meaning("SIGTERM", slurm) and "SLURM" not in signal_meaning("SIGTERM", {})
    assert "SLURM's warning signal" in signal_meaning("SIGUSR1", slurm) and "preemption warning" in signal_meaning("SIGUSR1", {})
    assert signal_meaning("", {}) == "a stop request on another rank"
    assert "requeues" in stop_explanation("SIGUSR1", slurm)
    assert stop_explanation("SIGTERM", {RESUME_COMMAND_ENV: "cxrdist train --config c.yaml"}) == "asked to stop by `cxrdist train`"


def wait_for_steps(proc, metrics, lines: int = 2) -> None:
    for _ in range(1500):
        if metrics.exists() and metrics.read_text().count("\n") >= lines:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    raise AssertionError("training wrote no metrics")


def test_the_trainer_says_its_own_command_resumes_it(synth_shards, tmp_path):
    args = [sys.executable, str(TRAIN), "--config", str(DEMO_CONFIG), *fast_overrides(synth_shards, tmp_path / "runs", **{"train.epochs": 50})]
    env = {k: v for k, v in cpu_env(1).items() if k not in ("SLURM_JOB_ID", RESUME_COMMAND_ENV)}
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(proc, tmp_path / "runs" / "demo" / "fold-0" / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    (line,) = [x for x in out.splitlines() if "preempted (SIGTERM)" in x]
    assert "stopped by a termination request (SIGTERM" in line
    resume = line.split("to resume, run the same command again: ", 1)[1]
    assert shlex.split(resume)[1:] == args[1:]  # the very command (the interpreter as this process was started)


def test_ctrl_c_to_cxrdist_train_says_ctrl_c_and_its_command(synth_shards, tmp_path):
    overrides = fast_overrides(synth_shards, tmp_path / "runs", **{"train.epochs": 50})
    env = {**cpu_env(1), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop(RESUME_COMMAND_ENV, None)
    command = [sys.executable, "-m", "cxrdist", "train", "--config", str(DEMO_CONFIG), "--processes", "1", *overrides]
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(proc, tmp_path / "runs" / "demo" / "fold-0" / "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, (out[-3000:], err[-3000:])
    assert "asked to stop by `cxrdist train`" in out and "to resume" not in out  # the trainer leaves it to the command
    (line,) = [x for x in err.splitlines() if x.startswith("cxrdist train: stopped by")]
    assert line.startswith("cxrdist train: stopped by Ctrl-C (SIGINT); the fold saved a checkpoint; to resume, run the same command again: ")
    assert shlex.split(line.split("run the same command again: ", 1)[1]) == command
