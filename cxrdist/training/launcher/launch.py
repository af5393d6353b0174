"""`cxrdist train`: builds and runs the `accelerate launch cxrdist/train.py ...` command line."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import cxrdist
from cxrdist.data.location import redact
from cxrdist.errors import UserError, one_line
from cxrdist.log import get_logger
from cxrdist.training.cluster.elastic import RESTART_ENVIRONMENT, RESTART_RENDEZVOUS, check_max_restarts
from cxrdist.training.launcher import outcome
from cxrdist.training.launcher.trainer_stderr import TRAINER_STDERR_ENV, TailBuffer, TrainerStderr

TRAIN_SCRIPT = Path(cxrdist.__file__).resolve().parent / "train.py"


def experiment_info(config: Path, overrides: list[str], read_manifest: bool = True) -> tuple[str, str, int]:
    """(experiment, output_dir, number of folds in the shards' manifest; 0 without `read_manifest`).

    `cxrdist train --fold all` and slurm/train_folds.sh (through `cxrdist info`) size their fold loops from it."""
    from cxrdist.data.datasets import load_manifest
    from cxrdist.training.config import load_config

    cfg = load_config(config, overrides)
    folds = load_manifest(cfg.data.shards).num_folds if read_manifest else 0
    return cfg.experiment, cfg.output_dir, folds


def folds_to_train(config: Path, fold: str | None, overrides: list[str]) -> list[int | None]:
    if fold is None:
        return [None]
    if fold != "all":
        if not fold.isdigit():
            raise UserError(f"--fold {fold!r}: expected a fold number or 'all'")
        return [int(fold)]
    return list(range(experiment_info(config, overrides)[2]))


ABLATIONS = {"refine": ("norefine", ["model.refine.enabled=false"])}  # --ablate NAME -> (experiment suffix, overrides)


def ablation_arms(config: Path, overrides: list[str], ablate: str | None) -> list[list[str]]:
    """The override lists of the arms to train: the experiment as configured, then (with `ablate`) the same
    experiment with one component switched off, named EXPERIMENT-SUFFIX. Everything else (data, folds, seed) is shared."""
    if ablate is None:
        return [list(overrides)]
    if ablate not in ABLATIONS:
        raise UserError(f"--ablate {ablate!r}: expected one of {', '.join(ABLATIONS)}")
    from cxrdist.training.config import load_config

    cfg = load_config(config, overrides)
    if not cfg.model.refine.enabled:
        raise UserError(f"--ablate {ablate}: model.refine.enabled is already false in {config}; both arms would be the same experiment")
    suffix, switch = ABLATIONS[ablate]
    return [list(overrides), [*overrides, *switch, f"experiment={cfg.experiment}-{suffix}"]]


def launch_command(config: Path, fold: int | None, overrides: list[str], processes: int | None, launch_config: Path | None,
                   max_restarts: int = 0) -> tuple[list[str], dict]:
    """The command and environment for one fold: GPUs when present, else CPU processes over gloo; with `max_restarts`,
    torch elastic restarts trainers that fail up to that many times (training/cluster/elastic.py)."""
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    env = dict(os.environ)
    if max_restarts:
        cmd += ["--max_restarts", str(check_max_restarts(max_restarts)), "--rdzv_backend", RESTART_RENDEZVOUS]
        env.update(RESTART_ENVIRONMENT)
    if launch_config is not None:
        check_launch_config(launch_config)
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


def check_launch_config(path: Path) -> None:
    """Read the file the way `accelerate launch` will (its own loader), so that a broken one is one line here instead of
    the launcher's traceback after it started."""
    from accelerate.commands.config.config_args import load_config_from_file

    if not path.is_file():
        raise UserError(f"--launch-config {path}: no such file")
    try:
        load_config_from_file(str(path))
    except Exception as err:  # noqa: BLE001 - YAML/JSON errors, a list or a string for a mapping, unknown keys or values
        raise UserError(f"--launch-config {path}: not an accelerate config file ({type(err).__name__}: {one_line(err)}); "
                        "see launch/*.yaml") from None


SAID_LAUNCHES: set[str] = set()  # the launch lines this process showed, less their fold


def launch_fold(config: Path, fold: int | None, overrides: list[str], processes: int | None, launch_config: Path | None,
                max_restarts: int = 0) -> int:
    """Run one fold; returns the trainer's exit code (75 when it checkpointed after a preemption signal). The launch line is
    shown once per command: the folds after the first differ from it only in --fold."""
    cmd, env = launch_command(config, fold, overrides, processes, launch_config, max_restarts)
    line = "+ accelerate launch " + redact(shlex.join(cmd[3:]))
    unfolded = redact(shlex.join(launch_command(config, None, overrides, processes, launch_config, max_restarts)[0][3:]))
    if unfolded not in SAID_LAUNCHES:
        SAID_LAUNCHES.add(unfolded)
        get_logger("launch").info(line)
    return run_forwarding_signals(cmd, env)


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def run_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Run the launcher in its own process group; SIGTERM/SIGINT/SIGUSR1 to us become a preemption
    request (SIGTERM or SIGUSR1) to the trainer processes, which checkpoint and exit; a second SIGINT
    kills the group. Whatever is left of the group when the launcher ends is killed: no orphans.

    The exit code comes from the trainers' outcome files (training/launcher/outcome.py), not from the launcher,
    which says 1 for every failure. The trainers' stderr reaches ours through training/launcher/trainer_stderr.py;
    the launcher's own stderr is shown only when no trainer explained a failure."""
    with tempfile.TemporaryDirectory(prefix="cxrdist-launch-") as channel:
        trainer_stderr = TrainerStderr(Path(channel), sys.stderr)
        env = {**env, outcome.OUTCOME_DIR_ENV: channel, TRAINER_STDERR_ENV: str(trainer_stderr.path)}
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
        launcher_stderr = TailBuffer(proc.stderr.fileno())
        try:
            launcher_code = wait_forwarding_signals(proc)
        finally:
            signal_group(proc.pid, signal.SIGKILL)
            trainer_stderr.close()
            page = launcher_stderr.text()
            proc.stderr.close()
        code, explained = outcome.decide(outcome.read(Path(channel)), launcher_code)
    if not explained:
        sys.stderr.write(page or f"cxrdist train: the launcher ended with exit code {code} and no trainer said why\n")
        sys.stderr.flush()
    return code


def wait_forwarding_signals(proc: subprocess.Popen) -> int:
    interrupts = []

    def forward(signum, frame) -> None:
        if signum == signal.SIGINT:
            interrupts.append(signum)
            if len(interrupts) > 1:
                signal_group(proc.pid, signal.SIGKILL)
                return
        signal_trainers(proc.pid, signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def trainer_processes(launcher_pid: int) -> list:
    """The processes running train.py under the launcher (not their DataLoader workers, forked with the same command line)."""
    import psutil

    try:
        tree = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return []
    script = str(TRAIN_SCRIPT)

    def runs_train(p) -> bool:
        try:
            return script in p.cmdline()
        except psutil.Error:
            return False

    pids = {p.pid for p in tree if runs_train(p)}
    return [p for p in tree if p.pid in pids and p.ppid() not in pids]


def signal_trainers(launcher_pid: int, sig: int) -> None:
    trainers = trainer_processes(launcher_pid)
    if not trainers:  # not started yet (or already gone): the launcher's group gets it
        signal_group(launcher_pid, sig)
    for p in trainers:
        try:
            p.send_signal(sig)
        except Exception:  # noqa: BLE001 -- it exited in between
            pass


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
