"""fp16 loss-scale calibration skips do not count toward train.max_bad_steps; real non-finite steps do."""

from __future__ import annotations

from cxrdist.training.steps.bad_steps import is_bad_deepspeed_fp16_step, is_bad_step


def test_fp16_calibration_is_not_a_bad_step():
    # The GradScaler at 65536 overflows and skips: normal calibration.
    assert not is_bad_step(loss_finite=True, grads_finite=False, step_skipped=True, scaler_scale=65536.0)
    assert not is_bad_step(loss_finite=True, grads_finite=True, step_skipped=True, scaler_scale=2.0)


def test_real_non_finite_steps_count():
    assert is_bad_step(loss_finite=False, grads_finite=False, step_skipped=True, scaler_scale=65536.0)  # the fp32 loss is NaN
    assert is_bad_step(loss_finite=True, grads_finite=False, step_skipped=True, scaler_scale=0.5)  # overflows even unscaled
    assert is_bad_step(loss_finite=True, grads_finite=False, step_skipped=True, scaler_scale=None)  # bf16 / fp32
    assert not is_bad_step(loss_finite=True, grads_finite=True, step_skipped=False, scaler_scale=None)


def test_deepspeed_fp16_overflow_is_calibration_until_the_scaler_sits_at_its_floor():
    assert not is_bad_deepspeed_fp16_step(loss_finite=True, overflow=True, scale=2.0**15, min_scale=1.0, dynamic=True)
    assert not is_bad_deepspeed_fp16_step(loss_finite=True, overflow=False, scale=1.0, min_scale=1.0, dynamic=True)
    assert is_bad_deepspeed_fp16_step(loss_finite=True, overflow=True, scale=1.0, min_scale=1.0, dynamic=True)  # cannot go lower
    assert is_bad_deepspeed_fp16_step(loss_finite=True, overflow=True, scale=2.0**15, min_scale=1.0, dynamic=False)  # static scale
    assert is_bad_deepspeed_fp16_step(loss_finite=False, overflow=False, scale=2.0**15, min_scale=1.0, dynamic=True)
