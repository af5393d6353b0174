"""Loaded by every Python process started with this folder on PYTHONPATH (tests/test_train.py).

CXRDIST_TEST_SLOW_RANK=R:S makes rank R sleep S seconds inside `Accelerator.save_state`, just before it
writes its own random states into the checkpoint directory: a slow rank (a loaded node, a slow shared
filesystem) at the worst moment, to prove that rank 0 does not finish the checkpoint without it.
"""

import os

_spec = os.environ.get("CXRDIST_TEST_SLOW_RANK")
if _spec and os.environ.get("RANK") is not None:
    import time

    import accelerate.accelerator

    _rank, _seconds = _spec.split(":")
    _save = accelerate.accelerator.save_accelerator_state

    def _slow_save(*args, **kwargs):
        if os.environ.get("RANK") == _rank:
            time.sleep(float(_seconds))
            print(f"CXRDIST_TEST_SLOW_RANK: rank {_rank} slept {_seconds} s in save_state", flush=True)  # the tests' evidence
        return _save(*args, **kwargs)

    accelerate.accelerator.save_accelerator_state = _slow_save
