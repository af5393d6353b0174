"""How one optimizer step is spread over the processes: the global batch, the micro-batch, the canonical partitions
(data/order.py), and what follows from them and the world size (gradient accumulation, which global micro-batch a
rank's forward is).

The optimizer sees the same global batch (the same samples) on any supported topology: `train.global_batch` samples
per step, in micro-batches of `data.batch_size` (what one forward of one process takes), so a step is
K = global_batch / batch_size micro-batches, W processes take K / W each (the gradient accumulation). A topology is
supported when W divides both K and the number of canonical partitions; any other is refused with one line naming the
world sizes that work.

`train.global_batch=0` and `data.partitions=0` mean: chosen at the run's first start (batch_size x processes x
train.grad_accum, and data/order.py's default) and recorded in its checkpoints, so a resume on another number of
processes takes the recorded values, as `data.workers=-1` takes the recorded worker count.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrdist.data.order import auto_partitions, check_world_size, served_world_sizes
from cxrdist.errors import UserError

# keys of the recorded settings (resume_settings.py)
GLOBAL_BATCH, PARTITIONS, MICRO_BATCH = "train.global_batch", "data.partitions", "data.batch_size"


@dataclass(frozen=True)
class Topology:
    world_size: int
    micro_batch: int  # samples per forward per process (data.batch_size)
    global_batch: int  # samples per optimizer step
    partitions: int  # canonical partitions of the sample order

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // self.micro_batch

    @property
    def grad_accum(self) -> int:
        """Micro-batches each process accumulates per optimizer step."""
        return self.micro_batches_per_step // self.world_size

    def global_micro_batch(self, rank: int, t: int) -> int:
        """The global index of rank `rank`'s t-th micro-batch (data/order.py's rank_micro_batch)."""
        return rank + t * self.world_size

    def first_rank_batch(self, step: int) -> int:
        """The rank-local index of the first micro-batch of optimizer step `step`."""
        return step * self.grad_accum

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.world_size} process(es) x {self.grad_accum} accumulated "
                f"micro-batch(es) of {self.micro_batch}, sample order over {self.partitions} canonical partitions")


def resolve(micro_batch: int, global_batch: int, grad_accum: int, partitions: int, world_size: int, recorded: dict,
            shard_sizes: list[int]) -> Topology:
    """The topology of this start, from the config's values (0 = auto), the world size, the settings recorded by the
    checkpoint it will resume from ({} for a fresh run) and the sizes of the shards of a pass. A world size it cannot
    serve is a UserError (one line)."""
    if global_batch and grad_accum != 1:
        raise UserError(f"train.global_batch={global_batch} and train.grad_accum={grad_accum}: set only train.global_batch "
                        "(the accumulation is derived from it, data.batch_size and the number of processes)")
    if recorded.get(MICRO_BATCH, micro_batch) != micro_batch:
        recorded = {}  # another micro-batch is another order: the resume check names the change, not this one
    batch = global_batch or recorded.get(GLOBAL_BATCH) or micro_batch * world_size * grad_accum
    samples = sum(shard_sizes)
    parts = partitions or recorded.get(PARTITIONS) or auto_partitions(world_size, samples, samples / max(1, len(shard_sizes)))
    where = "the recorded " if (not global_batch and GLOBAL_BATCH in recorded) else ""
    if batch % micro_batch or (batch // micro_batch) % world_size:
        sizes = [w for w in served_world_sizes(parts) if batch % (micro_batch * w) == 0]
        raise UserError(f"{where}train.global_batch={batch} cannot be split into {world_size} processes x whole micro-batches of "
                        f"data.batch_size={micro_batch}: run on {', '.join(map(str, sizes)) or 'another number of'} processes, "
                        "or choose a data.batch_size that divides the global batch per process")
    check_world_size(parts, world_size, where=("the recorded " if not partitions and PARTITIONS in recorded else "") + "data.partitions")
    return Topology(world_size, micro_batch, batch, parts)
