"""Input pipeline throughput: our WebDataset train stream vs the previous one, a per-file folder DataLoader and a bare loop.

Generates synthetic 512 px grayscale radiograph-like images (smooth blobs + noise), writes them as
JPEG tar shards (with a manifest) and as per-file PNG and JPEG folders, then measures img/s at the
given training size, all in the same run and with the same worker counts:

  (a) train_loader: the canonical, topology-independent order (data/order.py), batches formed in the workers
  (a') the previous train stream (per-rank shard split and buffer shuffle), loaded from git (--baseline-rev)
  (b) a map-style Dataset over per-file PNG (and JPEG) folders + DataLoader(shuffle=True), same transforms
  (c) decode + augment in a plain loop in one process (no pipeline): the per-core ceiling

plus the time to the first batch of a stream resumed after more and more samples (a seek: it must not grow with
them), and the JPEG draft-decode speed-up on the eval path. Prints ratios; with --results, writes a markdown
section into that file (replacing only this benchmark's own section).

    python bench/bench_stream.py --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cxrdist.data.manifest import Manifest, ShardInfo, SplitInfo
from cxrdist.data.shards import file_sha256
from cxrdist.data.spec import ImageSpec
from cxrdist.data.stream import StreamConfig, augment_rng, train_loader
from cxrdist.data.transforms import decode_grayscale, eval_draft_side, eval_transform, train_draft_side, train_transform

SECTION = "## Input pipeline: train stream vs per-file folder (bench/bench_stream.py)"
REPO = Path(__file__).resolve().parents[1]
BASELINE_REV = "3db5508"  # the last commit with the previous (topology-bound) train stream


def baseline_stream(rev: str) -> types.ModuleType:
    """cxrdist/data/stream.py as it was at `rev`, imported under its own name beside today's package."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:cxrdist/data/stream.py"], capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("baseline_stream")
    module.__file__ = f"{rev}:cxrdist/data/stream.py"
    sys.modules[module.__name__] = module  # dataclasses resolve their annotations through sys.modules
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def first_batch_seconds(make_loader, start_batch: int) -> float:
    """Time to the first batch of a loader resumed at `start_batch` (a fresh iterator: the resume's whole cost)."""
    tic = time.perf_counter()
    next(iter(make_loader(start_batch)))
    return time.perf_counter() - tic


