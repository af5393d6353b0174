"""Train/eval streams over real tar shards: per-pass coverage, equal batches per rank, determinism,
exact resume, eval exactly-once, corrupt samples."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cxrdist.data import stream
from cxrdist.data.spec import ImageSpec
from cxrdist.data.manifest import Manifest, ShardInfo, SplitInfo, write_manifest
from cxrdist.data.datasets import load_manifest
from cxrdist.data.stream import (
    StreamConfig,
    Unit,
    batches_per_epoch,
    eval_loader,
    eval_num_samples,
    pass_shard_order,
    train_loader,
    unit_pass_count,
    unit_pass_samples,
    unit_train_samples,
)
from cxrdist.errors import UserError

LABELS = ["A", "B", "C"]
TRAIN_SIZES = [23, 41, 30, 17, 35]  # uneven on purpose
EVAL_SIZES = [10, 13, 7]
TEST_SIZES = [9]
CORRUPT_SIZES = [12]  # its samples 3 (garbage image) and 8 (garbage json) are corrupt
BATCH = 8


def sample_labels(index: int) -> list:
    return [[1, 0, -1, None][(index + k) % 4] for k in range(len(LABELS))]


def sample_image(index: int) -> bytes:
    pixels = np.random.default_rng(index).integers(0, 256, (48, 48), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_split(root: Path, name: str, sizes: list[int], first: int, corrupt: dict[int, str] | None = None) -> SplitInfo:
    (root / name).mkdir()
    shards, index = [], first
    for shard_number, size in enumerate(sizes):
        rel = f"{name}/shard-{shard_number:06d}.tar"
        with wds.TarWriter(str(root / rel), encoder=False) as writer:
            for _ in range(size):
                meta = json.dumps({"labels": sample_labels(index), "patient": f"p{index}", "study": "s", "view": "PA",
                                   "path": f"{index}.png"}).encode()
                image = sample_image(index)
                kind = (corrupt or {}).get(index - first)
                if kind == "image":
                    image = b"\x00garbage, not a jpeg" * 10
                elif kind == "json":
                    meta = b"{not json"
                writer.write({"__key__": f"img{index:05d}", "jpg": image, "json": meta})
                index += 1
        path = root / rel
        shards.append(ShardInfo(file=rel, num_samples=size, bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    return SplitInfo(num_samples=sum(sizes), num_patients=sum(sizes), shards=shards)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    splits = {
        "fold-0": write_split(root, "fold-0", TRAIN_SIZES, 0),
        "fold-1": write_split(root, "fold-1", EVAL_SIZES, 1000),
        "fold-2": write_split(root, "fold-2", CORRUPT_SIZES, 2000, corrupt={3: "image", 8: "json"}),
        "test": write_split(root, "test", TEST_SIZES, 3000),
    }
    manifest = Manifest(labels=LABELS, splits=splits, num_folds=3, seed=0, source={"name": "test"},
                        image={"format": "jpg", "max_size": 48, "quality": 95})
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def manifest(shard_root) -> Manifest:
    return load_manifest(shard_root)


def split_keys(first: int, sizes: list[int]) -> list[str]:
    return [f"img{i:05d}" for i in range(first, first + sum(sizes))]


def cfg(**kw) -> StreamConfig:
    return StreamConfig(**{"image": ImageSpec(32), "batch_size": BATCH, "workers": 0, "shuffle_buffer": 20, **kw})


def take(loader, n: int) -> list[dict]:
    return list(islice(iter(loader), n))


# ---------------------------------------------------------------- train: partition per pass


@pytest.mark.parametrize("world_size,workers", [(1, 1), (2, 2), (2, 3), (3, 2), (5, 1)])
def test_each_pass_covers_every_train_sample_once(shard_root, manifest, world_size, workers):
    # (2, 3): the rank with 2 shards splits by sample, the one with 3 by shard.
    shards = manifest.shards(["fold-0"])
    for pass_index in range(3):
        seen = []
        for rank in range(world_size):
            for worker in range(workers):
                unit = Unit(rank, world_size, worker, workers)
                keys = [s.key for s in unit_pass_samples(shard_root, shards, 7, pass_index, unit)]
                assert len(keys) == unit_pass_count(TRAIN_SIZES, 7, pass_index, unit) > 0
                seen += keys
        assert sorted(seen) == split_keys(0, TRAIN_SIZES)


def test_shuffled_stream_is_each_pass_permuted_and_continues(shard_root, manifest):
    shards, unit = manifest.shards(["fold-0"]), Unit(1, 2, 0, 2)
    counts = [unit_pass_count(TRAIN_SIZES, 0, p, unit) for p in range(3)]
    out = list(islice(unit_train_samples(shard_root, shards, 0, 16, unit), sum(counts)))
    start = 0
    for p, count in enumerate(counts):
        chunk = out[start : start + count]
        plain = [s.key for s in unit_pass_samples(shard_root, shards, 0, p, unit)]
        assert {pass_index for pass_index, _ in chunk} == {p}
        assert sorted(s.key for _, s in chunk) == sorted(plain)
        assert [s.key for _, s in chunk] != plain  # the buffer really reorders
        start += count


def test_shard_order_same_everywhere_but_changes_per_pass():
    orders = [tuple(pass_shard_order(5, 0, p)) for p in range(6)]
    assert orders == [tuple(pass_shard_order(5, 0, p)) for p in range(6)]
    assert len(set(orders)) > 1
    assert all(sorted(order) == list(range(5)) for order in orders)


# ---------------------------------------------------------------- train: loaders


def test_ranks_get_equal_full_batches_every_epoch(shard_root, manifest):
    per_epoch = batches_per_epoch(manifest, ["fold-0"], 2, BATCH)
    assert per_epoch == sum(TRAIN_SIZES) // (2 * BATCH)
    for rank in range(2):
        batches = take(train_loader(shard_root, manifest, ["fold-0"], cfg(workers=2), rank, 2), 2 * per_epoch)
        assert len(batches) == 2 * per_epoch
        for batch in batches:
            assert batch["image"].shape == (BATCH, 3, 32, 32) and batch["image"].dtype == torch.float32
            assert batch["labels_raw"].shape == (BATCH, 3) and batch["corrupt"] == 0 and len(batch["key"]) == BATCH


def test_batches_per_epoch_counts_whole_optimizer_steps(manifest):
    assert batches_per_epoch(manifest, ["fold-0"], 2, 8, grad_accum=3) == (146 // 48) * 3
    with pytest.raises(UserError, match="lower the batch size"):
        batches_per_epoch(manifest, ["fold-0"], 4, 64)


def test_train_labels_raw_keep_blanks_as_nan(shard_root, manifest):
    batch = take(train_loader(shard_root, manifest, ["fold-0"], cfg(), 0, 1), 1)[0]
    for key, row in zip(batch["key"], batch["labels_raw"].numpy()):
        expected = np.array([np.nan if v is None else v for v in sample_labels(int(key[3:]))], np.float32)
        np.testing.assert_array_equal(row, expected)


def test_train_stream_deterministic_per_seed(shard_root, manifest):
    def run(seed):
        return take(train_loader(shard_root, manifest, ["fold-0"], cfg(workers=2, seed=seed), 1, 2), 6)

    first, again, other = run(3), run(3), run(4)
    assert [b["key"] for b in first] == [b["key"] for b in again]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert [b["key"] for b in first] != [b["key"] for b in other]


def straddling_batches(world_size: int, rank: int, workers: int, seed: int, passes: int) -> list[int]:
    """Loader batch indices whose raw samples come from two passes."""
    found = []
    for worker in range(workers):
        unit, end = Unit(rank, world_size, worker, workers), 0
        for p in range(passes):
            end += unit_pass_count(TRAIN_SIZES, seed, p, unit)
            if end % BATCH:
                found.append((end // BATCH) * workers + worker)
    return sorted(found)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_uninterrupted_stream(shard_root, manifest, workers):
    config, total = cfg(workers=workers, seed=1), 32
    reference = take(train_loader(shard_root, manifest, ["fold-0"], config, 0, 2), total)
    crossing = [b for b in straddling_batches(2, 0, max(1, workers), 1, 4) if b + 3 <= total]
    assert crossing, "the fixture must produce batches that straddle a pass boundary"
    for start in sorted({5, *crossing[:2], total - 3}):
        resumed = take(train_loader(shard_root, manifest, ["fold-0"], config, 0, 2, start_batch=start), 3)
        for got, want in zip(resumed, reference[start : start + 3], strict=True):
            assert got["key"] == want["key"], f"start_batch={start}"
            assert torch.equal(got["image"], want["image"]), f"start_batch={start}"
            assert torch.equal(got["labels_raw"].nan_to_num(9), want["labels_raw"].nan_to_num(9))


def test_resume_far_ahead_reads_one_pass_and_decodes_nothing_skipped(shard_root, manifest, monkeypatch):
    config, start = cfg(seed=2), 60  # ~7 passes of rank 0 (70-odd samples, 9 batches each)
    reference = take(train_loader(shard_root, manifest, ["fold-0"], config, 0, 2), start + 1)[start]
    decoded, shards_read = [], []
    real_decode, real_read = stream.decode_sample, stream.read_shard
    monkeypatch.setattr(stream, "decode_sample", lambda raw, *a: decoded.append(raw.key) or real_decode(raw, *a))
    monkeypatch.setattr(stream, "read_shard", lambda path, n: shards_read.append(path) or real_read(path, n))
    batch = take(train_loader(shard_root, manifest, ["fold-0"], config, 0, 2, start_batch=start), 1)[0]
    assert batch["key"] == reference["key"] and torch.equal(batch["image"], reference["image"])
    assert len(decoded) == BATCH
    assert len(shards_read) <= 2 * 3  # at most the two passes this batch touches, 3 shards each


def test_train_refuses_fewer_shards_than_ranks(shard_root, manifest):
    with pytest.raises(UserError, match="samples-per-shard"):
        train_loader(shard_root, manifest, ["fold-0"], cfg(), 0, 6)
    with pytest.raises(UserError, match="fewer workers"):  # 1 shard of 9 samples cannot feed 10 workers
        train_loader(shard_root, manifest, ["test"], cfg(workers=10), 0, 1)


# ---------------------------------------------------------------- eval


def eval_batches(root, manifest, splits, world_size, workers, **kw) -> list[list[dict]]:
    return [list(eval_loader(root, manifest, splits, cfg(workers=workers, batch_size=4), rank, world_size, **kw)) for rank in range(world_size)]


def test_eval_every_sample_exactly_once_in_shard_order(shard_root, manifest):
    per_rank = eval_batches(shard_root, manifest, ["fold-1"], 2, 2)
    keys = [key for batches in per_rank for batch in batches for key in batch["key"]]
    assert sorted(keys) == split_keys(1000, EVAL_SIZES)
    for rank, batches in enumerate(per_rank):
        assert sum(len(b["key"]) for b in batches) == eval_num_samples(manifest, ["fold-1"], rank, 2)
        assert all(b["image"].shape[1:] == (3, 32, 32) and b["labels_raw"].shape == (len(b["key"]), 3) for b in batches)
    rank0_keys = [key for batch in per_rank[0] for key in batch["key"]]  # rank 0 has shards 0 and 2, one worker each
    shard0, shard2 = split_keys(1000, EVAL_SIZES[:1]), split_keys(1023, EVAL_SIZES[2:])
    assert [k for k in rank0_keys if k in shard0] == shard0 and [k for k in rank0_keys if k in shard2] == shard2


def test_eval_single_shard_over_two_ranks_and_two_workers(shard_root, manifest):
    per_rank = eval_batches(shard_root, manifest, ["test"], 2, 2)
    assert per_rank[1] == []
    assert [k for b in per_rank[0] for k in b["key"]] == split_keys(3000, TEST_SIZES)
    assert [len(b["key"]) for b in per_rank[0]] == [4, 4, 1]  # the last batch partial


def test_eval_hflip_mirrors_images(shard_root, manifest):
    plain = eval_batches(shard_root, manifest, ["test"], 1, 0)[0]
    flipped = eval_batches(shard_root, manifest, ["test"], 1, 0, hflip=True)[0]
    for a, b in zip(plain, flipped, strict=True):
        assert a["key"] == b["key"] and torch.equal(torch.flip(a["image"], dims=[-1]), b["image"])


def test_manifest_count_mismatch_is_a_user_error(shard_root, manifest):
    lying = replace(manifest,
                    splits={**manifest.splits,
                            "test": replace(manifest.splits["test"], shards=[replace(manifest.splits["test"].shards[0], num_samples=10)])})
    with pytest.raises(UserError, match="manifest says 10"):
        list(eval_loader(shard_root, lying, ["test"], cfg(), 0, 1))


# ---------------------------------------------------------------- corrupt samples


def test_corrupt_samples_dropped_and_counted(shard_root, manifest):
    good = [k for i, k in enumerate(split_keys(2000, CORRUPT_SIZES)) if i not in (3, 8)]
    batches = list(eval_loader(shard_root, manifest, ["fold-2"], cfg(), 0, 1))
    assert [k for b in batches for k in b["key"]] == good
    assert [b["corrupt"] for b in batches] == [1, 1] and batches[0]["corrupt_keys"] == ["img02003"]
    # Train: one pass of one rank and worker is the 12 samples in some order: 3 raw batches of 4.
    train = take(train_loader(shard_root, manifest, ["fold-2"], cfg(batch_size=4), 0, 1), 3)
    assert sum(b["corrupt"] for b in train) == 2
    assert sorted(k for b in train for k in b["key"]) == good
    assert all(len(b["key"]) + b["corrupt"] == 4 for b in train)


# ---------------------------------------------------------------- shards written by `cxrdist prepare`


def test_reads_shards_written_by_prepare(synth_shards):
    prepared = load_manifest(synth_shards)
    val, train = prepared.fold_names[0], prepared.train_splits(0)
    per_rank = eval_batches(synth_shards, prepared, [val], 2, 2)
    keys = [k for batches in per_rank for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == prepared.num_samples([val])
    assert sum(b["corrupt"] for batches in per_rank for b in batches) == 0
    batch = take(train_loader(synth_shards, prepared, train, cfg(workers=2), 1, 2), 1)[0]
    assert batch["image"].shape == (BATCH, 3, 32, 32) and batch["labels_raw"].shape == (BATCH, len(prepared.labels))
