"""DeepSpeed ZeRO-1/2 state written by one number of processes, loaded on another: DeepSpeed's universal checkpoint.

ZeRO partitions the fp32 master weights and the Adam moments over the data-parallel ranks, and DeepSpeed's own loader
refuses a checkpoint of another data-parallel degree. Its converter (`python -m deepspeed.checkpoint.ds_to_universal`)
rewrites the partitions as one whole tensor per parameter and optimizer state, and an engine whose config says
`checkpoint.load_universal` reads that layout on any degree. Rank 0 converts into `checkpoints/.universal-step-N`
beside the checkpoint (which stays as it was), every rank loads from there, and rank 0 removes it (a leftover of a
crash is removed with the next checkpoint, training/checkpoint.py's prune).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from cxrdist.errors import UserError

STAGING_PREFIX = ".universal-"
MODEL_DIR = "pytorch_model"  # where accelerate's save_state has the DeepSpeed engine write its checkpoint
CONVERTER = "deepspeed.checkpoint.ds_to_universal"


def load_resharded(accelerator, path: Path, written_by: int, say) -> None:
    """Collective: load the checkpoint at `path`, written by `written_by` processes, on this run's processes."""
    from accelerate.utils import broadcast_object_list

    staging = Path(path).parent / f"{STAGING_PREFIX}{Path(path).name}"
    failure = None
    if accelerator.is_main_process:
        say(f"{Path(path).name} was written by {written_by} process(es): converting its ZeRO state to DeepSpeed's universal "
            f"checkpoint to load it on {accelerator.num_processes}")
        failure = convert(Path(path), staging)
    failure = broadcast_object_list([failure])[0]
    if failure:
        raise UserError(f"{failure}; resume on {written_by} process(es) instead")
    engine = accelerator.deepspeed_engine_wrapped.engine
    engine._config.load_universal_checkpoint = True  # read at load time: the engine was built before the checkpoint was known
    try:
        accelerator.load_state(str(staging))
    finally:
        engine._config.load_universal_checkpoint = False
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)


def convert(path: Path, staging: Path) -> str | None:
    """Write the universal form of the checkpoint into `staging`, with accelerate's own files beside it; returns why it
    failed, or None. The converter runs as its own process (it may start worker processes) and is judged by its exit code."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for item in path.iterdir():
        if item.is_file():
            shutil.copy2(item, staging / item.name)
    command = [sys.executable, "-m", CONVERTER, "--input_folder", str(path / MODEL_DIR), "--output_folder", str(staging / MODEL_DIR),
               "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    shutil.rmtree(staging, ignore_errors=True)
    last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return f"{path}: DeepSpeed's {CONVERTER} could not convert its ZeRO state ({last[:300]})"
