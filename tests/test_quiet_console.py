"""#32 item 3, a quiet console: third-party noise filtered at its source, one launch line per command, notes said once per
command, no traceback when the reader of our output goes away, every option's default in --help, and a second demo run in
the same folder that redoes nothing it can reuse."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from cxrdist.cli import EXIT_BROKEN_PIPE, build_parser
from cxrdist.demo.one_dataset import DemoSteps
from cxrdist.training.launcher.notes import collected_notes, say_note
from trainer_utils import DEMO_CONFIG, REPO

DEEPSPEED_GUESS = """
import sys
if sys.argv[1] == "quiet":
    from cxrdist.log import quiet_third_party
    quiet_third_party()
import deepspeed
from deepspeed.accelerator import get_accelerator
print("device:", get_accelerator().device_name())
"""


def test_deepspeeds_cpu_guess_is_filtered_at_its_logger():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    env.pop("DS_ACCELERATOR", None)
    runs = {how: subprocess.run([sys.executable, "-c", DEEPSPEED_GUESS, how], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
            for how in ("loud", "quiet")}
    for result in runs.values():
        assert result.returncode == 0 and "device: cpu" in result.stdout, result.stderr[-2000:]
    assert "Setting accelerator to CPU" in runs["loud"].stdout + runs["loud"].stderr  # what a trainer printed, twice per fold
    assert "Setting accelerator to CPU" not in runs["quiet"].stdout + runs["quiet"].stderr


def test_one_launch_line_per_command(monkeypatch, tmp_path, capsys):
    from cxrdist.training.launcher import launch

    monkeypatch.setattr(launch, "run_forwarding_signals", lambda cmd, env: 0)  # the one place a launcher starts
    monkeypatch.setattr(launch, "SAID_LAUNCHES", set())
    overrides = [f"output_dir={tmp_path}"]
    for fold in (0, 1, 2):
        assert launch.launch_fold(DEMO_CONFIG, fold, overrides, 1, None) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("+ accelerate launch")]
    assert len(lines) == 1 and "--fold 0" in lines[0]
    launch.launch_fold(DEMO_CONFIG, 0, [*overrides, "experiment=other"], 1, None)  # another command line: shown
    assert capsys.readouterr().out.count("+ accelerate launch") == 1


def test_notes_are_said_once_per_command():
    said = []
    with collected_notes(said.append):
        for fold in (0, 1, 2):
            say_note("ema_schedule", f"EMA reached at step 354 (fold {fold})", fold, said.append)
            say_note("inert_refinement", "the label-graph refinement is inert", fold, said.append, at_end=True)
        assert said == ["EMA reached at step 354 (fold 0)"]  # the inert note waits for the end of the command
    assert said == ["EMA reached at step 354 (fold 0)", "folds 0, 1, 2: the label-graph refinement is inert"]
    alone = []
    for fold in (0, 1):  # a trainer started by hand: every note at once
        say_note("inert_refinement", "inert", fold, alone.append, at_end=True)
    assert alone == ["inert", "inert"]


def test_a_closed_pipe_ends_the_command_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before we write: `cxrdist labels | head -1` once head has its line
    try:
        result = subprocess.run([sys.executable, "-m", "cxrdist", "labels"], stdout=write, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    finally:
        os.close(write)
    assert result.stderr == "" and result.returncode == EXIT_BROKEN_PIPE


def test_help_gives_every_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {'/'.join(action.option_strings)}" for name, command in commands.items() for action in command._actions
               if action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS)
               and "%(default)" not in (action.help or "")]
    assert missing == []
    predict = commands["predict"].format_help()
    for option, default in (("--cam-threshold", "0.5"), ("--cam-top", "3"), ("--operating-point", "sens@spec90")):
        assert f"default: {default}" in " ".join(predict.split()), option


def test_a_demo_step_is_reused_only_when_what_it_was_made_from_is_unchanged(tmp_path):
    made_from = {"config": "abc", "overrides": ["x=1"]}
    output = tmp_path / "fold-0" / "best" / "model.json"
    steps = DemoSteps(tmp_path)
    assert not steps.reusable("fold-0", made_from, output)
    output.parent.mkdir(parents=True)
    output.write_text("{}")
    steps.finished("fold-0", made_from)
    again = DemoSteps(tmp_path)  # a second run reads what the first recorded
    assert again.reusable("fold-0", made_from, output)
    assert not again.reusable("fold-0", {**made_from, "overrides": ["x=2"]}, output)
    output.unlink()
    assert not again.reusable("fold-0", made_from, output)


@pytest.mark.parametrize("example", ["preds.csv", "cams", "cxr.onnx"])
def test_outputs_of_the_readme_examples_are_ignored_by_git(example):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### 4. Ensemble, predict, report"):readme.index("#### What the W&B group")]
    written = [word for line in section.splitlines() for word in line.split() if word.rstrip("/").endswith(example)]
    assert written, f"no README example writes {example}"
    probe = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=REPO, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("not a git checkout")
    for path in written:
        file = path.rstrip("/") + ("/x.png" if example == "cams" else "")  # an overlay inside the --cam folder
        assert subprocess.run(["git", "check-ignore", "-q", file], cwd=REPO).returncode == 0, path
