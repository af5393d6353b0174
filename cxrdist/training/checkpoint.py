"""Atomic, resumable checkpoints: accelerate's save_state + EMA + trainer state, one directory each.

Layout: RUN/checkpoints/step-00001234/{accelerate state files, ema.safetensors, trainer_state.json}.
A checkpoint is written to RUN/checkpoints/.partial-step-N and renamed when complete, so a crash
(even kill -9) mid-write leaves the previous checkpoints untouched and resume never sees half a one.

Loading never runs code from the files: before anything is restored, every file of the checkpoint is
read the safe way (JSON, safetensors, torch.load with weights_only=True); a checkpoint that fails
(truncated, foreign, a pickle with code in it) is refused, and `resume=auto` falls back to the
previous complete one. No custom pickled object is saved (the LR schedule is a function of the step).
"""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from cxrdist.atomic import atomic_write_text, filesystem_error, removed_on_failure, replace_directory
from cxrdist.errors import UserError, one_line
from cxrdist.layout import CHECKPOINTS_DIR

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
STEP_DIR = re.compile(r"^step-(\d{8})$")
TORCH_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")
CUSTOM_PICKLE = "custom_checkpoint_*.pkl"  # accelerate loads these with a full unpickler


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken
    batches: int = 0  # loader batches consumed (the position in the train stream)
    epoch: int = 0
    best_auc: float = float("-inf")
    best_step: int = -1
    bad_steps_in_row: int = 0
    bad_steps_total: int = 0
    samples_seen: int = 0
    corrupt_seen: int = 0
    wandb_id: str = ""
    dataset: dict = field(default_factory=dict)  # Manifest.identity() of the shards trained on
    settings: dict = field(default_factory=dict)  # what the stream order and the run depend on (training/resume_settings.py)
    extra: dict = field(default_factory=dict)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def save_checkpoint(accelerator, ema, state: TrainerState, run_dir: Path, keep: int) -> Path:
    """Collective: every rank must call it. Returns the final directory."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{state.step:08d}"
    partial = root / f".partial-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        partial.mkdir()  # before the barrier: under DeepSpeed every rank writes its own files into it
    accelerator.wait_for_everyone()
    try:
        with removed_on_failure(partial):  # by whichever rank fails: a half checkpoint must not hold the space
            accelerator.save_state(str(partial), safe_serialization=True)
            # Every rank writes into `partial` (its random_states_R.pkl; its ZeRO shards under DeepSpeed) and
            # save_state ends without a barrier: rank 0 must not rename it while a slower rank still writes.
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_file(ema_state(ema), str(partial / EMA_FILE))
                (partial / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
                fault_injection(state.step)
                replace_directory(partial, final)
    except OSError as err:
        if filesystem_error(err) is None:
            raise
        newest = list_checkpoints(run_dir)
        raise UserError(f"{root}: the checkpoint of step {state.step} could not be written ({err.strerror}); its partial files are "
                        f"removed, {newest[-1].name + ' stays the newest' if newest else 'no checkpoint is there'} to resume from: "
                        "make room there and run the same command again") from None
    if accelerator.is_main_process:
        prune(run_dir, keep, state.best_step)
    accelerator.wait_for_everyone()
    return final


def fault_injection(step: int) -> None:
    """Test hook: CXRDIST_KILL_IN_CHECKPOINT=N kills this process (SIGKILL) in the middle of writing
    the checkpoint of step N, to prove that such a crash never costs the previous checkpoint."""
    if os.environ.get("CXRDIST_KILL_IN_CHECKPOINT") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def ema_state(ema) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}


def prune(run_dir: Path, keep: int, best_step: int) -> None:
    """Keep the newest `keep` checkpoints and the one of the best evaluation; drop leftovers of crashes."""
    complete = list_checkpoints(run_dir)
    for path in complete[:-keep]:
        if int(STEP_DIR.match(path.name).group(1)) != best_step:
            shutil.rmtree(path, ignore_errors=True)
    for path in checkpoint_dir(run_dir).glob(".partial-*"):  # ours was renamed: these are from crashes
        shutil.rmtree(path, ignore_errors=True)


def update_state(run_dir: Path, state: TrainerState) -> None:
    """Rewrite the trainer state of the checkpoint of `state.step` (e.g. after the final evaluation)."""
    path = checkpoint_dir(run_dir) / f"step-{state.step:08d}" / STATE_FILE
    if path.is_file():
        atomic_write_text(path, json.dumps(asdict(state), indent=2))


def find_resume(run_dir: Path, resume: str, say=print) -> tuple[Path, TrainerState] | None:
    """The checkpoint to resume from and its (checked) trainer state, or None for a fresh start.

    `auto`: the newest checkpoint that passes `check_checkpoint`, saying which were skipped and why.
    A PATH must pass it, or it is a UserError.
    """
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise UserError(f"train.resume={resume}: not a complete checkpoint directory (no {STATE_FILE})")
        return path, check_checkpoint(path)
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, check_checkpoint(path)
        except UserError as err:
            say(f"skipping checkpoint {path.name}: {one_line(err)}; trying the previous one")
    return None


def check_checkpoint(path: Path) -> TrainerState:
    """Read every file of the checkpoint without a full unpickler; a UserError names the first bad one."""
    custom = sorted(path.glob(CUSTOM_PICKLE))
    if custom:
        raise UserError(f"{custom[0]}: a pickled object only a full unpickler could load (it could run code); cxrdist never writes one")
    import torch
    from accelerate.utils import load as torch_load_weights_only  # weights_only=True plus numpy's RNG-state types

    files = sorted(p for p in path.rglob("*") if p.is_file())
    with torch.serialization.safe_globals(deepspeed_state_types(files)):
        for file in files:
            try:
                if file.suffix == ".safetensors":
                    load_file(str(file))
                elif file.suffix in TORCH_SUFFIXES:
                    torch_load_weights_only(file, map_location="cpu")
            except Exception as err:  # noqa: BLE001 -- any failure to read foreign bytes means: not this checkpoint
                raise UserError(f"{file}: cannot be loaded safely ({type(err).__name__}: {one_line(err)})") from None
    try:
        return TrainerState(**json.loads((path / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{path / STATE_FILE}: unreadable trainer state ({one_line(err)})") from None


def deepspeed_state_types(files: list[Path]) -> list:
    """The plain-data DeepSpeed types its ZeRO optimizer states hold (loss scaler settings, the stage enum, parameter
    fragment addresses), admitted by the weights-only load only for a checkpoint DeepSpeed wrote: rebuilding them sets
    attributes and runs no code of the file's choosing."""
    if not any("zero_pp_rank_" in f.name for f in files):  # bf16_zero_pp_rank_* under bf16
        return []
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint(accelerator, ema, path: Path) -> TrainerState:
    """Restore a checkpoint that passed `check_checkpoint` (accelerate loads torch files with weights_only=True)."""
    accelerator.load_state(str(path))
    ema.load_state_dict(load_file(str(path / EMA_FILE)))
    data = json.loads((path / STATE_FILE).read_text())
    return TrainerState(**data)
