"""`logging.batch_keys`: the sample keys of every optimizer step, written by rank 0 to RUN/batch_keys.jsonl.

One line per step: {"step": s, "micro_batches": [[keys of global micro-batch s*K], [s*K + 1], ...]} (data/order.py's
global micro-batches, every rank's gathered): what the optimizer saw, comparable across numbers of processes and
loader workers. A gather per step (a collective), so for checks, not for production runs. A start truncates the file
to the step it resumes from: steps a crash made after the last checkpoint are trained again and written again.
"""

from __future__ import annotations

import json
from pathlib import Path

from cxrdist.atomic import atomic_write_text

BATCH_KEYS_FILE = "batch_keys.jsonl"


class BatchKeyLog:
    def __init__(self, run_dir: Path, enabled: bool, accelerator) -> None:
        self.path, self.enabled, self.accelerator = Path(run_dir) / BATCH_KEYS_FILE, enabled, accelerator
        self.group: list[tuple[int, list[str]]] = []

    def start(self, step: int) -> None:
        """Keep the records of the steps up to `step` (the checkpoint resumed from; 0: none)."""
        if not (self.enabled and self.accelerator.is_main_process):
            return
        kept = []
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def add(self, micro_batch: int, keys: list[str]) -> None:
        if self.enabled:
            self.group.append((micro_batch, list(keys)))

    def step_done(self, step: int) -> None:
        """Collective when enabled: gather the step's micro-batches from every rank; rank 0 appends them."""
        if not self.enabled:
            return
        from accelerate.utils import gather_object

        every = sorted(gather_object(self.group) if self.accelerator.num_processes > 1 else self.group)
        self.group = []
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, "micro_batches": [keys for _, keys in every]}) + "\n")
