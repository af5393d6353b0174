"""Trainer overhead on CPU: the full trainer step (ASL + refinement + clipping + proximal step + EMA
through accelerate) against a bare timm forward/backward/AdamW loop on the same model, batch and size.

    python bench/bench_trainer.py [--backbone resnet18] [--img-size 128] [--batch 32] [--steps 20]

Data loading is excluded from both (bench_stream.py measures it); the ratio is what matters.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import timm
import torch

os.environ.setdefault("WANDB_MODE", "disabled")


def bare_loop(backbone: str, images: torch.Tensor, targets: torch.Tensor, steps: int) -> float:
    torch.manual_seed(0)
    model = timm.create_model(backbone, pretrained=False, num_classes=targets.shape[1]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, steps)


def trainer_loop(backbone: str, images: torch.Tensor, raw: torch.Tensor, steps: int, shards: Path) -> float:
    from cxrdist.training.config import load_config
    from cxrdist.training.loop import Trainer, Window

    out = tempfile.mkdtemp()
    cfg = load_config(None, [f"data.shards={shards}", f"output_dir={out}", f"model.backbone={backbone}", f"data.img_size={images.shape[-1]}",
                             f"data.batch_size={images.shape[0]}", "logging.wandb=disabled", "logging.progress=false", "train.mixed_precision=no"])
    trainer = Trainer(cfg)
    batch = {"image": images, "labels_raw": raw, "key": [f"k{i}" for i in range(len(images))], "corrupt": 0}
    window = Window()
    batches = itertools.repeat(batch)
    return timed(lambda: trainer.train_batch(trainer.next_micro_batch(batches), window), steps)


def timed(step, steps: int) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def make_shards(root: Path, batch: int) -> Path:
    from cxrdist.data.ingest.prepare import PrepareOptions, prepare
    from cxrdist.data.synth.dataset import make_synthetic_dataset

    csv = make_synthetic_dataset(root / "raw", n=max(6 * batch, 200), size=64, seed=0, progress=False)
    prepare(PrepareOptions(source="csv", csv=csv, images=root / "raw" / "images", out=root / "shards", folds=2, max_size=64, progress=False))
    return root / "shards"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    shards = make_shards(Path(tempfile.mkdtemp()), args.batch)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    raw = torch.randint(-1, 2, (args.batch, 14)).float()
    targets = raw.clamp(min=0)
    rounds = []
    for _ in range(2):  # interleaved, so drifting machine load hits both alike
        bare = bare_loop(args.backbone, images, targets, args.steps)
        full = trainer_loop(args.backbone, images, raw, args.steps, shards)
        rounds.append((bare, full))
    bare, full = min(r[0] for r in rounds), min(r[1] for r in rounds)
    print(f"| {args.backbone} | {args.img_size} | {args.batch} | {torch.get_num_threads()} | "
          f"{bare * 1000:.0f} | {full * 1000:.0f} | {full / bare:.3f} |")


if __name__ == "__main__":
    main()
