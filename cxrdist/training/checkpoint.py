"""Atomic, resumable checkpoints: accelerate's save_state + EMA + trainer state, one directory each.

Layout: RUN/checkpoints/step-00001234/{accelerate state files, ema.safetensors, trainer_state.json}.
A checkpoint is written to RUN/checkpoints/.partial-step-N and renamed when complete, so a crash
(even kill -9) mid-write leaves the previous checkpoints untouched and resume never sees half a one.

Loading never runs code from the files: before anything is restored, every file of the checkpoint is
read the safe way (JSON, safetensors, torch.load with weights_only=True); a checkpoint that fails
(truncated, foreign, a pickle with code in it) is refused, and `resume=auto` falls back to the
previous complete one. No custom pickled object is saved (the LR schedule is a function of the step).

Every checkpoint is taken at an optimizer step boundary, and its position in the data is that step alone (the
canonical order, data/order.py), so it resumes on any number of processes the run's partitions serve; DeepSpeed's
partitioned ZeRO state written by another number of processes goes through its universal checkpoint
(training/universal.py). A checkpoint of an earlier format (its position bound to the topology that wrote it) is
refused with one line, never skipped for an older one.
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
from cxrdist.training import universal

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
STEP_DIR = re.compile(r"^step-(\d{8})$")
TORCH_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")
CUSTOM_PICKLE = "custom_checkpoint_*.pkl"  # accelerate loads these with a full unpickler
# 2: the position is the optimizer step of the canonical sample order (data/order.py). Before it (no "format"), a
# checkpoint's position was a per-rank batch count of a topology-bound order.
FORMAT = 2


class CheckpointFormatError(UserError):
    """A checkpoint of another format: refused outright (resume=auto must not fall back to an older one and retrain)."""


@dataclass
class TrainerState:
    format: int = FORMAT
    step: int = 0  # optimizer steps taken: with the recorded global batch, the position in the sample order
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
    for pattern in (".partial-*", f"{universal.STAGING_PREFIX}*"):  # ours was renamed (or loaded): these are from crashes
        for path in checkpoint_dir(run_dir).glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def update_state(run_dir: Path, state: TrainerState) -> None:
    """Rewrite the trainer state of the checkpoint of `state.step` (e.g. after the final evaluation)."""
    path = checkpoint_dir(run_dir) / f"step-{state.step:08d}" / STATE_FILE
    if path.is_file():
        atomic_write_text(path, json.dumps(asdict(state), indent=2))


def find_resume(run_dir: Path, resume: str, say=print) -> tuple[Path, TrainerState] | None:
    """The checkpoint to resume from and its (checked) trainer state, or None for a fresh start.

    `auto`: the newest checkpoint that passes `check_checkpoint`, saying which were skipped and why (one of another
    format stops the search with its error). A PATH must pass it, or it is a UserError.
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
        except CheckpointFormatError:
            raise
        except UserError as err:
            say(f"skipping checkpoint {path.name}: {one_line(err)}; trying the previous one")
    return None


def peek_settings(run_dir: Path, resume: str) -> dict:
    """The settings recorded by the checkpoint a start will resume from, read without the checks (to size the accelerator
    before the process group exists); {} when there is none of this format. `find_resume` makes the real choice."""
    if resume == "never":
        return {}
    for path in [Path(resume)] if resume != "auto" else reversed(list_checkpoints(run_dir)):
        try:
            data = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        return dict(data.get("settings") or {}) if isinstance(data, dict) and data.get("format") == FORMAT else {}
    return {}


def read_state(path: Path) -> TrainerState:
    """The trainer state of a checkpoint, its format first: one of another format is a CheckpointFormatError."""
    try:
        data = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path / STATE_FILE}: unreadable trainer state ({one_line(err)})") from None
    written = data.get("format", 1) if isinstance(data, dict) else None
    if written != FORMAT:
        raise CheckpointFormatError(
            f"checkpoint {path} has format {written} (an earlier cxrdist whose sample order depended on the number of processes "
            f"and loader workers; this one reads format {FORMAT}): it cannot be resumed exactly; finish that run with the "
            "cxrdist that started it, or start over with train.resume=never or another experiment name"
            if isinstance(written, int) and written < FORMAT else
            f"checkpoint {path} has format {written!r}, this cxrdist reads format {FORMAT}: resume it with the cxrdist that wrote it"
        )
    try:
        return TrainerState(**data)
    except TypeError as err:
        raise UserError(f"{path / STATE_FILE}: unreadable trainer state ({one_line(err)})") from None


def check_checkpoint(path: Path) -> TrainerState:
    """Read every file of the checkpoint without a full unpickler; a UserError names the first bad one."""
    state = read_state(path)
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
    return state


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


def load_checkpoint(accelerator, ema, path: Path, say=print) -> TrainerState:
    """Restore a checkpoint that passed `check_checkpoint` (accelerate loads torch files with weights_only=True), on
    the number of processes that wrote it or another (DeepSpeed: through its universal checkpoint)."""
    from accelerate.utils import DistributedType

    state = read_state(path)
    written_by = state.settings.get("world_size", accelerator.num_processes)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and written_by != accelerator.num_processes:
        universal.load_resharded(accelerator, path, written_by, say)
    else:
        accelerator.load_state(str(path))
    accelerator.step = 0  # gradient accumulation counts from the step boundary the checkpoint was taken at
    ema.load_state_dict(load_file(str(path / EMA_FILE)))
    return state
