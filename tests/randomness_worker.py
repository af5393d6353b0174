"""Run by tests/test_randomness.py under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo): the real
Trainer's training step on the SAME micro-batch on both ranks, with dropout on (the masks come from the global
micro-batch index, which differs). Writes JSON to argv[1] (rank 0)."""

from __future__ import annotations

import json
import sys

import torch

from cxrdist.atomic import atomic_write_text
from cxrdist.training.config import load_config
from cxrdist.training.loop import Trainer, Window
from cxrdist.training.randomness import model_randomness


def main(out: str, config: str, overrides: list[str]) -> None:
    trainer = Trainer(load_config(config, overrides))
    acc, cfg = trainer.accelerator, trainer.cfg
    assert acc.num_processes == 2
    generator = torch.Generator().manual_seed(5)  # the same batch on both ranks
    labels = len(trainer.labels)
    batch = {"image": torch.randn(4, 3, cfg.data.img_size, cfg.data.img_size, generator=generator),
             "labels_raw": torch.randint(0, 2, (4, labels), generator=generator).float(), "key": ["a", "b", "c", "d"], "corrupt": 0}
    image = trainer.to_input(batch["image"])

    def forward(micro_batch: int) -> torch.Tensor:
        with torch.no_grad(), model_randomness(cfg.seed, micro_batch, acc.device):
            return trainer.net(image)

    trainer.net.train()
    first = acc.process_index  # the rank's first micro-batch is global micro-batch `rank` (data/order.py)
    expected, again, next_one = forward(first), forward(first), forward(first + acc.num_processes)
    seen = []
    hook = trainer.net.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    trainer.train_batch(trainer.next_micro_batch(iter([batch])), Window())  # micro-batch 0 of the real training step
    hook.remove()
    gathered = acc.gather(seen[0][None])
    if acc.is_main_process:
        atomic_write_text(out, json.dumps({
            "ranks_differ": not torch.equal(gathered[0], gathered[1]),
            "reproducible": torch.equal(expected, again) and torch.equal(expected, seen[0]),
            "micro_batches_differ": not torch.equal(expected, next_one),
        }))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
