"""The canonical sample order (data/order.py) against a brute-force construction of it; the stream that reads it over
real tar shards is tested in tests/test_stream.py."""

from __future__ import annotations

import numpy as np
import pytest

from cxrdist.data.order import CanonicalOrder, auto_partitions, check_world_size, served_world_sizes
from cxrdist.errors import UserError

SIZES = (23, 41, 30, 17, 35)
BATCH = 8


def brute_force_stream(order: CanonicalOrder, partition: int, passes: int) -> list[tuple[int, int, int]]:
    """(pass, shard, sample) of one partition over `passes` passes, built the long way: every pass's whole sequence listed,
    rotated, sliced, and each window permuted."""
    out = []
    for p in range(passes):
        rng = np.random.default_rng([1, order.seed, p])
        shard_order = rng.permutation(len(order.sizes))
        sequence = [(s, i) for s in shard_order for i in range(order.sizes[s])]
        rotation = int(rng.integers(len(sequence)))
        sequence = sequence[rotation:] + sequence[:rotation]
        n, parts = len(sequence), order.partitions
        piece = sequence[partition * n // parts : (partition + 1) * n // parts]
        for w in range(0, len(piece), order.window):
            window = piece[w : w + order.window]
            permutation = np.random.default_rng([2, order.seed, p, partition, w // order.window]).permutation(len(window))
            out += [(p, *window[k]) for k in permutation]
    return out


def pieces_stream(order: CanonicalOrder, partition: int, passes: int) -> list[tuple[int, int, int]]:
    """The same through `pieces` and `window_order`, read window by window as the stream reads it."""
    out = []
    for p in range(passes):
        flat = [(piece.shard, i) for piece in order.pieces(p, partition) for i in range(piece.start, piece.stop)]
        for w in range(0, len(flat), order.window):
            window = flat[w : w + order.window]
            out += [(p, *window[k]) for k in order.window_order(p, partition, w // order.window, len(window))]
    return out


@pytest.mark.parametrize("partitions, window", [(1, 1), (4, 5), (12, 7), (7, 1000), (146, 3)])
def test_pieces_and_windows_equal_the_brute_force_order_and_cover_each_pass_once(partitions, window):
    order = CanonicalOrder(SIZES, seed=5, partitions=partitions, window=window, micro=BATCH)
    for q in range(partitions):
        assert pieces_stream(order, q, 3) == brute_force_stream(order, q, 3)
    for p in range(3):
        every = sorted((piece.shard, i) for q in range(partitions) for piece in order.pieces(p, q) for i in range(piece.start, piece.stop))
        assert every == [(s, i) for s in range(len(SIZES)) for i in range(SIZES[s])]
    assert {order.partition_size(q) for q in range(partitions)} <= {sum(SIZES) // partitions, sum(SIZES) // partitions + 1}


def test_a_seek_to_any_offset_yields_the_rest_of_the_slice():
    order = CanonicalOrder(SIZES, seed=2, partitions=5, window=4, micro=BATCH)
    for q in range(5):
        whole = [(piece.shard, i) for piece in order.pieces(1, q) for i in range(piece.start, piece.stop)]
        for offset in range(len(whole)):
            tail = [(piece.shard, i) for piece in order.pieces(1, q, offset) for i in range(piece.start, piece.stop)]
            assert tail == whole[offset:]


def test_a_partition_boundary_moves_within_the_shards_from_pass_to_pass():
    order = CanonicalOrder((40,) * 6, seed=0, partitions=6, window=8, micro=BATCH)
    starts = {order.pieces(p, 0)[0].start for p in range(8)}
    assert len(starts) > 1  # equal shards, 6 partitions: without the rotation each would be one whole shard every pass


def test_world_sizes_the_partitions_cannot_serve_are_one_line():
    assert served_world_sizes(48) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
    assert auto_partitions(8, 10**6, 1000) == 48 and auto_partitions(64, 10**6, 1000) == 192 and auto_partitions(5, 10**6, 1000) == 240
    # fewer samples than 48 partitions of a shard each: a smaller default they fill, the same on every world size it serves
    assert {auto_partitions(w, 36_000, 1000) for w in (1, 2, 3, 4, 6, 8, 12, 24)} == {24} and auto_partitions(16, 36_000, 1000) == 48
    assert {auto_partitions(w, 420, 70) for w in (1, 2, 4)} == {4} and auto_partitions(3, 420, 70) == 12
    assert auto_partitions(1, 36) == 24 and auto_partitions(2, 100, 1000) == 2 and auto_partitions(5, 100, 1000) == 5
    check_world_size(48, 16)
    with pytest.raises(UserError) as err:
        check_world_size(48, 5)
    assert "\n" not in str(err.value) and "1, 2, 3, 4, 6, 8, 12, 16, 24, 48 processes" in str(err.value)
    with pytest.raises(UserError, match="lower data.partitions"):
        CanonicalOrder((3, 2), seed=0, partitions=6, window=2, micro=2)
