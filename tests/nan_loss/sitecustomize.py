"""Loaded by every Python process started with this folder on PYTHONPATH (tests/test_deepspeed_fp16.py).

CXRDIST_TEST_NAN_LOSS_AFTER=K makes each rank's training loss NaN from its (K+1)-th training micro-batch on: a real
non-finite loss (a diverged run), not a loss-scale overflow. Only losses computed with gradients enabled are counted
and spoiled, so evaluation's losses are left alone.
"""

import os

_after = os.environ.get("CXRDIST_TEST_NAN_LOSS_AFTER")
if _after and os.environ.get("RANK") is not None:
    import torch

    import cxrdist.model.loss as _loss

    _masked_sum = _loss.masked_sum
    _calls = [0]

    def _nan_after(loss, mask):
        total = _masked_sum(loss, mask)
        if torch.is_grad_enabled():
            _calls[0] += 1
            if _calls[0] > int(_after):
                total = total * float("nan")
        return total

    _loss.masked_sum = _nan_after
