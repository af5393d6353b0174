"""fp16 under DeepSpeed (ZeRO-2, 2 CPU processes): the overflow skips of DeepSpeed's own dynamic loss scaler while it
calibrates are not bad steps; a real non-finite loss is, and `train.max_bad_steps` of them in a row stop the run."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from trainer_utils import DEMO_CONFIG, LAUNCH, REPO, TRAIN, cpu_env, explain, fast_overrides, free_port, records

pytestmark = pytest.mark.slow

INITIAL_SCALE_POWER = 30  # 2^30: the scaled gradients of any model overflow fp16 at first
NAN_AFTER = 30  # training micro-batches (= optimizer steps) before the loss turns NaN on every rank
MAX_BAD_STEPS = 4


def fp16_supported() -> bool:
    """DeepSpeed's CPU accelerator offers fp16 only where oneDNN has fp16 kernels (e.g. avx512_fp16)."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def test_deepspeed_fp16_scaler_calibration_is_not_a_bad_step_but_a_nan_loss_is(synth_shards, tmp_path):
    pytest.importorskip("deepspeed")
    if not fp16_supported():
        pytest.skip("DeepSpeed's CPU accelerator has no fp16 on this CPU")
    config = json.loads((REPO / "launch" / "deepspeed_zero2.json").read_text())  # the shipped dynamic scaler (hysteresis 2, floor 1)
    config["fp16"]["initial_scale_power"] = INITIAL_SCALE_POWER
    (tmp_path / "zero2_fp16.json").write_text(json.dumps(config))
    env = cpu_env(2, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests" / "nan_loss"), os.environ.get("PYTHONPATH")])),
                  CXRDIST_TEST_NAN_LOSS_AFTER=NAN_AFTER)  # the checkout under test stays first for `import cxrdist`
    env.pop("ACCELERATE_USE_CPU")  # that variable silently drops DeepSpeed
    cmd = LAUNCH + ["--config_file", str(REPO / "launch" / "deepspeed_zero2.yaml"), "--deepspeed_config_file", str(tmp_path / "zero2_fp16.json"),
                    "--num_processes", "2", "--mixed_precision", "fp16", "--main_process_port", str(free_port()),
                    str(TRAIN), "--config", str(DEMO_CONFIG),
                    *fast_overrides(synth_shards, tmp_path, **{"train.epochs": 5, "train.eval_every": 1000, "train.max_bad_steps": MAX_BAD_STEPS,
                                                                 "train.mixed_precision": "fp16",  # demo.yaml's "no" would win
                                                                 # LayerNorm: on a CPU, DeepSpeed's fp16 weights meet BatchNorm's fp32 statistics
                                                                 # in a kernel that refuses mixed types (test_resnet fails at its first forward)
                                                                 "model.backbone": "test_convnext"})]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)

    assert (tmp_path / "demo" / "fold-0" / "metrics.jsonl").is_file(), explain(result)
    train = records(tmp_path / "demo" / "fold-0", "train")
    assert train and {r["world_size"] for r in train} == {2}, explain(result)
    calibrating = [r for r in train if r["step"] <= NAN_AFTER]
    assert [r["bad_steps_total"] for r in calibrating] == [0] * len(calibrating), explain(result)
    scales = [r["loss_scale"] for r in calibrating]
    # DeepSpeed's scaler really overflowed: from 2^30 it halved at each of more than max_bad_steps steps in a row
    # (it lowers the scale only on its overflow flag), and none of those skips counted.
    assert scales[0] == 2.0**INITIAL_SCALE_POWER and scales[MAX_BAD_STEPS + 1] <= 2.0 ** (INITIAL_SCALE_POWER - MAX_BAD_STEPS), scales
    assert len(calibrating) == NAN_AFTER and scales[-1] == scales[-2], scales  # calibrated before the loss turned NaN
    # The NaN losses count, one per step, and max_bad_steps of them in a row stop the run with one line.
    assert [r["bad_steps_total"] for r in train if r["step"] > NAN_AFTER] == list(range(1, MAX_BAD_STEPS))
    assert result.returncode != 0, explain(result)  # the trainers exit 2; accelerate's launcher reports 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("cxrdist train: error:")]
    assert errors and f"{MAX_BAD_STEPS} optimizer steps in a row had non-finite gradients (by step {NAN_AFTER + MAX_BAD_STEPS})" in errors[0], \
        explain(result)
