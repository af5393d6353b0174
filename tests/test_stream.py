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
from cxrdist.data.order import CanonicalOrder, rank_micro_batch
from cxrdist.data.stream import StreamConfig, eval_loader, eval_num_samples, steps_per_epoch, train_loader
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


# ---------------------------------------------------------------- train: loaders


def test_train_batches_are_full_and_typed(shard_root, manifest):
    for rank in range(2):
        for batch in take(train_loader(shard_root, manifest, ["fold-0"], cfg(workers=2, partitions=4), rank, 2), 40):
            assert batch["image"].shape == (BATCH, 3, 32, 32) and batch["image"].dtype == torch.float32
            assert batch["labels_raw"].shape == (BATCH, 3) and batch["corrupt"] == 0 and len(batch["key"]) == BATCH


def test_steps_per_epoch_are_whole_global_batches(manifest):
    assert steps_per_epoch(manifest, ["fold-0"], 48) == 146 // 48
    with pytest.raises(UserError, match="lower train.global_batch"):
        steps_per_epoch(manifest, ["fold-0"], 256)


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


# ---------------------------------------------------------------- train: the canonical order over real shards (data/order.py)


def global_micro_batches(shard_root, manifest, world_size: int, workers: int, count: int, start: int = 0, **kw) -> dict[int, dict]:
    """{global micro-batch j: batch} for j in [start*W, (start+count)*W) from every rank's loader (its micro-batches start..)."""
    config = cfg(workers=workers, seed=3, partitions=12, **kw)
    found = {}
    for rank in range(world_size):
        loader = train_loader(shard_root, manifest, ["fold-0"], config, rank, world_size, start_batch=start)
        for t, batch in enumerate(islice(iter(loader), count), start=start):
            found[rank_micro_batch(rank, world_size, 12, t)[0]] = batch
    return found


def test_the_global_micro_batches_are_the_same_for_1_2_4_processes_and_0_1_3_workers(shard_root, manifest):
    # 146 samples in 12 partitions of 12-13, micro-batches of 8: batches span windows, shards and passes
    reference = global_micro_batches(shard_root, manifest, 1, 0, 48)
    keys = [reference[j]["key"] for j in range(48)]
    assert sorted(k for batch in keys[:18] for k in batch) != sorted(k for batch in keys[18:36] for k in batch)
    for world_size, workers in [(2, 0), (4, 1), (1, 3), (2, 3), (4, 3)]:
        got = global_micro_batches(shard_root, manifest, world_size, workers, 48 // world_size)
        assert sorted(got) == list(range(48))
        for j in range(48):
            assert got[j]["key"] == reference[j]["key"], (world_size, workers, j)
            assert torch.equal(got[j]["image"], reference[j]["image"]), (world_size, workers, j)


def test_every_pass_of_a_partition_holds_each_of_its_samples_once(shard_root, manifest):
    batches = global_micro_batches(shard_root, manifest, 1, 0, 12 * 8)  # 64 samples of each partition: 4 passes and more
    order = CanonicalOrder(tuple(TRAIN_SIZES), seed=3, partitions=12, window=20, micro=BATCH)
    for q in range(12):
        keys, size = [k for j in range(q, 12 * 8, 12) for k in batches[j]["key"]], order.partition_size(q)
        passes = [keys[p * size : (p + 1) * size] for p in range(4)]
        assert all(len(set(p)) == size for p in passes) and len({tuple(p) for p in passes}) == 4
    assert {k for batch in batches.values() for k in batch["key"]} == {f"img{i:05d}" for i in range(146)}


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 3), (4, 1)])
def test_a_resumed_stream_continues_with_the_same_global_micro_batches(shard_root, manifest, world_size, workers):
    reference = global_micro_batches(shard_root, manifest, 1, 0, 40)
    for start in (1, 5):  # rank-local micro-batch index: global micro-batches start*W ...
        got = global_micro_batches(shard_root, manifest, world_size, workers, 3, start=start)
        assert sorted(got) == list(range(start * world_size, (start + 3) * world_size))
        for j, batch in got.items():
            assert batch["key"] == reference[j]["key"] and torch.equal(batch["image"], reference[j]["image"])


