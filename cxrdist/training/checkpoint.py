"""Atomic, resumable checkpoints: accelerate's save_state + EMA + trainer state, one directory each.

Layout: RUN/checkpoints/step-00001234/{accelerate state files, ema.safetensors, trainer_state.json}.
A checkpoint is written to RUN/checkpoints/.partial-step-N and renamed when complete, so a crash
(even kill -9) mid-write leaves the previous checkpoints untouched and resume never sees half a one.
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

from cxrdist.atomic import replace_directory
from cxrdist.layout import CHECKPOINTS_DIR

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
STEP_DIR = re.compile(r"^step-(\d{8})$")


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
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    if accelerator.is_main_process:
        save_file(ema_state(ema), str(partial / EMA_FILE))
        (partial / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        fault_injection(state.step)
        replace_directory(partial, final)
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


def find_resume(run_dir: Path, resume: str) -> Path | None:
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        return path if (path / STATE_FILE).is_file() else None
    complete = list_checkpoints(run_dir)
    return complete[-1] if complete else None


def load_checkpoint(accelerator, ema, path: Path) -> TrainerState:
    accelerator.load_state(str(path))
    ema.load_state_dict(load_file(str(path / EMA_FILE)))
    data = json.loads((path / STATE_FILE).read_text())
    return TrainerState(**data)
