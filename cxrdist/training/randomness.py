"""Model-side randomness (dropout, drop-path) per global micro-batch, reproducible from the seed.

`set_seed(cfg.seed)` gives every rank the same global RNG, so without this every rank would draw the same
dropout and drop-path masks. Each training forward runs on a forked RNG seeded from (seed, global micro-batch
index): the masks differ across ranks and micro-batches, and the same micro-batch (the same samples: data/order.py)
draws the same masks on any number of processes and after an exact resume; the global RNG the rest of the trainer
uses is left as it was.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch


def forward_seed(seed: int, micro_batch: int) -> int:
    """A 63-bit seed, well mixed (numpy's SeedSequence) from the run's seed and the global micro-batch index."""
    entropy = [seed % 2**64, micro_batch]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


@contextmanager
def model_randomness(seed: int, micro_batch: int, device: torch.device):
    """Run the block (one training forward) on the RNG of (seed, micro_batch); the global RNG is restored after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(forward_seed(seed, micro_batch))
        yield
