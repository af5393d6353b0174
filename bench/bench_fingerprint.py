"""The perceptual fingerprint (cxrdist/data/ingest/fingerprint.py): false matches between different radiographs, how far a
copy moves, and what it costs at 200k images.

    python bench/bench_fingerprint.py [--real DIR] [--synthetic 1000] [--scale DIR_OF_SYNTH_IMAGES]

--real: a folder of real radiographs (any PNG/JPEG under it), stored at 512 px as prepare would. --synthetic N: that many
`cxrdist synth` radiographs of 256 px. Each set: every pair of different images (false matches at MATCH_BITS) and every
image against its copies (recall). --scale: fingerprints of every image under the folder, each computed in prepare's
way; then near_pairs over all of them (the check inside prepare) and of half against half (two datasets).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cxrdist.data.ingest.fingerprint import BITS, MATCH_BITS, distance, fingerprint, near_pairs
from cxrdist.data.ingest.images import load_for_shard


def encoded(pixels: np.ndarray, fmt: str, quality: int = 95) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))


def scaled(pixels: np.ndarray, factor: float) -> np.ndarray:
    height, width = pixels.shape
    return np.asarray(Image.fromarray(pixels).resize((round(width * factor), round(height * factor)), Image.Resampling.LANCZOS))


def cropped(pixels: np.ndarray, k: int) -> np.ndarray:
    return pixels[k:-k, k:-k]


COPIES = {
    "JPEG q95": lambda p: encoded(p, "JPEG", 95),
    "JPEG q75": lambda p: encoded(p, "JPEG", 75),
    "PNG of the JPEG q95": lambda p: encoded(encoded(p, "JPEG", 95), "PNG"),
    "half size": lambda p: scaled(p, 0.5),
    "quarter size, JPEG q90": lambda p: encoded(scaled(p, 0.25), "JPEG", 90),
    "gamma 0.8": lambda p: np.clip(255 * (p / 255.0) ** 0.8, 0, 255).astype(np.uint8),
    "1 px cropped per side": lambda p: cropped(p, 1),
    "2 px cropped per side": lambda p: cropped(p, 2),
    "3 px cropped per side": lambda p: cropped(p, 3),
    "4 px cropped per side": lambda p: cropped(p, 4),
    "8 px cropped per side": lambda p: cropped(p, 8),
}


def measure(name: str, paths: list[Path], max_size: int) -> None:
    images = [load_for_shard(path, max_size) for path in paths]
    prints = np.stack([fingerprint(p) for p in images])
    apart = distance(prints[:, None, :], prints[None, :, :])[np.triu_indices(len(prints), 1)]
    false = int((apart <= MATCH_BITS).sum())
    print(f"\n{name}: {len(images)} images at {max_size} px, {apart.size:,} pairs of different images: {false} within {MATCH_BITS} bits "
          f"({false / apart.size:.2e} per pair); closest {sorted(apart.tolist())[:5]}, 0.01% quantile {np.percentile(apart, 0.01):.0f} of {BITS}")
    print("| copy | recognised | largest move (bits) |\n|---|---:|---:|")
    for label, copy in COPIES.items():
        moved = distance(np.stack([fingerprint(copy(p)) for p in images]), prints)
        print(f"| {label} | {(moved <= MATCH_BITS).mean():.0%} | {moved.max()} |")


def scale(folder: Path) -> None:
    paths = sorted(folder.rglob("*.png"))
    start = time.perf_counter()
    prints = np.stack([fingerprint(np.asarray(Image.open(p).convert("L"))) for p in paths])
    per_image = (time.perf_counter() - start) / len(paths)
    start = time.perf_counter()
    i, _ = near_pairs(prints)
    within = time.perf_counter() - start
    half = len(prints) // 2
    start = time.perf_counter()
    a, _ = near_pairs(prints[:half], prints[half:])
    between = time.perf_counter() - start
    print(f"\n{len(paths):,} images: fingerprint {1000 * per_image:.3f} ms per image (decode included); near_pairs within all "
          f"{within:.1f} s ({i.size} pairs); {half:,} against {len(prints) - half:,}: {between:.1f} s ({a.size} pairs)")


def main() -> None:
    from cxrdist.data.synth.dataset import make_synthetic_dataset

    parser = argparse.ArgumentParser()
    parser.add_argument("--real", type=Path)
    parser.add_argument("--synthetic", type=int, default=1000)
    parser.add_argument("--scale", type=Path)
    args = parser.parse_args()
    if args.real:
        measure(f"real radiographs ({args.real})", sorted(p for p in args.real.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")), 512)
    if args.synthetic:
        root = Path(tempfile.mkdtemp())
        make_synthetic_dataset(root, n=args.synthetic, size=256, seed=0, workers=2, progress=False)
        measure("synthetic radiographs", sorted((root / "images").rglob("*.png")), 256)
    if args.scale:
        scale(args.scale)


if __name__ == "__main__":
    main()
