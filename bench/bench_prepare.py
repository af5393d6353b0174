"""Prepare throughput: 1024 px 8-bit PNG radiographs -> 512 px JPEG shards, images/s per worker count.

    python bench/bench_prepare.py [--n 240]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from PIL import Image


def make_images(root: Path, n: int) -> Path:
    from cxrdist.data.synth.dataset import make_synthetic_dataset

    csv = make_synthetic_dataset(root / "raw", n=n, size=256, seed=0, workers=2, progress=False)
    for png in (root / "raw" / "images").rglob("*.png"):  # the synthetic images, upscaled to 1024 px
        Image.open(png).resize((1024, 1024), Image.BICUBIC).save(png, compress_level=6)
    return csv


def main() -> None:
    from cxrdist.data.ingest.prepare import PrepareOptions, prepare

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=240)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    csv = make_images(root, args.n)
    print("| workers | images | seconds | img/s | img/s per worker |")
    for workers in (1, 2):
        start = time.perf_counter()
        prepare(PrepareOptions(source="csv", csv=csv, images=root / "raw" / "images", out=root / f"shards{workers}", folds=2,
                               max_size=512, samples_per_shard=60, workers=workers, progress=False))
        seconds = time.perf_counter() - start
        print(f"| {workers} | {args.n} | {seconds:.1f} | {args.n / seconds:.1f} | {args.n / seconds / workers:.1f} |")


if __name__ == "__main__":
    main()
