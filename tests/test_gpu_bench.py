"""`bench/gpu.py --smoke`: the GPU benchmark's own code on CPU (tiny model, a handful of steps), so it never rots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainer_utils import REPO, cpu_env

pytestmark = pytest.mark.slow


def test_gpu_benchmark_smoke_mode_runs_every_part_and_passes_its_checks(tmp_path):
    out = tmp_path / "gpu-smoke.json"
    env = cpu_env(1)
    env.pop("CXRDIST_EXPECT_WORLD_SIZE")  # the benchmark sets it for the processes it launches
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--out", str(out), "--work", str(tmp_path / "work")],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke (CPU)" and report["not_run_on_cpu"]
    for part in ("a_bare", "b_trainer", "c_stream", "e_eval", "checks"):
        assert "error" not in report[part], (part, report[part])
    assert report["checks_passed"] and all(report["checks_passed"].values()), report["checks_passed"]
    assert report["b_trainer"]["world_size"] == 1 and report["b_trainer"]["steps"] >= report["profile"]["steps"]
    assert 0.0 <= report["b_trainer"]["data_wait_fraction"] <= 1.0
    assert report["e_eval"]["auc_abs_diff"] <= 1e-9 and 0.0 < report["e_eval"]["sklearn_macro_auc"] < 1.0
    assert report["checks"]["augment"] == "device" and report["ratio_trainer_over_bare"] > 0
    assert report["c_stream"]["cpu_augment_img_per_s"] > 0 and report["c_stream"]["device_augment_img_per_s"] > 0
    # torch.compile ran (aot_eager on CPU) in the process's step and in the launched trainer, in one graph each.
    assert report["checks"]["compiled"] is True and report["checks"]["graph_breaks_in_step"] == 0
    assert report["b_trainer"]["graph_breaks"] == 0
