"""Logs fit for files: when stderr is not a terminal, progress is one whole line every CXRDIST_PROGRESS_EVERY
seconds and one at the end (no carriage-return redraws, no bar glued to a log line, no 100% printed twice)."""

from __future__ import annotations

import os
import subprocess
import sys

from trainer_utils import REPO, cpu_env, fast_overrides, run_single

from cxrdist.log import PROGRESS_EVERY_ENV, TERMINAL_ENV, ProgressLines, progress


def test_progress_lines_print_whole_lines_and_the_end_once(monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_EVERY_ENV, "0")
    monkeypatch.setenv(TERMINAL_ENV, "0")
    bar = progress(3, "evaluate test", "img")
    assert isinstance(bar, ProgressLines)
    with bar:
        for _ in range(3):
            bar.update(1)
        bar.set_postfix(loss="0.1")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split("[")[0].strip() for line in lines] == ["evaluate test:  33% 1/3", "evaluate test:  67% 2/3", "evaluate test: 100% 3/3"]
    monkeypatch.setenv(PROGRESS_EVERY_ENV, "3600")
    with progress(5, "predict", "img") as bar:
        bar.update(5)
    assert [line.split("[")[0].strip() for line in capsys.readouterr().err.splitlines()] == ["predict: 100% 5/5"]  # only the end


def test_a_terminal_gets_a_bar_and_disabled_progress_says_nothing(monkeypatch, capsys):
    from tqdm import tqdm

    monkeypatch.setenv(TERMINAL_ENV, "1")
    bar = progress(3, "x", "img")
    assert isinstance(bar, tqdm)
    bar.close()
    capsys.readouterr()
    monkeypatch.setenv(TERMINAL_ENV, "0")
    with progress(3, "x", "img", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_synth_into_a_log_file_writes_lines_not_redraws(tmp_path):
    env = {**os.environ, PROGRESS_EVERY_ENV: "0", "PYTHONPATH": str(REPO)}
    env.pop(TERMINAL_ENV, None)
    with open(tmp_path / "log", "w") as log:  # a real file as stderr, as in `cxrdist synth ... 2> log`
        run = subprocess.run([sys.executable, "-m", "cxrdist", "synth", "--out", str(tmp_path / "s"), "--n", "12", "--size", "64"],
                             stdout=subprocess.PIPE, stderr=log, text=True, timeout=300, env=env, cwd=REPO)
    assert run.returncode == 0
    text = (tmp_path / "log").read_text()
    assert "\r" not in text and text.endswith("\n")
    assert [line.startswith("synth: ") for line in text.splitlines()] == [True] * 12
    assert sum("100%" in line for line in text.splitlines()) == 1


def test_training_into_a_pipe_logs_lines_that_never_glue(synth_shards, tmp_path):
    overrides = fast_overrides(synth_shards, tmp_path / "runs", **{"train.epochs": 1, "logging.progress": "true"})
    run = run_single(overrides, env={**cpu_env(1), PROGRESS_EVERY_ENV: "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\r" not in run.stderr and "\r" not in run.stdout
    progress_lines = [line for line in run.stderr.splitlines() if line.startswith("fold 0: ")]
    assert progress_lines and "100%" in progress_lines[-1] and sum("100%" in line for line in progress_lines) == 1
    assert "loss=" in progress_lines[-1]
    for line in run.stdout.splitlines():
        assert "fold 0: " not in line or line.startswith("cxrdist:"), line  # no log line carries a piece of a bar
