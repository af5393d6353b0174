"""The training loss is one masked mean over every rank's and micro-batch's unmasked entries
(cxrdist/training/steps/global_mean.py): real 2-process DDP gradients against one process."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cxrdist.model.config import LossConfig
from cxrdist.model.loss import build_loss
from cxrdist.training.steps.global_mean import GlobalMaskedMean
from trainer_utils import LAUNCH, REPO, cpu_env, free_port

WORKER = REPO / "tests" / "global_mean_worker.py"


def accumulation_data() -> list:
    """[rank][micro-batch] -> (x, targets, mask): unmasked counts 11, 2 (rank 0) and 7, 12 (rank 1) of 12."""
    generator = torch.Generator().manual_seed(1)
    data = []
    for counts in ((11, 2), (7, 12)):
        batches = []
        for count in counts:
            x = torch.randn(4, 4, generator=generator)
            targets = (torch.rand(4, 3, generator=generator) > 0.5).float()
            mask = torch.zeros(12)
            mask[torch.randperm(12, generator=generator)[:count]] = 1
            batches.append((x, targets, mask.reshape(4, 3)))
        data.append(batches)
    return data


def one_process_gradient(data: list) -> nn.Linear:
    """The oracle: the masked mean of every entry of both ranks' micro-batches, in one autograd pass."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    batches = [b for rank in data for b in rank]
    x, targets, mask = (torch.cat([b[i] for b in batches]) for i in range(3))
    build_loss(LossConfig())(model(x), targets, mask).backward()
    return model


def test_single_process_group_is_the_plain_masked_mean():
    loss_fn = build_loss(LossConfig())
    logits, targets = torch.randn(5, 3), (torch.rand(5, 3) > 0.5).float()
    mask = (torch.rand(5, 3) > 0.3).float()
    norm = GlobalMaskedMean(world_size=1, micro_batches=1)
    assert norm.start_group([mask], lambda t: t, "cpu") == int(mask.sum())
    assert torch.allclose(norm(loss_fn.masked_sum(logits, targets, mask)), loss_fn(logits, targets, mask))


def test_two_processes_give_the_global_mean(tmp_path):
    import subprocess

    data_file, out = tmp_path / "data.pt", tmp_path / "result.json"
    data = accumulation_data()
    torch.save(data, data_file)
    cmd = LAUNCH + ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_machines", "1",
                    "--main_process_port", str(free_port()), str(WORKER), str(out)]
    run = subprocess.run(cmd, env=cpu_env(2, CXRDIST_GLOBAL_MEAN_DATA=data_file, PYTHONPATH=REPO), capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2

    # The example: 10 entries of loss 1 on one rank, 2 of loss 0 on the other -> 10/12, not (1 + 0) / 2.
    example = result["issue_example"]
    assert example["count"] == 12
    assert example["grad"] == pytest.approx(10 / 12, abs=1e-6)
    assert example["logged_loss"] == pytest.approx(10 / 12, abs=1e-6)

    # K=2 micro-batches per rank through acc.accumulate + DDP: the gradient of the one-process global masked mean.
    oracle = one_process_gradient(data)
    assert torch.allclose(torch.tensor(result["linear"]["weight_grad"]), oracle.weight.grad, atol=1e-6)
    assert torch.allclose(torch.tensor(result["linear"]["bias_grad"]), oracle.bias.grad, atol=1e-6)
