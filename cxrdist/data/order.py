"""The global order of training samples: a pure function of the shards, the seed and four numbers, never of how many
processes or DataLoader workers read them (MosaicML Streaming's "elastic determinism", over WebDataset tar shards).

The canonical order (`CanonicalOrder`):
- Pass p lines the train shards up in a (seed, p) permutation: one sequence of N samples (N from the manifest's
  counts), rotated by a (seed, p) offset so that partition boundaries fall elsewhere in the shards each pass.
- Canonical partition q of P takes the slice [q*N//P, (q+1)*N//P) of that sequence: the same length every pass.
- A partition shuffles its slice in windows of `window` samples (one (seed, p, q, window) permutation each), and its
  passes follow each other endlessly; its stream is cut into micro-batches of `micro` samples (one may span two passes).
- Global micro-batch j is micro-batch j // P of partition j % P; optimizer step s is global micro-batches
  [s*K, (s+1)*K), K = global batch / micro.

Who reads what (`rank_micro_batch`): rank r of W takes global micro-batches j = r + t*W, t = 0, 1, ... (its t-th), so
it reads only the partitions q = r (mod W): W must divide P (`check_world_size`). Its DataLoader worker w of n makes
the rank's micro-batches t = w (mod n): whole partitions when n divides P/W; otherwise a worker reads the partitions it
shares with other workers and skips their micro-batches undecoded. A step then holds the same samples (and each
micro-batch the same samples, so BatchNorm sees the same batches) on 1, 2, 4, ... processes with any worker count.

Seeking (`pieces`, `micro_batch_start`): micro-batch k of a partition starts at pass k*micro // size, offset
k*micro % size; the window holding that offset starts at a known shard and sample within it, so a resume reads one
shard and one window per partition, however many samples the run has seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from math import lcm
from typing import NamedTuple

import numpy as np

from cxrdist.errors import UserError

# Distinct first words keep the seed sequences of the different random streams apart (stream.py's augmentation is 3).
PASS_LAYOUT_STREAM, WINDOW_STREAM = 1, 2
# The partitions of a run whose data.partitions is 0 (auto, `auto_partitions`): this many serve 1, 2, 3, 4, 6, 8, 12, 16,
# 24 and 48 processes; a world size it cannot serve gets the least common multiple of the two, a small dataset fewer.
DEFAULT_PARTITIONS = 48
SMALLER_DEFAULTS = (24, 16, 12, 8, 4, 2)  # for small datasets; each serves 1, 2 and (from 4 on) 4 processes


class Piece(NamedTuple):
    """Samples [start, stop) of train shard `shard` (an index into the run's train shard list)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class CanonicalOrder:
    sizes: tuple[int, ...]  # samples per train shard, in the run's shard order (a weighted shard listed as often as it counts)
    seed: int
    partitions: int
    window: int  # samples a partition shuffles at a time (data.shuffle_buffer)
    micro: int  # samples per micro-batch (data.batch_size)

    def __post_init__(self) -> None:
        if self.partitions < 1 or self.window < 1 or self.micro < 1:
            raise ValueError(f"partitions, window and micro must be >= 1, got {self.partitions}, {self.window}, {self.micro}")
        if self.total < self.partitions:
            raise UserError(f"{self.total} training samples cannot fill data.partitions={self.partitions} "
                            "(each canonical partition needs a sample per pass): lower data.partitions")

    @cached_property
    def total(self) -> int:
        return sum(self.sizes)

    def bounds(self, partition: int) -> tuple[int, int]:
        """The partition's slice of every pass's (rotated) sequence."""
        return partition * self.total // self.partitions, (partition + 1) * self.total // self.partitions

    def partition_size(self, partition: int) -> int:
        start, stop = self.bounds(partition)
        return stop - start

    def pass_layout(self, pass_index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(shard order, where each shard of that order starts in the pass's sequence, rotation) of one pass."""
        rng = np.random.default_rng([PASS_LAYOUT_STREAM, self.seed, pass_index])
        order = rng.permutation(len(self.sizes))
        starts = np.concatenate([[0], np.cumsum(np.asarray(self.sizes, dtype=np.int64)[order])])
        return order, starts, int(rng.integers(self.total))

    def pieces(self, pass_index: int, partition: int, offset: int = 0) -> list[Piece]:
        """The shard pieces of the partition's slice in pass `pass_index`, from `offset` within the slice to its end."""
        order, starts, rotation = self.pass_layout(pass_index)
        start, stop = self.bounds(partition)
        first = (rotation + start + offset) % self.total
        length = stop - start - offset
        spans = [(first, min(first + length, self.total))]
        if first + length > self.total:  # the slice wraps around the end of the pass's sequence
            spans.append((0, first + length - self.total))
        found = []
        for lo, hi in spans:
            slot = int(np.searchsorted(starts, lo, side="right")) - 1
            while lo < hi:
                shard_start, shard_stop = int(starts[slot]), int(starts[slot + 1])
                take = min(hi, shard_stop)
                if take > lo:
                    found.append(Piece(int(order[slot]), lo - shard_start, take - shard_start))
                lo, slot = take, slot + 1
        return found

    def window_order(self, pass_index: int, partition: int, window_index: int, length: int) -> np.ndarray:
        """The permutation of one window of a partition's slice."""
        return np.random.default_rng([WINDOW_STREAM, self.seed, pass_index, partition, window_index]).permutation(length)

    def micro_batch_start(self, partition: int, index: int) -> tuple[int, int]:
        """(pass, offset in the partition's slice) where the partition's micro-batch `index` begins."""
        return divmod(index * self.micro, self.partition_size(partition))


def rank_micro_batch(rank: int, world_size: int, partitions: int, t: int) -> tuple[int, int, int]:
    """(global micro-batch j, partition, index in the partition) of rank `rank`'s t-th micro-batch."""
    j = rank + t * world_size
    return j, j % partitions, j // partitions


def served_world_sizes(partitions: int, limit: int = 64) -> list[int]:
    return [w for w in range(1, min(partitions, limit) + 1) if partitions % w == 0]


def auto_partitions(world_size: int, samples: int, shard_samples: float = 1.0) -> int:
    """data.partitions=0: the default count; fewer for a dataset whose partitions would hold less than a shard (every
    reader reads whole shards, for their checksums: smaller partitions re-read them), the largest of SMALLER_DEFAULTS
    it fills; then, for a world size that count cannot serve, the least common multiple of both. So fresh runs on any
    number of processes that divides the count choose the same one."""
    fits = next((p for p in (DEFAULT_PARTITIONS, *SMALLER_DEFAULTS) if samples >= p * shard_samples), 1)
    return lcm(fits, world_size)


def check_world_size(partitions: int, world_size: int, where: str = "data.partitions") -> None:
    """Each rank reads whole canonical partitions: refuse a world size that does not divide their number."""
    if partitions % world_size:
        sizes = ", ".join(map(str, served_world_sizes(partitions)))
        raise UserError(f"{where}={partitions} canonical partitions cannot be split evenly over {world_size} processes "
                        f"(the sample order is defined over them, every rank reads whole ones): run on {sizes} processes, "
                        f"or start a new run with data.partitions set to a multiple of {world_size}")
