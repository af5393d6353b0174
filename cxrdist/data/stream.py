"""Rank-aware WebDataset streams for training (infinite, shuffled, resumable) and evaluation (finite, exact).

Units: rank r of W, DataLoader worker w of n (workers=0 is one unit in the main process).

Train, per pass p = 0, 1, 2, ...: every rank permutes the train shards with the same (seed, p) RNG,
rank r takes perm[r::W]; worker w takes the rank's shards [w::n] when the rank has at least n of
them, else every worker reads all of the rank's shards and keeps samples i % n == w (no worker is
ever empty). A shuffle buffer, reset each pass and seeded from (seed, p, r, w), reorders the raw
(undecoded) samples; raw batches are cut from the endless concatenation of passes inside the
worker (so every batch is full), then decoded, augmented and collated. The DataLoader hands out
batches round-robin over workers: loader batch i comes from worker i % n, so a rank's batch
sequence is a pure function of (manifest, seed, r, W, n, batch_size). Every rank draws the same
number of batches per epoch (`batches_per_epoch`) from its endless stream, so none runs dry.

Resume at batch B: worker w skips its first #{i < B : i % n == w} raw batches without decoding,
jumping straight to the right pass by the manifest's counts. Iterate a train loader ONCE and keep
the iterator across epochs: a new iterator restarts at `start_batch`.

Eval: the held-out shards in manifest order, rank r takes shards[r::W], worker w the rank's
[w::n]; samples in shard order; every sample exactly once across ranks and workers.

Neither loader goes through `accelerator.prepare` (that would shard the data a second time).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cxrdist.data.datasets import DatasetShard, root_dataset_name
from cxrdist.data.location import Location, join, shard_root
from cxrdist.data.manifest import Manifest, ShardInfo
from cxrdist.data.shards import RawSample, read_shard
from cxrdist.data.spec import ImageSpec
from cxrdist.data.transforms import decode_grayscale, draw_train_params, eval_transform, train_draft_side, train_transform
from cxrdist.errors import UserError

# Distinct first words keep the seed sequences of the different random streams apart.
SHARD_ORDER_STREAM, SHUFFLE_STREAM, AUGMENT_STREAM = 1, 2, 3
PREFETCH_BATCHES = 2
AUGMENT_PLACES = ("cpu", "device")
EVAL_META = ("patient", "path", "dataset", "attributes")  # sample json fields an eval batch carries to the predictions


@dataclass
class StreamConfig:
    image: ImageSpec  # what the transforms make of every image
    batch_size: int = 32
    workers: int = 4
    shuffle_buffer: int = 1000
    seed: int = 0
    augment: str = "cpu"  # train augmentation in the workers ("cpu") or batched on the accelerator ("device")


@dataclass(frozen=True)
class Unit:
    """One reader: DataLoader worker `worker` of `workers` on rank `rank` of `world_size`."""

    rank: int
    world_size: int
    worker: int
    workers: int


# ---------------------------------------------------------------- reading shards


def read_shards(root: Location, shards: Iterable[ShardInfo]) -> Iterator[RawSample]:
    return chain.from_iterable(shard_samples(root, shard) for shard in shards)


def shard_samples(root: Location, shard: ShardInfo) -> Iterator[RawSample]:
    """A shard's raw samples, checked against the manifest's entry; one of several datasets (data/datasets.py) reads
    itself, namespaced and relabelled."""
    if isinstance(shard, DatasetShard):
        return shard.samples()
    return read_shard(join(root, shard.file), shard)


# ---------------------------------------------------------------- train: which unit reads what, per pass


def pass_shard_order(num_shards: int, seed: int, pass_index: int) -> list[int]:
    """The permutation of the train shards for one pass; identical on every rank."""
    return np.random.default_rng([SHARD_ORDER_STREAM, seed, pass_index]).permutation(num_shards).tolist()


def unit_pass_plan(num_shards: int, seed: int, pass_index: int, unit: Unit) -> tuple[list[int], bool]:
    """(shard indices the unit reads in this pass, whether it keeps only every n-th sample of them)."""
    rank_shards = pass_shard_order(num_shards, seed, pass_index)[unit.rank :: unit.world_size]
    if len(rank_shards) >= unit.workers:
        return rank_shards[unit.worker :: unit.workers], False
    return rank_shards, True


def unit_pass_count(sizes: Sequence[int], seed: int, pass_index: int, unit: Unit) -> int:
    """How many raw samples the unit gets in this pass, from the manifest's counts alone."""
    indices, sample_split = unit_pass_plan(len(sizes), seed, pass_index, unit)
    total = sum(sizes[i] for i in indices)
    return len(range(unit.worker, total, unit.workers)) if sample_split else total


