"""Which skipped optimizer steps count toward `train.max_bad_steps`.

Under fp16 the GradScaler starts at a large loss scale (65536) and halves it at every step whose
scaled gradients overflow, skipping that step: a handful of skips at the start of a run (and one
now and then) is its normal calibration, not a sign of divergence. Only a non-finite loss (computed
in fp32, so no scale is involved), or gradients that overflow even once the scale has fallen below
1 (i.e. unscaled), are real non-finite steps. Without a scaler every non-finite step is real.
"""

from __future__ import annotations

MIN_HEALTHY_SCALE = 1.0


def is_bad_step(loss_finite: bool, grads_finite: bool, step_skipped: bool, scaler_scale: float | None) -> bool:
    """True when this step's non-finite values are a real problem (counted toward max_bad_steps)."""
    if not loss_finite:
        return True
    if scaler_scale is None:  # fp32 / bf16: nobody skips steps for calibration
        return not grads_finite or step_skipped
    return (step_skipped or not grads_finite) and scaler_scale < MIN_HEALTHY_SCALE
