"""Rank-aware WebDataset streams for training (infinite, in the canonical order, resumable) and evaluation (finite, exact).

Train: the order of samples is data/order.py's canonical order, a function of the shards, the seed, data.partitions,
data.shuffle_buffer (a partition's shuffle window) and data.batch_size (the micro-batch), never of the number of
processes or loader workers. Rank r takes global micro-batches r, r+W, r+2W, ...; its DataLoader hands out batches
round-robin over its workers (loader batch i from worker i % n), so worker w makes the rank's micro-batches w, w+n, ...
and reads only the canonical partitions they come from. Raw (undecoded) samples are read from whole shards (each one's
sha256 and count checked), windows permuted, micro-batches cut, then decoded, augmented (a per-sample RNG of the seed,
pass and key) and collated in the worker.

Resume at the rank's micro-batch t: every partition a worker needs is opened where its next micro-batch begins (a known
shard, sample and window), not replayed from the start of the epoch. Iterate a train loader ONCE and keep the iterator
across epochs: a new iterator restarts at `start_batch`.

Eval: the held-out shards in manifest order, rank r takes shards[r::W], worker w the rank's [w::n]; samples in shard
order; every sample exactly once across ranks and workers.

Neither loader goes through `accelerator.prepare` (that would shard the data a second time).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import chain, count, islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cxrdist.data.datasets import DatasetShard, root_dataset_name
from cxrdist.data.location import Location, join, shard_root
from cxrdist.data.manifest import Manifest, ShardInfo
from cxrdist.data.order import CanonicalOrder, Piece, auto_partitions, check_world_size, rank_micro_batch
from cxrdist.data.shards import RawSample, read_shard
from cxrdist.data.spec import ImageSpec
from cxrdist.data.transforms import decode_grayscale, draw_train_params, eval_draft_side, eval_transform, train_draft_side, train_transform
from cxrdist.errors import UserError

AUGMENT_STREAM = 3  # the first word of the augmentation seeds (data/order.py's streams are 1 and 2)
PREFETCH_BATCHES = 2
AUGMENT_PLACES = ("cpu", "device")
EVAL_META = ("patient", "path", "dataset", "attributes")  # sample json fields an eval batch carries to the predictions


@dataclass
class StreamConfig:
    image: ImageSpec  # what the transforms make of every image
    batch_size: int = 32
    workers: int = 4
    shuffle_buffer: int = 1000  # samples a canonical partition shuffles at a time
    seed: int = 0
    partitions: int = 0  # canonical partitions of the train order (data/order.py); 0 = order.auto_partitions
    augment: str = "cpu"  # train augmentation in the workers ("cpu") or batched on the accelerator ("device")


# ---------------------------------------------------------------- reading shards


def read_shards(root: Location, shards: Iterable[ShardInfo]) -> Iterator[RawSample]:
    return chain.from_iterable(shard_samples(root, shard) for shard in shards)


def shard_samples(root: Location, shard: ShardInfo) -> Iterator[RawSample]:
    """A shard's raw samples, checked against the manifest's entry; one of several datasets (data/datasets.py) reads
    itself, namespaced and relabelled."""
    if isinstance(shard, DatasetShard):
        return shard.samples()
    return read_shard(join(root, shard.file), shard)


# ---------------------------------------------------------------- train: canonical partitions (data/order.py)


def piece_samples(root: Location, shards: Sequence[ShardInfo], piece: Piece) -> Iterator[RawSample]:
    """Samples [start, stop) of a shard. The shard is read to its end, so its sha256 and count are checked although
    only part of it is used (a partition may begin or end inside a shard)."""
    for index, sample in enumerate(shard_samples(root, shards[piece.shard])):
        if piece.start <= index < piece.stop:
            yield sample


def partition_samples(root: Location, shards: Sequence[ShardInfo], order: CanonicalOrder, partition: int, pass_index: int,
                      offset: int) -> Iterator[tuple[int, RawSample]]:
    """(pass, raw sample) of one canonical partition from (pass, offset) on, endlessly: each window of its slice read,
    permuted and handed out; a start inside a window reads that window from its first sample (undecoded)."""
    window = order.window
    while True:
        first = offset // window
        pieces = order.pieces(pass_index, partition, first * window)
        samples = chain.from_iterable(piece_samples(root, shards, piece) for piece in pieces)
        for index, chunk in enumerate(batched(samples, window), start=first):
            permutation = order.window_order(pass_index, partition, index, len(chunk))
            skip = offset - first * window if index == first else 0
            for position in permutation[skip:]:
                yield pass_index, chunk[position]
        pass_index, offset = pass_index + 1, 0


def partition_micro_batches(root: Location, shards: Sequence[ShardInfo], order: CanonicalOrder, partition: int,
                            first: int) -> Iterator[list[tuple[int, RawSample]]]:
    """The partition's raw micro-batches from its micro-batch `first` on (seeking, not replaying, to where it begins)."""
    pass_index, offset = order.micro_batch_start(partition, first)
    return batched(partition_samples(root, shards, order, partition, pass_index, offset), order.micro)


