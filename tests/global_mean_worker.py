"""Run by tests/test_global_mean.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo):
real DDP gradients of the training loss normalisation (cxrdist/training/steps/global_mean.py). Writes JSON to argv[1]."""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from cxrdist.atomic import atomic_write_text
from cxrdist.distributed import make_accelerator
from cxrdist.model.config import LossConfig
from cxrdist.model.loss import build_loss
from cxrdist.training.steps.global_mean import GlobalMaskedMean

MICRO_BATCHES = 2


class Scalar(nn.Module):
    """One weight w = 1: the loss entries are w * value, so d(loss)/dw is the loss itself."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.w * values


def issue_example(acc) -> dict:
    """Rank 0: 10 unmasked entries of loss 1; rank 1: 2 of loss 0 (each with masked entries too); one micro-batch."""
    model = acc.prepare(Scalar())
    values = torch.ones(12) if acc.process_index == 0 else torch.zeros(12)
    mask = torch.zeros(12)
    mask[: 10 if acc.process_index == 0 else 2] = 1
    values = values + (1 - mask) * 7.0  # masked entries carry a loss that must not count
    norm = GlobalMaskedMean(acc.num_processes, 1)
    count = norm.start_group([mask], lambda t: acc.reduce(t, reduction="sum"), acc.device)
    loss = norm(torch.where(mask != 0, model(values), torch.zeros(12)).sum())
    loss.backward()
    logged = acc.reduce(loss.detach().reshape(1), reduction="mean")  # what the trainer's train record averages
    return {"count": float(count), "grad": float(acc.unwrap_model(model).w.grad), "logged_loss": float(logged)}


def linear_with_accumulation(acc) -> dict:
    """nn.Linear + the configured ASL, K=2 micro-batches per rank with different unmasked counts, through acc.accumulate."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = torch.load(os.environ["CXRDIST_GLOBAL_MEAN_DATA"])  # [rank][micro-batch] -> (x, targets, mask)
    model, optimizer = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    loss_fn = build_loss(LossConfig())
    norm = GlobalMaskedMean(acc.num_processes, MICRO_BATCHES)
    mine = data[acc.process_index]
    norm.start_group([mask for _, _, mask in mine], lambda t: acc.reduce(t, reduction="sum"), acc.device)
    for x, targets, mask in mine:
        with acc.accumulate(model):
            acc.backward(norm(loss_fn.masked_sum(model(x), targets, mask)))
    net = acc.unwrap_model(model)
    return {"weight_grad": net.weight.grad.tolist(), "bias_grad": net.bias.grad.tolist()}


def main() -> None:
    acc = make_accelerator(gradient_accumulation_steps=MICRO_BATCHES)
    assert acc.num_processes == int(os.environ["CXRDIST_EXPECT_WORLD_SIZE"]) == 2, acc.num_processes
    result = {"world_size": acc.num_processes, "issue_example": issue_example(acc), "linear": linear_with_accumulation(acc)}
    if acc.is_main_process:
        atomic_write_text(sys.argv[1], json.dumps(result))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
