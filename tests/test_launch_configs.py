"""The accelerate configs in launch/: each loads as it is, and the CPU one really starts 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"

# file -> (distributed_type, num_processes, num_machines, mixed_precision)
EXPECTED = {
    "cpu.yaml": (DistributedType.MULTI_GPU, 2, 1, "no"),  # + ACCELERATE_USE_CPU=1, see the file
    "single_gpu.yaml": (DistributedType.NO, 1, 1, "bf16"),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, 1, "bf16"),
    "multi_node.yaml": (DistributedType.MULTI_GPU, 16, 2, "bf16"),
    "deepspeed_zero1.yaml": (DistributedType.DEEPSPEED, 8, 1, None),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 8, 1, None),
}
AUTO_FIELDS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size")


def test_every_launch_yaml_is_covered():
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_in_accelerate(name):
    cfg = load_config_from_file(str(LAUNCH / name))
    kind, processes, machines, precision = EXPECTED[name]
    assert cfg.distributed_type == kind
    assert (cfg.num_processes, cfg.num_machines) == (processes, machines)
    if precision is not None:
        assert str(cfg.mixed_precision) == precision
    if machines > 1 or kind == DistributedType.MULTI_GPU:
        assert cfg.rdzv_backend == "static" and cfg.same_network


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_json_has_auto_fields_and_stage(stage):
    cfg = load_config_from_file(str(LAUNCH / f"deepspeed_zero{stage}.yaml"))
    ds = cfg.deepspeed_config
    # Several nodes under SLURM: one torch elastic agent per node, no pdsh/hostfile.
    assert ds["deepspeed_multinode_launcher"] == "standard"
    assert ds["zero3_init_flag"] is False
    # The JSON path is relative to the repository root, where every launch command runs.
    path = REPO / ds["deepspeed_config_file"]
    settings = json.loads(path.read_text())
    assert settings["zero_optimization"]["stage"] == stage
    for key in AUTO_FIELDS:
        assert settings[key] == "auto", key
    assert settings["bf16"]["enabled"] == "auto" and settings["fp16"]["enabled"] == "auto"
    # accelerate refuses a deepspeed_config_file together with a mixed_precision in the yaml
    # ("the following accelerate config variables will be ignored"): precision comes from the CLI.
    assert cfg.mixed_precision is None or str(cfg.mixed_precision) == "no"


RANK_PROBE = """
import os, sys
from accelerate import Accelerator
acc = Accelerator()
assert acc.num_processes == 2, acc.num_processes
open(os.path.join(sys.argv[1], f"rank-{acc.process_index}"), "w").write(f"{acc.num_processes} {acc.distributed_type}")
acc.wait_for_everyone()
"""


@pytest.mark.slow
def test_cpu_config_really_starts_two_ranks(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(RANK_PROBE)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "cpu.yaml"), str(probe), str(tmp_path)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = sorted(p.name for p in tmp_path.glob("rank-*"))
    assert ranks == ["rank-0", "rank-1"]
    assert all(p.read_text() == "2 DistributedType.MULTI_CPU" for p in tmp_path.glob("rank-*"))


DEEPSPEED_PROBE = """
import json, os, sys
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])  # CPU: gloo, or accelerate counts 1 rank
model = torch.nn.Linear(4, 2)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 2)), batch_size=4)
model, opt, data = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), data)
x, y = next(iter(data))
acc.backward(torch.nn.functional.mse_loss(model(x), y))
opt.step()
ds = acc.state.deepspeed_plugin.deepspeed_config
out = {"world": acc.num_processes, "type": str(acc.distributed_type), "stage": ds["zero_optimization"]["stage"],
       "micro": ds["train_micro_batch_size_per_gpu"], "bf16": ds["bf16"]["enabled"]}
open(os.path.join(sys.argv[1], f"rank-{acc.process_index}.json"), "w").write(json.dumps(out))
"""


@pytest.mark.slow
def test_deepspeed_zero2_config_trains_a_step_on_two_cpu_ranks(tmp_path):
    """Real DeepSpeed through the yaml + JSON (first run JIT-builds DeepSpeed's shm op: ~1 min, cached)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")  # accelerate 1.15's DeepSpeed path checks its version
    probe = tmp_path / "probe.py"
    probe.write_text(DEEPSPEED_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # that variable drops DeepSpeed
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "deepspeed_zero2.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", str(probe), str(tmp_path)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank-*.json"))]
    expected = {"world": 2, "type": "DistributedType.DEEPSPEED", "stage": 2, "micro": 4, "bf16": False}
    assert results == [expected, expected]