def test_a_resume_far_ahead_reads_one_window_per_partition_and_decodes_only_its_batch(shard_root, manifest, monkeypatch):
    config = cfg(seed=2, partitions=4, shuffle_buffer=6)
    start = 600  # 600 micro-batches of 8 samples: ~33 passes of the 146 samples
    assert CanonicalOrder(tuple(TRAIN_SIZES), 2, 4, 6, BATCH).micro_batch_start(0, start // 4)[0] > 25
    earlier = list(islice(iter(train_loader(shard_root, manifest, ["fold-0"], config, 0, 1, start_batch=start - 2)), 3))
    decoded, shards_read = [], []
    real_decode, real_read = stream.decode_sample, stream.read_shard
    monkeypatch.setattr(stream, "decode_sample", lambda raw, *a: decoded.append(raw.key) or real_decode(raw, *a))
    monkeypatch.setattr(stream, "read_shard", lambda path, n: shards_read.append(path) or real_read(path, n))
    batch = next(iter(train_loader(shard_root, manifest, ["fold-0"], config, 0, 1, start_batch=start)))
    assert batch["key"] == earlier[2]["key"] and torch.equal(batch["image"], earlier[2]["image"])
    assert len(decoded) == BATCH
    assert len(shards_read) <= 3  # one partition's slice (~37 samples) from one window on: at most 3 of the 5 shards


def test_train_refuses_a_world_size_the_partitions_cannot_serve(shard_root, manifest):
    with pytest.raises(UserError, match="run on 1, 2, 3, 4, 6, 12 processes"):
        train_loader(shard_root, manifest, ["fold-0"], cfg(partitions=12), 0, 5)
    with pytest.raises(UserError, match="lower data.partitions"):  # 146 samples cannot fill 200 partitions
        train_loader(shard_root, manifest, ["fold-0"], cfg(partitions=200), 0, 1)


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
    # Train, one canonical partition: its first pass is the 12 samples in some order, 3 micro-batches of 4.
    train = take(train_loader(shard_root, manifest, ["fold-2"], cfg(batch_size=4, partitions=1), 0, 1), 3)
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


@pytest.mark.parametrize("eval_decode", ["train_draft_side", "img_size"])
def test_a_stored_jpeg_twice_the_input_size_is_decoded_for_evaluation_as_training_decodes_it(eval_decode):
    """A 256 px stored JPEG for a 64 px model: training drafts it at train_draft_side(64) = 83 px (libjpeg's 1/2 scale,
    128 px), then resizes with antialias. Evaluation and an export's preprocess.py decode it the same way, not at 1/4
    scale (64 px, nothing resized); a card from before (eval_decode "img_size") keeps that decode, which its numbers were."""
    from cxrdist.data import preprocess
    from cxrdist.data.shards import RawSample
    from cxrdist.data.transforms import eval_transform, model_input_arguments, train_draft_side

    rng = np.random.default_rng(3)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).resize((256, 256), Image.Resampling.BICUBIC))
    data = preprocess.encode(np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8), "jpg", 95)
    spec = ImageSpec(64, eval_decode=eval_decode)
    draft = train_draft_side(64) if eval_decode == "train_draft_side" else 64
    assert preprocess.decode(data, draft).shape == ((128, 128) if draft > 64 else (64, 64))

    batch = stream.decode_eval_batch([RawSample("k", data, json.dumps({"labels": [1]}).encode())], StreamConfig(spec), 1, hflip=False)
    expected = eval_transform(preprocess.decode(data, draft), spec)
    assert torch.equal(batch["image"][0], expected)
    assert not torch.equal(expected, eval_transform(preprocess.decode(data, 128 if draft == 64 else 64), spec))  # the decodes differ
    arguments = model_input_arguments(spec, {"format": "jpg", "max_size": 256, "quality": 95})
    assert arguments["draft_side"] == draft
    exported = preprocess.stored_to_input(data, **{k: arguments[k] for k in ("size", "mean", "std", "interpolation", "resampler", "draft_side")})
    assert np.array_equal(exported, expected.numpy())
