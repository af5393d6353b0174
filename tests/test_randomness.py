"""Dropout and drop-path masks per global micro-batch, reproducible from (seed, micro-batch): different on the ranks of
one step, the same for one micro-batch on any number of processes."""

from __future__ import annotations

import json
import subprocess

import pytest

from cxrdist.training.randomness import forward_seed
from trainer_utils import DEMO_CONFIG, LAUNCH, REPO, cpu_env, explain, fast_overrides, free_port

WORKER = REPO / "tests" / "randomness_worker.py"


def test_forward_seeds_differ_across_micro_batches_and_repeat():
    seeds = {batch: forward_seed(0, batch) for batch in range(400)}
    assert len(set(seeds.values())) == len(seeds)
    assert forward_seed(0, 37) == seeds[37] and forward_seed(1, 37) != seeds[37]
    assert all(0 <= s < 2**63 for s in seeds.values())


@pytest.mark.slow
def test_two_ranks_draw_different_dropout_masks_in_the_training_step(synth_shards, tmp_path):
    out = tmp_path / "masks.json"
    overrides = fast_overrides(synth_shards, tmp_path, **{"model.drop_rate": 0.5, "model.drop_path_rate": 0.2})
    cmd = LAUNCH + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(free_port()), str(WORKER), str(out), str(DEMO_CONFIG), *overrides]
    result = subprocess.run(cmd, env=cpu_env(2), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, explain(result)
    assert json.loads(out.read_text()) == {"ranks_differ": True, "reproducible": True, "micro_batches_differ": True}
