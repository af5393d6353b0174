"""`cxrdist train` learns the trainers' outcome from files it owns (training/launcher/outcome.py), and shows their stderr
apart from the launcher's (training/launcher/trainer_stderr.py): on the accelerate this venv has and on the oldest release
pyproject.toml allows (the Makefile installs it into .venv/accelerate-oldest)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest

from cxrdist.training.launcher import outcome
from cxrdist.training.launcher.outcome import Outcome
from trainer_utils import DEMO_CONFIG, REPO, TRAIN, cpu_env, fast_overrides

OLDEST = Path(sys.prefix) / "accelerate-oldest"


def accelerate_floor() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"accelerate\b", d))
    return re.search(r">=\s*([\w.]+)", spec).group(1)


# ---------------------------------------------------------------- the decision, against hand-made cases


@pytest.mark.parametrize("outcomes, launcher, expected", [
    ([], 0, (0, True)),
    ([Outcome(0, 0, ""), Outcome(1, 0, "")], 0, (0, True)),
    ([Outcome(0, 2, "bad key"), Outcome(1, 2, "bad key")], 1, (2, True)),
    ([Outcome(0, 75, ""), Outcome(1, 75, "")], 1, (75, True)),
    ([Outcome(0, 1, "lost peer"), Outcome(1, 2, "bad")], 1, (2, True)),  # the user error says the most
    ([Outcome(0, 1, "lost peer"), Outcome(1, 75, "")], 1, (75, True)),
    ([Outcome(0, 0, "")], 1, (1, False)),  # a rank killed by a signal wrote nothing: unexplained
    ([], 1, (1, False)),
    ([], -9, (-9, False)),
])
def test_decide(outcomes, launcher, expected):
    assert outcome.decide(outcomes, launcher) == expected


def test_read_takes_whole_files_only(tmp_path, monkeypatch):
    monkeypatch.setenv(outcome.OUTCOME_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    outcome.record(2, "cxrdist train: error: x")
    (tmp_path / "rank-0.json").write_text('{"rank": 0, "co')  # cut short: ignored, never a wrong code
    assert outcome.read(tmp_path) == [Outcome(1, 2, "cxrdist train: error: x")]


def test_record_outside_cxrdist_train_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(outcome.OUTCOME_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    outcome.record(2, "x")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- real launches, both ends of the accelerate range


def launcher_env(accelerate: str) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    if accelerate == "oldest":
        assert OLDEST.is_dir(), f"{OLDEST} missing: `make` installs accelerate {accelerate_floor()} there"
        env["PYTHONPATH"] = os.pathsep.join([str(OLDEST), env.get("PYTHONPATH", "")])
    return env


def accelerate_version(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", "import accelerate; print(accelerate.__version__)"], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("accelerate", ["installed", "oldest"])
def test_a_user_error_in_the_trainer_is_one_line_and_exit_2(accelerate, processes, tmp_path):
    env = launcher_env(accelerate)
    if accelerate == "oldest":
        assert accelerate_version(env) == accelerate_floor()
    done = subprocess.run([sys.executable, "-m", "cxrdist", "train", "--config", str(DEMO_CONFIG), "--processes", str(processes),
                           f"output_dir={tmp_path}", "train.epochz=3"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, start_new_session=True)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cxrdist train: error: ") and "train.epochz" in lines[0], done.stderr[-3000:]


@pytest.mark.slow
def test_a_trainer_killed_by_a_signal_shows_the_launchers_page(synth_shards, tmp_path):
    """No outcome file explains the end: the launcher's own report is all the user has, so it is shown."""
    overrides = fast_overrides(synth_shards, tmp_path / "runs", **{"train.epochs": 50})
    proc = subprocess.Popen([sys.executable, "-m", "cxrdist", "train", "--config", str(DEMO_CONFIG), "--processes", "1", *overrides],
                            env=cpu_env(1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / "runs" / "demo" / "fold-0" / "metrics.jsonl"
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        trainer = next(p for p in psutil.Process(proc.pid).children(recursive=True) if p.cmdline()[1:2] == [str(TRAIN)]
                       and psutil.Process(p.ppid()).cmdline()[1:2] != [str(TRAIN)])  # not its DataLoader worker
        trainer.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode not in (0, 2, 75), err[-3000:]
    assert "train.py" in err, err[-3000:]  # the launcher's report names the command that died


def test_the_logged_launcher_command_carries_no_credentials(monkeypatch, capsys, tmp_path):
    from cxrdist.training.launcher import launch

    monkeypatch.setattr(launch, "run_forwarding_signals", lambda cmd, env: 0)
    secret = "data.shards=https://alice:s3cret@shards.example.org/cxr?token=t0ken"
    assert launch.launch_fold(DEMO_CONFIG, 0, [secret, f"output_dir={tmp_path}"], 1, None) == 0
    out = capsys.readouterr()
    assert "+ accelerate launch" in out.out
    assert "s3cret" not in out.out + out.err and "t0ken" not in out.out + out.err
