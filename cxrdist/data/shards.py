"""Writing and verifying WebDataset tar shards: deterministic bytes, atomic files, parallel workers."""

from __future__ import annotations

import hashlib
import json
import math
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from cxrdist.atomic import atomic_open
from cxrdist.data.ingest.fingerprint import WORDS, fingerprint
from cxrdist.data.ingest.images import encode_image, load_for_shard
from cxrdist.data.location import Location, ShardReadFailed, display, is_url, join, open_shard, shard_root
from cxrdist.data.manifest import Manifest, ShardInfo
from cxrdist.errors import BadImage, UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


class RawSample(NamedTuple):
    key: str
    image: bytes | None  # None when the sample has no image member (counted as corrupt later)
    meta: bytes | None

SHARD_PATTERN = "shard-{:06d}.tar"


@dataclass(frozen=True)
class SampleSpec:
    """Everything needed to write one sample; `labels` are raw (1/0/-1/None); `attributes` are (name, value) pairs
    (cxrdist/data/attributes.py)."""

    key: str
    path: str
    patient: str
    study: str
    view: str
    labels: tuple
    attributes: tuple = ()


@dataclass(frozen=True)
class ShardJob:
    images_root: str
    target: str  # final path of the shard
    samples: tuple[SampleSpec, ...]
    fmt: str
    max_size: int
    quality: int
    skip_bad: bool
    pool: str = ""  # a folder where encode_images stored every sample's image as KEY.fmt: packed as they are


@dataclass(frozen=True)
class EncodeJob:
    """Read, resize and encode images into `pool` (KEY.fmt each), before any fold is computed."""

    images_root: str
    pool: str
    samples: tuple[tuple[str, str], ...]  # (key, path relative to images_root)
    fmt: str
    max_size: int
    quality: int
    skip_bad: bool


@dataclass
class EncodeResult:
    keys: list[str]
    fingerprints: np.ndarray  # (len(keys), fingerprint.WORDS) uint64, data/ingest/fingerprint.py
    bad: list[tuple[str, str]]  # (path, why) of images skipped


@dataclass
class ShardResult:
    target: str
    num_samples: int
    bytes: int
    sha256: str
    keys: list[str]
    bad: list[tuple[str, str]]  # (path, why) of images skipped


def make_keys(paths: Sequence[str]) -> list[str]:
    """Unique, dot-free sample keys derived from the image paths (WebDataset splits names at the first dot)."""
    keys: list[str] = []
    seen: set[str] = set()
    for path in paths:
        stem = re.sub(r"\.[A-Za-z0-9]+$", "", path)
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "img"
        key, n = base, 1
        while key in seen:
            key, n = f"{base}_{n}", n + 1
        seen.add(key)
        keys.append(key)
    return keys


def sample_json(spec: SampleSpec) -> bytes:
    meta = {"labels": list(spec.labels), "patient": spec.patient, "study": spec.study, "view": spec.view, "path": spec.path,
            "attributes": dict(spec.attributes)}
    return json.dumps(meta, sort_keys=True).encode()


def encode_images(job: EncodeJob) -> EncodeResult:
    """Every sample's stored image into the pool, and its fingerprint; a bad image raises, or with skip_bad is listed."""
    keys, prints, bad = [], [], []
    for key, path in job.samples:
        try:
            pixels = load_for_shard(Path(job.images_root) / path, job.max_size)
        except BadImage as err:
            if not job.skip_bad:
                raise
            bad.append((path, str(err)))
            continue
        (Path(job.pool) / f"{key}.{job.fmt}").write_bytes(encode_image(pixels, job.fmt, job.quality))
        keys.append(key)
        prints.append(fingerprint(pixels))
    return EncodeResult(keys, np.array(prints, dtype=np.uint64).reshape(len(keys), WORDS), bad)


def write_shard(job: ShardJob) -> ShardResult:
    """Write one shard under a temporary name, then rename it into place."""
    target = Path(job.target)
    keys, bad = [], []
    with atomic_open(target, "wb") as handle:
        writer = wds.TarWriter(handle, encoder=False, mtime=0.0, user="cxrdist", group="cxrdist", format=tarfile.USTAR_FORMAT)
        try:
            for spec in job.samples:
                if job.pool:
                    image = (Path(job.pool) / f"{spec.key}.{job.fmt}").read_bytes()
                    writer.write({"__key__": spec.key, job.fmt: image, "json": sample_json(spec)})
                    keys.append(spec.key)
                    continue
                try:
                    pixels = load_for_shard(Path(job.images_root) / spec.path, job.max_size)
                except BadImage as err:
                    if not job.skip_bad:
                        raise
                    bad.append((spec.path, str(err)))
                    continue
                image = encode_image(pixels, job.fmt, job.quality)
                writer.write({"__key__": spec.key, job.fmt: image, "json": sample_json(spec)})
                keys.append(spec.key)
        finally:
            writer.close()
    digest, size = file_sha256(target)
    return ShardResult(str(target), len(keys), size, digest, keys, bad)


