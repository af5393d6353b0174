"""Worker CPU time per image: per-sample CPU augmentation vs `data.augment: device` (workers only decode).

Both paths run `stream.decode_train_batch` (what a DataLoader worker runs) on the same 512 px JPEG
samples at the paper's 380 px, one torch thread, interleaved rounds, and the CPU time of this
process is measured (`time.process_time`). The device path's batched grid_sample is timed apart: on
a GPU it runs on the accelerator, here on the CPU only for reference.

    python bench/bench_augment.py [--n 96] [--img-size 380] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
from bench_stream import synthetic_image
from PIL import Image

from cxrdist.data.device_augment import augment_batch
from cxrdist.data.shards import RawSample
from cxrdist.data.spec import ImageSpec
from cxrdist.data.stream import StreamConfig, decode_train_batch


def raw_samples(n: int, size: int) -> list[tuple[int, RawSample]]:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(synthetic_image(rng, size)).save(buffer, format="JPEG", quality=95)
        meta = json.dumps({"labels": [0] * 14}).encode()
        samples.append((0, RawSample(f"img{i:05d}", buffer.getvalue(), meta)))
    return samples


def cpu_seconds_per_image(samples: list, cfg: StreamConfig) -> float:
    start = time.process_time()
    for i in range(0, len(samples), cfg.batch_size):
        decode_train_batch(samples[i : i + cfg.batch_size], cfg, 14)
    return (time.process_time() - start) / len(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--size", type=int, default=512, help="stored image side (px)")
    parser.add_argument("--img-size", type=int, default=380)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    samples = raw_samples(args.n, args.size)
    cpu_cfg = StreamConfig(ImageSpec(args.img_size), batch_size=args.batch)
    device_cfg = StreamConfig(**{**cpu_cfg.__dict__, "augment": "device"})
    rounds = [(cpu_seconds_per_image(samples, cpu_cfg), cpu_seconds_per_image(samples, device_cfg)) for _ in range(args.rounds)]
    cpu, device = min(r[0] for r in rounds), min(r[1] for r in rounds)
    batch = decode_train_batch(samples[: args.batch], device_cfg, 14)
    augment_batch(batch["image"], batch["augment"], cpu_cfg.image)  # warm-up
    start = time.perf_counter()
    augment_batch(batch["image"], batch["augment"], cpu_cfg.image)
    grid_ms = (time.perf_counter() - start) * 1000 / args.batch
    print(f"{args.size} px JPEG -> {args.img_size} px, batch {args.batch}, {args.n} images, best of {args.rounds} interleaved rounds, 1 thread")
    print(f"worker CPU ms/image: cpu augment {cpu * 1000:.2f}, device augment (decode + pad only) {device * 1000:.2f}; ratio {device / cpu:.2f}")
    print(f"the batched grid_sample itself, run on this CPU: {grid_ms:.2f} ms/image")


if __name__ == "__main__":
    main()