class PartitionCursors:
    """One reader's open partitions: raw micro-batch k of partition q, each partition read forward only."""

    def __init__(self, root: Location, shards: Sequence[ShardInfo], order: CanonicalOrder) -> None:
        self.root, self.shards, self.order = root, shards, order
        self.open: dict[int, tuple[int, Iterator]] = {}  # partition -> (index of its next micro-batch, iterator)

    def take(self, partition: int, index: int) -> list[tuple[int, RawSample]]:
        if partition not in self.open:
            self.open[partition] = (index, partition_micro_batches(self.root, self.shards, self.order, partition, index))
        position, batches = self.open[partition]
        if index < position:
            raise ValueError(f"partition {partition}: micro-batch {index} asked for after {position - 1} (a reader goes forward only)")
        for _ in range(index - position):  # micro-batches of the workers this one shares the partition with
            next(batches)
        self.open[partition] = (index + 1, batches)
        return next(batches)


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
    min_side = eval_draft_side(cfg.image)
    for raw in raw_batch:
        decoded = decode_sample(raw, num_labels, min_side)
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
    """Rank `rank`'s micro-batches of the canonical order, from its micro-batch `start_batch` on (data/order.py)."""

    def __init__(self, root: Path, shards: list[ShardInfo], num_labels: int, cfg: StreamConfig, rank: int, world_size: int, start_batch: int):
        self.root, self.shards, self.num_labels, self.cfg = shard_root(root), shards, num_labels, cfg
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.order = canonical_order(shards, cfg, world_size)

    def __iter__(self) -> Iterator[dict]:
        # Loader batch i comes from worker i % n: this worker makes the rank's micro-batches start + worker + n*u.
        worker, workers = worker_slot()
        cursors = PartitionCursors(self.root, self.shards, self.order)
        for t in count(self.start_batch + worker, workers):
            _, partition, index = rank_micro_batch(self.rank, self.world_size, self.order.partitions, t)
            raw_batch = cursors.take(partition, index)
            with decoding_context():
                batch = decode_train_batch(raw_batch, self.cfg, self.num_labels)
            yield batch


def canonical_order(shards: Sequence[ShardInfo], cfg: StreamConfig, world_size: int) -> CanonicalOrder:
    sizes = tuple(shard.num_samples for shard in shards)
    partitions = cfg.partitions or auto_partitions(world_size, sum(sizes), sum(sizes) / max(1, len(sizes)))
    return CanonicalOrder(sizes, cfg.seed, partitions, max(1, cfg.shuffle_buffer), cfg.batch_size)


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


def steps_per_epoch(manifest: Manifest, splits: list[str], global_batch: int) -> int:
    """Optimizer steps per epoch: whole global batches over one pass of the data, whatever the topology."""
    num_samples = manifest.num_samples(splits)
    if num_samples < global_batch:
        raise UserError(f"{num_samples} training samples are fewer than one optimizer step takes (train.global_batch "
                        f"{global_batch}); lower train.global_batch or data.batch_size")
    return num_samples // global_batch


def train_shards(manifest: Manifest, splits: list[str]) -> list[ShardInfo]:
    """The shards the canonical order is made of: each as often as its dataset's weight says, empty ones left out."""
    return [shard for shard in manifest.weighted_shards(splits) if shard.num_samples > 0]


def train_loader(root: Path, manifest: Manifest, splits: list[str], cfg: StreamConfig, rank: int, world_size: int,
                 start_batch: int = 0) -> DataLoader:
    """This rank's endless micro-batches of the canonical order; `start_batch` resumes at the rank's micro-batch of that
    index (its t-th is global micro-batch rank + t * world_size)."""
    check_config(cfg, rank, world_size)
    if start_batch < 0:
        raise UserError(f"start_batch must be >= 0, got {start_batch}")
    dataset = TrainStream(root, train_shards(manifest, splits), len(manifest.labels), cfg, rank, world_size, start_batch)
    check_world_size(dataset.order.partitions, world_size)
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