def file_sha256(path: Path | str) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open_shard(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
            size += len(block)
    return sha.hexdigest(), size


def plan_shards(samples: Sequence[SampleSpec], split_dir: Path, samples_per_shard: int) -> list[tuple[str, tuple[SampleSpec, ...]]]:
    """Cut a split's samples into equal-sized shards (sizes differ by at most one)."""
    count = max(1, math.ceil(len(samples) / samples_per_shard))
    bounds = np.linspace(0, len(samples), count + 1).round().astype(int)
    return [(str(split_dir / SHARD_PATTERN.format(i)), tuple(samples[bounds[i] : bounds[i + 1]])) for i in range(count)]


def run_jobs(jobs: list[ShardJob], workers: int, on_done: Callable[[ShardResult], None]) -> list[ShardResult]:
    """Write shards, in parallel when workers > 1; results come back in job order."""
    return run_parallel(write_shard, jobs, workers, on_done)


def run_parallel(function: Callable, jobs: list, workers: int, on_done: Callable) -> list:
    """function(job) for every job, in worker processes when workers > 1; results in job order."""
    results = []
    if workers <= 1:
        for job in jobs:
            results.append(function(job))
            on_done(results[-1])
        return results
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(function, jobs):
            results.append(result)
            on_done(result)
    return results


def iter_tar_members(path: Path | str, only: str | None = None) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, data) for every member (with `only`, the members with that extension), keys split at the
    first dot as WebDataset does; one sequential pass. A local file is opened seekable, so the data of members that
    `only` leaves out is skipped by seeking, not read; a URL is streamed."""
    with open_shard(path) as handle, tarfile.open(fileobj=handle, mode="r|" if is_url(path) else "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if only is None or ext == only:
                yield key, ext, tar.extractfile(member).read()


def verify_shards(root: Path, manifest: Manifest) -> dict:
    """Re-read every shard (file or URL) and check sha256, sample counts, keys and labels against the manifest."""
    try:
        return verify_each_shard(shard_root(root), manifest)
    except ShardReadFailed as err:
        raise UserError(err.line) from None
    except tarfile.TarError as err:
        raise UserError(f"{display(root)}: unreadable shard ({err})") from None


def verify_each_shard(root: Path | str, manifest: Manifest) -> dict:
    seen: dict[str, str] = {}
    totals = {"shards": 0, "samples": 0}
    for split_name, split in manifest.splits.items():
        split_count = 0
        for shard in split.shards:
            path = join(root, shard.file)
            digest, size = file_sha256(path)
            if digest != shard.sha256 or size != shard.bytes:
                raise UserError(f"{display(path)}: sha256/size differ from the manifest (file changed or corrupt)")
            keys = check_shard_members(path, manifest, split_name)
            if len(keys) != shard.num_samples:
                raise UserError(f"{display(path)}: {len(keys)} samples, manifest says {shard.num_samples}")
            for key in keys:
                if key in seen:
                    raise UserError(f"{display(path)}: key {key!r} also appears in {seen[key]}")
                seen[key] = shard.file
            split_count += len(keys)
            totals["shards"] += 1
        if split_count != split.num_samples:
            raise UserError(f"split {split_name}: {split_count} samples in shards, manifest says {split.num_samples}")
        totals["samples"] += split_count
    return totals


def check_shard_members(path: Location, manifest: Manifest, split_name: str) -> list[str]:
    image_ext = manifest.image["format"]
    members: dict[str, dict[str, bytes]] = {}
    for key, ext, data in iter_tar_members(path):
        members.setdefault(key, {})[ext] = data
    for key, parts in members.items():
        if set(parts) != {image_ext, "json"}:
            raise UserError(f"{display(path)}: sample {key!r} has members {sorted(parts)}, expected {image_ext} and json")
        try:
            labels = json.loads(parts["json"])["labels"]
        except (ValueError, KeyError):
            raise UserError(f"{display(path)}: sample {key!r} has an unreadable json member") from None
        if len(labels) != len(manifest.labels):
            raise UserError(f"{display(path)}: sample {key!r} has {len(labels)} labels, manifest has {len(manifest.labels)}")
    return list(members)


def read_shard(path: Location, expected: ShardInfo | None = None) -> Iterator[RawSample]:
    """The raw samples of one tar shard (a file or a URL), in order (WebDataset's grouping); with `expected` (the manifest's
    entry), the sample count, size and sha256 must match it once the shard has been read: a shard replaced by another one
    (on a server, in a bucket) stops the reader instead of being trained or evaluated on."""
    count = 0
    try:
        with open_shard(path) as handle:
            stream = DigestingReader(handle)
            for sample in group_by_keys(tar_file_expander([{"url": display(path), "stream": stream}])):
                count += 1
                image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
                yield RawSample(sample["__key__"], image, sample.get("json"))
            stream.drain()  # tar's end-of-archive padding, so the digest covers the whole file
    except ShardReadFailed as err:
        raise UserError(err.line) from None
    except (tarfile.TarError, OSError, ValueError) as err:
        why = err.args[0] if err.args else type(err).__name__
        raise UserError(f"{display(path)}: unreadable shard ({why}); re-run `cxrdist prepare`") from None
    if expected is None:
        return
    if count != expected.num_samples:
        raise UserError(f"{display(path)}: {count} samples, manifest says {expected.num_samples} (shard changed; re-run `cxrdist prepare`)")
    if stream.size != expected.bytes or stream.digest.hexdigest() != expected.sha256:
        raise UserError(f"{display(path)}: sha256/size differ from the manifest (another or a changed shard; "
                        "`cxrdist verify` the shard directory, re-upload or re-run `cxrdist prepare`)")


class DigestingReader:
    """A read-only stream that hashes the bytes passing through it."""

    def __init__(self, handle) -> None:
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def read_shard_samples(path: Location) -> Iterator[tuple[str, bytes, dict]]:
    """(key, image bytes, decoded metadata) per sample, for readers that want the json as a dict."""
    for sample in read_shard(path):
        yield sample.key, sample.image, json.loads(sample.meta)


def shard_info(result: ShardResult, root: Path) -> ShardInfo:
    return ShardInfo(
        file=str(Path(result.target).relative_to(root)),
        num_samples=result.num_samples,
        bytes=result.bytes,
        sha256=result.sha256,
        first_key=result.keys[0] if result.keys else "",
        last_key=result.keys[-1] if result.keys else "",
    )
