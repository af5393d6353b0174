"""Which skipped optimizer steps count toward `train.max_bad_steps`.

Under fp16 the GradScaler starts at a large loss scale (65536) and halves it at every step whose
scaled gradients overflow, skipping that step: a handful of skips at the start of a run (and one
now and then) is its normal calibration, not a sign of divergence. Only a non-finite loss (computed
in fp32, so no scale is involved), or gradients that overflow even once the scale has fallen below
1 (i.e. unscaled), are real non-finite steps. Without a scaler every non-finite step is real.

Under DeepSpeed accelerate makes no GradScaler: DeepSpeed's own dynamic loss scaler skips the step on an
overflow (the engine's `overflow` flag) and lowers its scale, down to `min_loss_scale` (1 by default, so the
rule above would never fire). There an overflow is calibration while the scaler can still lower its scale, and
a real non-finite step once it sits at its floor (or has a static scale).
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


def is_bad_deepspeed_fp16_step(loss_finite: bool, overflow: bool, scale: float, min_scale: float, dynamic: bool) -> bool:
    """True when a DeepSpeed fp16 step's non-finite values are real: a non-finite loss, or an overflow the loss
    scaler cannot answer by lowering its scale (static, or already at `min_scale`)."""
    if not loss_finite:
        return True
    return overflow and (not dynamic or scale <= min_scale)
