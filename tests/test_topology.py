"""How a step is spread over the processes (training/topology.py): the accumulation derived from the global batch and
the world size, the auto values taken from a resumed checkpoint, one line for a topology that cannot be served."""

from __future__ import annotations

import pytest

from cxrdist.errors import UserError
from cxrdist.training.cluster.elastic import check_max_restarts, restart_sentence, restarts_left
from cxrdist.training.topology import resolve


@pytest.mark.parametrize("world_size, accum", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_the_accumulation_keeps_the_global_batch_on_every_world_size(world_size, accum):
    topology = resolve(micro_batch=32, global_batch=256, grad_accum=1, partitions=0, world_size=world_size, recorded={}, shard_sizes=[100] * 100)
    assert (topology.grad_accum, topology.global_batch, topology.partitions) == (accum, 256, 48)
    assert topology.grad_accum * world_size * 32 == 256
    # the micro-batches of step 3 over the ranks are global micro-batches 24..31, each exactly once
    rank_batches = [topology.global_micro_batch(r, topology.first_rank_batch(3) + a) for r in range(world_size) for a in range(accum)]
    assert sorted(rank_batches) == list(range(24, 32))


def test_auto_values_are_the_first_starts_and_a_resume_keeps_them():
    first = resolve(32, 0, 2, 0, 8, {}, [100] * 100)
    assert (first.global_batch, first.grad_accum, first.partitions) == (512, 2, 48)
    recorded = {"train.global_batch": 512, "data.partitions": 48, "data.batch_size": 32}
    fewer = resolve(32, 0, 2, 0, 2, recorded, [100] * 100)
    assert (fewer.global_batch, fewer.grad_accum, fewer.partitions) == (512, 8, 48)
    assert resolve(32, 0, 1, 0, 64, {}, [100] * 200).partitions == 192  # a world size 48 cannot serve: the least common multiple
    # a small dataset: partitions of at least a shard each (fewer re-read shards), the same on 1, 2 and 4 processes
    assert {resolve(4, 0, 1, 0, w, {}, [70] * 6).partitions for w in (1, 2, 4)} == {4}


@pytest.mark.parametrize("args, words", [
    ((32, 256, 2, 0, 4, {}), "set only train.global_batch"),
    ((32, 256, 1, 0, 3, {}), "train.global_batch=256 cannot be split into 3 processes"),
    ((32, 100, 1, 0, 1, {}), "cannot be split into 1 processes x whole micro-batches"),
    ((8, 480, 1, 0, 5, {"train.global_batch": 480, "data.partitions": 48, "data.batch_size": 8}), "the recorded data.partitions=48"),
    ((8, 0, 1, 12, 8, {}), "data.partitions=12 canonical partitions cannot be split evenly over 8 processes"),
])
def test_a_topology_that_cannot_be_served_is_one_line(args, words):
    with pytest.raises(UserError) as err:
        resolve(*args, [100] * 100)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_restart_limit_is_checked_and_read_from_torch_elastic():
    assert check_max_restarts(0) == 0 and check_max_restarts(100) == 100
    for bad in (-1, 101, 10**6):
        with pytest.raises(UserError, match="expected 0"):
            check_max_restarts(bad)
    agent = {"TORCHELASTIC_RUN_ID": "x", "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert restarts_left(agent) == 2 and restarts_left({}) == 0
    assert "restart 2 of 3" in restart_sentence(agent) and "Restart every node" in restart_sentence({})
