"""`cxrdist train`: builds and runs the `accelerate launch cxrdist/train.py ...` command line."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import cxrdist
from cxrdist.errors import UserError
from cxrdist.log import get_logger

TRAIN_SCRIPT = Path(cxrdist.__file__).resolve().parent / "train.py"


def experiment_info(config: Path, overrides: list[str], read_manifest: bool = True) -> tuple[str, str, int]:
    """(experiment, output_dir, number of folds in the shards' manifest; 0 without `read_manifest`).

    `cxrdist train --fold all` and slurm/train_folds.sh (through `cxrdist info`) size their fold loops from it."""
    from cxrdist.data.manifest import load_manifest
    from cxrdist.training.config import load_config

    cfg = load_config(config, overrides)
    folds = load_manifest(Path(cfg.data.shards)).num_folds if read_manifest else 0
    return cfg.experiment, cfg.output_dir, folds


def folds_to_train(config: Path, fold: str | None, overrides: list[str]) -> list[int | None]:
    if fold is None:
        return [None]
    if fold != "all":
        if not fold.isdigit():
            raise UserError(f"--fold {fold!r}: expected a fold number or 'all'")
        return [int(fold)]
    return list(range(experiment_info(config, overrides)[2]))


def launch_command(config: Path, fold: int | None, overrides: list[str], processes: int | None, launch_config: Path | None) -> tuple[list[str], dict]:
    """The command and environment for one fold: GPUs when present, else CPU processes over gloo."""
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    env = dict(os.environ)
    if launch_config is not None:
        if not launch_config.is_file():
            raise UserError(f"--launch-config {launch_config}: no such file")
        cmd += ["--config_file", str(launch_config)]
        if processes:
            cmd += ["--num_processes", str(processes)]
    else:
        gpus = torch.cuda.device_count()
        n = processes or max(gpus, 1)
        if gpus == 0:
            # `--cpu` would silently start ONE process: ACCELERATE_USE_CPU + --multi_gpu really starts n.
            env["ACCELERATE_USE_CPU"] = "1"
        cmd += (["--multi_gpu"] if n > 1 else []) + ["--num_processes", str(n), "--num_machines", "1"]
        cmd += ["--mixed_precision", "no" if gpus == 0 else "bf16", "--dynamo_backend", "no"]
    cmd += [str(TRAIN_SCRIPT), "--config", str(config)]  # the script form, as documented (also: -m cxrdist.train)
    if fold is not None:
        cmd += ["--fold", str(fold)]
    return cmd + list(overrides), env


def launch_fold(config: Path, fold: int | None, overrides: list[str], processes: int | None, launch_config: Path | None) -> int:
    """Run one fold; returns the trainer's exit code (75 when it checkpointed after a preemption signal)."""
    from cxrdist.training.config import load_config
    from cxrdist.training.preempt import EXIT_PREEMPTED, PREEMPTED_MARKER

    run_dir = load_config(config, overrides, fold=fold).run_dir
    cmd, env = launch_command(config, fold, overrides, processes, launch_config)
    get_logger("launch").info("+ accelerate launch " + shlex.join(cmd[3:]))
    code = subprocess.call(cmd, env=env)
    if code != 0 and (run_dir / PREEMPTED_MARKER).is_file():
        return EXIT_PREEMPTED
    return code