def unit_pass_samples(root: Path, shards: Sequence[ShardInfo], seed: int, pass_index: int, unit: Unit) -> Iterator[RawSample]:
    """The unit's raw samples of one pass, before shuffling."""
    indices, sample_split = unit_pass_plan(len(shards), seed, pass_index, unit)
    samples = read_shards(root, [shards[i] for i in indices])
    return islice(samples, unit.worker, None, unit.workers) if sample_split else samples


def shuffle_buffer(items: Iterable, rng: np.random.Generator, size: int, initial: int) -> Iterator:
    """WebDataset's buffer shuffle, driven by `rng`: starts emitting after `initial` items, grows to `size`."""
    items = iter(items)
    size, initial = max(1, size), max(1, min(initial, size))
    buffer: list = []

    def pick():
        k = int(rng.integers(len(buffer)))
        buffer[k], buffer[-1] = buffer[-1], buffer[k]
        return buffer.pop()

    for item in items:
        buffer.append(item)
        if len(buffer) < size:  # take two, give one, until the buffer is full
            buffer.extend(islice(items, 1))
        if len(buffer) >= initial:
            yield pick()
    while buffer:
        yield pick()


def unit_train_samples(
    root: Path, shards: Sequence[ShardInfo], seed: int, buffer: int, unit: Unit, skip: int = 0
) -> Iterator[tuple[int, RawSample]]:
    """(pass, raw sample) for the unit, endlessly, after skipping `skip` samples.

    A pass's order is a pure function of (seed, pass, rank, worker), so whole passes are skipped by
    count and only the pass the skip ends in is read (not decoded) up to that point.
    """
    sizes = [shard.num_samples for shard in shards]
    pass_index = 0
    while True:
        count = unit_pass_count(sizes, seed, pass_index, unit)
        if skip >= count:
            skip -= count
        else:
            rng = np.random.default_rng([SHUFFLE_STREAM, seed, pass_index, unit.rank, unit.worker])
            samples = shuffle_buffer(unit_pass_samples(root, shards, seed, pass_index, unit), rng, buffer, buffer // 10)
            for sample in islice(samples, skip, None):
                yield pass_index, sample
            skip = 0
        pass_index += 1


def batches_before(start_batch: int, worker: int, workers: int) -> int:
    """#{i < start_batch : i % workers == worker}: how many of the first loader batches a worker made."""
    return len(range(worker, start_batch, workers))


def check_train_shards(shards: Sequence[ShardInfo], world_size: int, workers: int) -> None:
    """Refuse layouts where a rank or a worker could get no sample in some pass (it would stall forever)."""
    if len(shards) < world_size:
        raise UserError(
            f"{len(shards)} non-empty training shards cannot be split over {world_size} ranks; "
            f"re-run `cxrdist prepare` with a smaller --samples-per-shard"
        )
    fewest_shards = len(shards) // world_size
    if fewest_shards < workers:
        fewest_samples = sum(sorted(shard.num_samples for shard in shards)[:fewest_shards])
        if fewest_samples < workers:
            raise UserError(
                f"a rank may get only {fewest_samples} training samples per pass, fewer than its {workers} "
                f"loader workers; use fewer workers"
            )


# ---------------------------------------------------------------- decoding and collating


def parse_labels(meta: dict, num_labels: int) -> np.ndarray:
    """Raw labels (1/0/-1/null) from a sample's decoded json as float32, NaN for blank."""
    labels = meta["labels"]
    if len(labels) != num_labels:
        raise ValueError(f"{len(labels)} labels, manifest has {num_labels}")
    return np.array([np.nan if value is None else float(value) for value in labels], dtype=np.float32)


def augment_rng(seed: int, pass_index: int, key: str) -> np.random.Generator:
    """The per-sample augmentation RNG: depends on the sample and the pass, not on who reads it."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    words = [int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")]
    return np.random.default_rng([AUGMENT_STREAM, seed, pass_index, *words])


def decode_sample(raw: RawSample, num_labels: int, min_side: int) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(grayscale image, labels, the sample's json) or None for a corrupt sample (image or json unreadable)."""
    try:
        if raw.image is None:
            raise ValueError("no image member")
        if raw.meta is None:
            raise ValueError("no json member")
        meta = json.loads(raw.meta)
        return decode_grayscale(raw.image, min_side), parse_labels(meta, num_labels), meta
    except Exception:  # noqa: BLE001 - any decoder failure means a corrupt sample, which the trainer counts
        return None


def collate(keys: list[str], images: list[torch.Tensor], labels: list[np.ndarray], corrupt_keys: list[str], cfg: StreamConfig,
            num_labels: int) -> dict:
    if images:
        image, labels_raw = torch.stack(images), torch.from_numpy(np.stack(labels))
    else:  # every sample of the batch was corrupt: still a batch, so all ranks keep the same count
        image = torch.empty(0, cfg.image.channels, cfg.image.size, cfg.image.size)
        labels_raw = torch.empty(0, num_labels)
    return {"image": image, "labels_raw": labels_raw, "key": keys, "corrupt": len(corrupt_keys), "corrupt_keys": corrupt_keys}


def decode_train_batch(raw_batch: list[tuple[int, RawSample]], cfg: StreamConfig, num_labels: int) -> dict:
    keys, images, labels, corrupt, params = [], [], [], [], []
    min_side = train_draft_side(cfg.image.size)
    for pass_index, raw in raw_batch:
        decoded = decode_sample(raw, num_labels, min_side)
        if decoded is None:
            corrupt.append(raw.key)
            continue
        keys.append(raw.key)
        rng = augment_rng(cfg.seed, pass_index, raw.key)
        if cfg.augment == "device":
            images.append(decoded[0])
            params.append(draw_train_params(*decoded[0].shape, rng))
        else:
            images.append(train_transform(decoded[0], rng, cfg.image))
        labels.append(decoded[1])
    if cfg.augment == "device":
        return collate_for_device(keys, images, params, labels, corrupt, cfg, num_labels)
    return collate(keys, images, labels, corrupt, cfg, num_labels)


def collate_for_device(keys: list[str], images: list[np.ndarray], params: list[tuple], labels: list[np.ndarray], corrupt_keys: list[str],
                       cfg: StreamConfig, num_labels: int) -> dict:
    """Decoded images edge-padded into one uint8 canvas (B, 1, H, W) at their top-left corner, with their
    augmentation parameters (B, 6) for `device_augment.augment_batch` (edge padding keeps bilinear taps
    just outside an image from reading black)."""
    height = max((image.shape[0] for image in images), default=cfg.image.size)
    width = max((image.shape[1] for image in images), default=cfg.image.size)
    canvas = np.empty((len(images), 1, height, width), dtype=np.uint8)
    for slot, image in zip(canvas, images):
        h, w = image.shape
        slot[0, :h, :w] = image
        slot[0, :h, w:] = image[:, -1:]
        slot[0, h:, :] = slot[0, h - 1 : h, :]
    return {
        "image": torch.from_numpy(canvas), "augment": torch.tensor(params, dtype=torch.float32).reshape(-1, 6),
        "labels_raw": torch.from_numpy(np.stack(labels)) if labels else torch.empty(0, num_labels),
        "key": keys, "corrupt": len(corrupt_keys), "corrupt_keys": corrupt_keys,
    }


def decode_eval_batch(raw_batch: list[RawSample], cfg: StreamConfig, num_labels: int, hflip: bool) -> dict:
    """Like a train batch, plus each sample's `meta` (EVAL_META fields of its json: patient, path, dataset, attributes) for the
    outputs and the subgroup audit; a train batch never carries attributes (they must not reach the model or the loss)."""
    keys, images, labels, corrupt, meta = [], [], [], [], {name: [] for name in EVAL_META}
    for raw in raw_batch:
        decoded = decode_sample(raw, num_labels, cfg.image.size)
        if decoded is None:
            corrupt.append(raw.key)
            continue
        keys.append(raw.key)
        images.append(eval_transform(decoded[0], cfg.image, hflip=hflip))
        labels.append(decoded[1])
        for name in EVAL_META:
            meta[name].append(decoded[2].get(name) or ({} if name == "attributes" else ""))
    return {**collate(keys, images, labels, corrupt, cfg, num_labels), "meta": meta}


def batched(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


def worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@contextmanager
def one_intra_op_thread():
    """Per-image ops are too small for torch's thread pool: on a busy CPU two threads made them ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decoding_context():
    # DataLoader workers already run one torch thread each; only the main process (workers=0) needs it.
    return one_intra_op_thread() if get_worker_info() is None and torch.get_num_threads() > 1 else nullcontext()


# ---------------------------------------------------------------- datasets and loaders


class TrainStream(IterableDataset):
    def __init__(self, root: Path, shards: list[ShardInfo], num_labels: int, cfg: StreamConfig, rank: int, world_size: int, start_batch: int):
        self.root, self.shards, self.num_labels, self.cfg = shard_root(root), shards, num_labels, cfg
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    def __iter__(self) -> Iterator[dict]:
        loader_worker, workers = worker_slot()
        # The resumed loader's worker 0 makes global batch start_batch, so it plays worker start_batch % n.
        worker = (loader_worker + self.start_batch) % workers
        unit = Unit(self.rank, self.world_size, worker, workers)
        skip = batches_before(self.start_batch, worker, workers) * self.cfg.batch_size
        samples = unit_train_samples(self.root, self.shards, self.cfg.seed, self.cfg.shuffle_buffer, unit, skip)
        for raw_batch in batched(samples, self.cfg.batch_size):
            with decoding_context():
                batch = decode_train_batch(raw_batch, self.cfg, self.num_labels)
            yield batch


class EvalStream(IterableDataset):
    def __init__(self, root: Path, shards: list[ShardInfo], num_labels: int, cfg: StreamConfig, hflip: bool):
        self.root, self.shards, self.num_labels, self.cfg, self.hflip = shard_root(root), shards, num_labels, cfg, hflip

    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_slot()
        samples = read_shards(self.root, self.shards[worker::workers])
        default_dataset = root_dataset_name(self.root)
        for raw_batch in batched(samples, self.cfg.batch_size):
            with decoding_context():
                batch = decode_eval_batch(raw_batch, self.cfg, self.num_labels, self.hflip)
            batch["meta"]["dataset"] = [name or default_dataset for name in batch["meta"]["dataset"]]
            yield batch


def check_config(cfg: StreamConfig, rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")
    if cfg.augment not in AUGMENT_PLACES:
        raise UserError(f"data.augment must be one of {', '.join(AUGMENT_PLACES)}, got {cfg.augment!r}")
    if cfg.batch_size < 1 or cfg.workers < 0:
        raise UserError(f"batch_size must be >= 1 and workers >= 0 (got {cfg.batch_size}, {cfg.workers})")


def resolve_workers(workers: int) -> int:
    """data.workers, with -1 = auto: the CPUs this process may use, shared by the processes on this node
    (LOCAL_WORLD_SIZE, set by the launcher), one left for the training process itself; at most 16."""
    if workers >= 0:
        return workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, per_process - 1))


def make_loader(dataset: IterableDataset, workers: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # the workers batch themselves
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=PREFETCH_BATCHES if workers else None,
        persistent_workers=False,
        # A private generator: making an iterator must not draw from the trainer's global torch RNG.
        generator=torch.Generator().manual_seed(seed),
    )


def batches_per_epoch(manifest: Manifest, splits: list[str], world_size: int, batch_size: int, grad_accum: int = 1) -> int:
    """Loader batches each rank takes per epoch: whole optimizer steps over ~one pass of the data, same on every rank."""
    num_samples = manifest.num_samples(splits)
    per_step = world_size * batch_size * grad_accum
    steps = num_samples // per_step
    if steps < 1:
        raise UserError(
            f"{num_samples} training samples are fewer than one optimizer step takes "
            f"({world_size} ranks x batch {batch_size} x grad_accum {grad_accum} = {per_step}); lower the batch size"
        )
    return steps * grad_accum


def train_loader(root: Path, manifest: Manifest, splits: list[str], cfg: StreamConfig, rank: int, world_size: int,
                 start_batch: int = 0) -> DataLoader:
    """This rank's endless, shuffled, augmented batches; `start_batch` resumes as if that many were consumed."""
    check_config(cfg, rank, world_size)
    if start_batch < 0:
        raise UserError(f"start_batch must be >= 0, got {start_batch}")
    shards = [shard for shard in manifest.weighted_shards(splits) if shard.num_samples > 0]
    check_train_shards(shards, world_size, max(1, cfg.workers))
    dataset = TrainStream(root, shards, len(manifest.labels), cfg, rank, world_size, start_batch)
    return make_loader(dataset, cfg.workers, cfg.seed)


def eval_loader(root: Path, manifest: Manifest, splits: list[str], cfg: StreamConfig, rank: int, world_size: int, hflip: bool = False) -> DataLoader:
    """This rank's share of the held-out samples, each exactly once across ranks, unshuffled, keyed."""
    check_config(cfg, rank, world_size)
    rank_shards = [shard for shard in manifest.shards(splits) if shard.num_samples > 0][rank::world_size]
    workers = min(cfg.workers, len(rank_shards))  # no idle worker processes; 0 shards -> empty main-process loader
    dataset = EvalStream(root, rank_shards, len(manifest.labels), cfg, hflip)
    return make_loader(dataset, workers, cfg.seed)


def eval_num_samples(manifest: Manifest, splits: list[str], rank: int, world_size: int) -> int:
    """How many samples (corrupt ones included) this rank's eval loader reads."""
    shards = [shard for shard in manifest.shards(splits) if shard.num_samples > 0]
    return sum(shard.num_samples for shard in shards[rank::world_size])