def synthetic_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random blobs (a bicubic-upsampled coarse field) plus pixel noise."""
    coarse = rng.uniform(0, 255, (8, 8)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    noisy = smooth + rng.normal(0, 8, (size, size))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def make_data(root: Path, n: int, size: int, per_shard: int) -> tuple[Manifest, list[bytes]]:
    rng = np.random.default_rng(0)
    for sub in ("png", "jpg", "shards/fold-0"):
        (root / sub).mkdir(parents=True)
    jpegs, shards = [], []
    for start in range(0, n, per_shard):
        rel = f"fold-0/shard-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(root / "shards" / rel), encoder=False) as writer:
            for i in range(start, min(n, start + per_shard)):
                pixels = synthetic_image(rng, size)
                jpeg, png = encode(pixels, "JPEG"), encode(pixels, "PNG")
                jpegs.append(jpeg)
                (root / "jpg" / f"img{i:05d}.jpg").write_bytes(jpeg)
                (root / "png" / f"img{i:05d}.png").write_bytes(png)
                meta = json.dumps({"labels": [int(i % 2), None, -1], "patient": f"p{i}", "study": "s", "view": "PA", "path": f"img{i:05d}.png"})
                writer.write({"__key__": f"img{i:05d}", "jpg": jpeg, "json": meta.encode()})
        digest, nbytes = file_sha256(root / "shards" / rel)  # the streams check every shard they read against it
        shards.append(ShardInfo(rel, min(n, start + per_shard) - start, nbytes, digest))
    manifest = Manifest(
        labels=["A", "B", "C"], splits={"fold-0": SplitInfo(n, n, shards)}, num_folds=1, seed=0,
        source={"name": "bench"}, image={"format": "jpg", "max_size": size, "quality": 95},
    )
    return manifest, jpegs


class FolderDataset(Dataset):
    """The usual per-file baseline: one image file per sample, decoded and augmented in __getitem__."""

    def __init__(self, files: list[Path], cfg: StreamConfig):
        self.files, self.cfg = files, cfg

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        pixels = decode_grayscale(self.files[index].read_bytes(), train_draft_side(self.cfg.image.size))
        image = train_transform(pixels, augment_rng(self.cfg.seed, 0, self.files[index].stem), self.cfg.image)
        return image, torch.tensor([float(index % 2), float("nan"), -1.0])


def rate(batches, count: int) -> float:
    """img/s over `count` batches after one warm-up batch (worker start and buffer fill excluded)."""
    iterator = iter(batches)
    next(iterator)
    start, images = time.perf_counter(), 0
    for batch in islice(iterator, count):
        images += len(batch["key"]) if isinstance(batch, dict) else len(batch[0])
    return images / (time.perf_counter() - start)


def loop_rate(blobs: list[bytes], cfg: StreamConfig, repeat: int = 1) -> float:
    torch.set_num_threads(1)
    start = time.perf_counter()
    for r in range(repeat):
        for i, blob in enumerate(blobs):
            train_transform(decode_grayscale(blob, train_draft_side(cfg.image.size)), augment_rng(0, r, str(i)), cfg.image)
    return repeat * len(blobs) / (time.perf_counter() - start)


def eval_rate(blobs: list[bytes], cfg: StreamConfig, draft: bool) -> float:
    torch.set_num_threads(1)
    start = time.perf_counter()
    for blob in blobs:
        eval_transform(decode_grayscale(blob, eval_draft_side(cfg.image) if draft else None), cfg.image)
    return len(blobs) / (time.perf_counter() - start)


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in text:  # replace only our own section (up to the next "## " heading)
        head, _, rest = text.partition(SECTION)
        tail = rest.find("\n## ")
        text = head.rstrip("\n") + "\n\n" + body + ("\n" + rest[tail:] if tail >= 0 else "\n")
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--size", type=int, default=512, help="stored image side")
    parser.add_argument("--img-size", type=int, default=256, help="training input side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--partitions", type=int, nargs="+", default=[4, 48],
                        help="canonical partitions of (a); the first gives a partition about a shard or more, as a real dataset does")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision whose cxrdist/data/stream.py is (a')")
    parser.add_argument("--rounds", type=int, default=3, help="(a) and (a') measured this many times, interleaved; the best counts")
    parser.add_argument("--results", type=Path, help="markdown file to write this benchmark's section into")
    parser.add_argument("--machine", default="2-core CPU VM (AMD EPYC), shared with other jobs")
    parser.add_argument("--date", default="2026-11-27")
    args = parser.parse_args()

    previous = baseline_stream(args.baseline_rev)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tic = time.perf_counter()
        manifest, jpegs = make_data(root, args.n, args.size, args.per_shard)
        print(f"made {args.n} images of {args.size} px in {time.perf_counter() - tic:.1f} s "
              f"(JPEG q95 {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB each)")
        count = args.n // args.batch - 1  # about one pass, after the warm-up batch
        cfg = StreamConfig(ImageSpec(args.img_size), batch_size=args.batch, shuffle_buffer=1000)
        pngs, jpgs = sorted((root / "png").iterdir()), sorted((root / "jpg").iterdir())
        shards = root / "shards"

        def canonical(workers: int, partitions: int, start: int = 0):
            wcfg = StreamConfig(**{**cfg.__dict__, "workers": workers, "partitions": partitions})
            return train_loader(shards, manifest, ["fold-0"], wcfg, 0, 1, start_batch=start)

        def old(workers: int, start: int = 0):
            wcfg = previous.StreamConfig(ImageSpec(args.img_size), batch_size=args.batch, shuffle_buffer=1000, workers=workers)
            return previous.train_loader(shards, manifest, ["fold-0"], wcfg, 0, 1, start_batch=start)

        rows = []
        loop_jpeg = loop_rate(jpegs[:200], cfg)
        loop_png = loop_rate([p.read_bytes() for p in pngs[:200]], cfg)
        for workers in args.workers:
            # the new and the previous stream interleaved, best of `rounds`: the machine's load moves in between
            new = {p: 0.0 for p in args.partitions}
            before = 0.0
            for _ in range(args.rounds):
                for p in args.partitions:
                    new[p] = max(new[p], rate(canonical(workers, p), count))
                before = max(before, rate(old(workers), count))
            folder = {}
            for fmt, files in (("png", pngs), ("jpg", jpgs)):
                loader = DataLoader(FolderDataset(files, StreamConfig(**{**cfg.__dict__, "workers": workers})), batch_size=args.batch,
                                    shuffle=True, num_workers=workers, drop_last=True)
                folder[fmt] = rate(loader, count)
            stream = new[args.partitions[0]]
            rows.append((workers, new, before, folder["png"], folder["jpg"]))
            print(f"workers={workers}: stream {', '.join(f'P={p} {r:.0f}' for p, r in new.items())} img/s | previous stream {before:.0f} "
                  f"({stream / before:.2f}x) | PNG folder {folder['png']:.0f} | JPEG folder {folder['jpg']:.0f} | "
                  f"stream/(workers x loop) {stream / (workers * loop_jpeg):.2f}")
        starts = [0, 100, 10_000, 1_000_000]
        resume = {f"canonical, P={p}": [first_batch_seconds(lambda t, p=p: canonical(0, p, t), t) for t in starts] for p in args.partitions}
        resume["previous"] = [first_batch_seconds(lambda t: old(0, t), t) for t in starts]
        for name, seconds in resume.items():
            print(f"resume ({name}): first batch after " + ", ".join(f"{t * args.batch:,} samples {s:.2f} s" for t, s in zip(starts, seconds)))
        full, drafted = eval_rate(jpegs[:200], cfg, draft=False), eval_rate(jpegs[:200], cfg, draft=True)
        print(f"loop (1 process): JPEG decode+augment {loop_jpeg:.0f} img/s, PNG {loop_png:.0f} img/s")
        print(f"eval decode+resize to {args.img_size}: full decode {full:.0f} img/s, JPEG draft {drafted:.0f} img/s ({drafted / full:.2f}x)")
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print(load)

    first = args.partitions[0]
    lines = [
        SECTION, "",
        f"{args.date}, {args.machine}; torch {torch.__version__}, {os.cpu_count()} CPUs visible. {args.n} synthetic "
        f"{args.size} px grayscale images (JPEG q95 in tar shards of {args.per_shard}; the same pixels as per-file PNG and "
        f"JPEG folders), train transform to {args.img_size} px (random resized crop, flip, rotation, normalise), batch "
        f"{args.batch}, one pass after a warm-up batch, one rank. (a) is today's stream (the canonical order, "
        f"data/order.py) with {' and '.join(map(str, args.partitions))} canonical partitions, (a') the previous stream "
        f"(`{args.baseline_rev}:cxrdist/data/stream.py`), interleaved with (a), best of {args.rounds} rounds. Same run, same worker "
        f"counts. The CPU was shared ({load}), so ratios within a row mean more than absolute numbers.", "",
        "| workers | " + " | ".join(f"(a) P={p} img/s" for p in args.partitions) + f" | (a') previous img/s | a(P={first}) / a' | "
        f"(b) PNG folder img/s | (b') JPEG folder img/s | a / b | a / (workers x c) |",
        "|---|" + "---|" * (len(args.partitions) + 6),
    ]
    for w, new, before, png, jpg in rows:
        ours = new[first]
        lines.append(f"| {w} | " + " | ".join(f"{new[p]:.0f}" for p in args.partitions)
                     + f" | {before:.0f} | {ours / before:.2f} | {png:.0f} | {jpg:.0f} | {ours / png:.2f} | {ours / (w * loop_jpeg):.2f} |")
    lines += [
        "",
        "Resume (workers=0): time to the first batch of a stream resumed after n samples, one pass being "
        f"{args.n} samples:", "",
        "| stream | " + " | ".join(f"{t * args.batch:,} samples" for t in starts) + " |",
        "|---|" + "---|" * len(starts),
    ]
    lines += [f"| {name} | " + " | ".join(f"{s:.2f} s" for s in seconds) + " |" for name, seconds in resume.items()]
    lines += [
        "",
        f"(c) decode + augment in a plain loop, one process: JPEG {loop_jpeg:.0f} img/s, PNG {loop_png:.0f} img/s.",
        f"Eval path (decode + squash to {args.img_size}): full JPEG decode {full:.0f} img/s, `Image.draft` decode "
        f"{drafted:.0f} img/s ({drafted / full:.2f}x). The train path drafts only when the stored side is at least "
        f"2 x {train_draft_side(args.img_size)} px (so the smallest crop is never upsampled): "
        f"{'so it did here' if args.size >= 2 * train_draft_side(args.img_size) else f'not for {args.size} px images at {args.img_size}'}.",
    ]
    if args.results:
        write_section(args.results, "\n".join(lines))
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
