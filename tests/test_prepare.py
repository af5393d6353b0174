"""prepare -> shards -> manifest -> verify, on real files and real tar shards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrdist.cli import main
from cxrdist.data.ingest.images import decode_image, encode_image, load_for_shard
from cxrdist.data.manifest import MANIFEST_NAME
from cxrdist.data.datasets import load_manifest
from cxrdist.data.shards import make_keys, read_shard_samples
from cxrdist.errors import UserError

LABELS = ["A", "B", "C"]


def make_dataset(root: Path, n_patients: int = 24, seed: int = 0) -> Path:
    """Random grayscale PNGs (1-3 per patient) and a generic CSV with 1/0/-1/blank labels."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    rows = []
    for p in range(n_patients):
        for i in range(int(rng.integers(1, 4))):
            rel = f"p{p:03d}/img{i}.png"
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(images / rel)
            values = rng.choice(["1", "0", "-1", ""], size=len(LABELS), p=[0.35, 0.35, 0.1, 0.2])
            rows.append({"path": rel, "patient": f"p{p:03d}", "view": "PA" if i else "AP", **dict(zip(LABELS, values))})
    csv = root / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def prepare_args(root: Path, csv: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--csv", str(csv), "--images", str(root / "images"), "--out", str(out), "--labels", ",".join(LABELS),
            "--folds", "3", "--samples-per-shard", "7", "--max-size", "64", *extra]


@pytest.fixture
def dataset(tmp_path):
    return tmp_path, make_dataset(tmp_path)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


def test_round_trip_every_image_once_with_raw_labels(dataset, capsys):
    root, csv = dataset
    out = root / "shards"
    assert main(prepare_args(root, csv, out, "--format", "png", "--test-fraction", "0.2")) == 0
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    manifest = load_manifest(out)
    assert manifest.labels == LABELS and set(manifest.splits) == {"fold-0", "fold-1", "fold-2", "test"}
    seen = {}
    for name, split in manifest.splits.items():
        for shard in split.shards:
            for key, image, meta in read_shard_samples(out / shard.file):
                assert key not in seen and "." not in key
                seen[key] = name
                row = table.set_index("path").loc[meta["path"]]
                expected = [None if row[l] == "" else int(row[l]) for l in LABELS]
                assert meta["labels"] == expected and meta["patient"] == row["patient"]
                prepared = load_for_shard(root / "images" / meta["path"], 64)
                np.testing.assert_array_equal(decode_image(image), prepared)
    assert sorted(seen) == sorted(make_keys(table["path"].tolist()))
    patient_splits = {}
    for key, name in seen.items():
        patient_splits.setdefault(key.split("_")[0], set()).add(name)
    assert all(len(s) == 1 for s in patient_splits.values())
    for name, split in manifest.splits.items():
        assert split.num_samples == sum(s.num_samples for s in split.shards) == sum(v == name for v in seen.values())
    assert manifest.balance["patients_in_several_splits"] == 0
    assert "max" in capsys.readouterr().out.lower()


def test_shards_are_byte_for_byte_deterministic_across_worker_counts(dataset):
    root, csv = dataset
    assert main(prepare_args(root, csv, root / "a", "--workers", "1")) == 0
    assert main(prepare_args(root, csv, root / "b", "--workers", "2")) == 0
    a, b = shard_bytes(root / "a"), shard_bytes(root / "b")
    assert a and a == b
    assert main(prepare_args(root, csv, root / "c", "--seed", "1")) == 0
    assert shard_bytes(root / "c") != a
    same, other = load_manifest(root / "a").identity(), load_manifest(root / "c").identity()
    assert same == load_manifest(root / "b").identity()
    assert same["labels"] == LABELS and same["content_sha256"] != other["content_sha256"]


def test_jpeg_shards_decode_to_the_encoded_prepared_image(dataset):
    root, csv = dataset
    out = root / "jpg"
    assert main(prepare_args(root, csv, out)) == 0
    manifest = load_manifest(out)
    assert manifest.image["format"] == "jpg"
    shard = manifest.splits["fold-0"].shards[0]
    key, image, meta = next(read_shard_samples(out / shard.file))
    prepared = load_for_shard(root / "images" / meta["path"], 64)
    np.testing.assert_array_equal(decode_image(image), decode_image(encode_image(prepared, "jpg", 95)))


def test_verify_passes_then_catches_a_flipped_byte(dataset, capsys):
    root, csv = dataset
    out = root / "shards"
    assert main(prepare_args(root, csv, out)) == 0
    assert main(["verify", str(out)]) == 0
    shard = out / load_manifest(out).splits["fold-1"].shards[0].file
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and shard.name in err


def test_directory_without_manifest_is_refused(dataset):
    root, csv = dataset
    out = root / "shards"
    assert main(prepare_args(root, csv, out)) == 0
    (out / MANIFEST_NAME).unlink()
    with pytest.raises(UserError, match="incomplete"):
        load_manifest(out)


def test_folds_only_touches_no_image_and_folds_from_reuses_it(dataset):
    root, csv = dataset
    assignment = root / "folds.csv"
    args = ["prepare", "--csv", str(csv), "--labels", ",".join(LABELS), "--folds", "3", "--folds-only", str(assignment)]
    assert main(args) == 0  # no --images: nothing is read but the CSV
    table = pd.read_csv(assignment)
    assert list(table.columns) == ["path", "patient", "split"]
    assert table.groupby("patient")["split"].nunique().max() == 1
    out = root / "shards"
    assert main(prepare_args(root, csv, out, "--folds-from", str(assignment), "--seed", "7")) == 0
    manifest = load_manifest(out)
    for name, split in manifest.splits.items():
        assert split.num_samples == int((table["split"] == name).sum())


def test_skip_bad_images_records_them(dataset):
    root, csv = dataset
    bad = sorted((root / "images").rglob("*.png"))[3]
    bad.write_bytes(b"not a png at all")
    out = root / "shards"
    assert main(prepare_args(root, csv, out, "--on-bad-image", "skip")) == 0
    manifest = load_manifest(out)
    assert manifest.skipped_images["count"] == 1
    assert manifest.skipped_images["paths"] == [str(bad.relative_to(root / "images"))]
    assert sum(s.num_samples for s in manifest.splits.values()) == len(pd.read_csv(csv)) - 1


def edit_csv(csv: Path, change) -> None:
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    table = change(table)
    table.to_csv(csv, index=False)


BAD_INPUTS = {
    "missing images": (lambda root, csv: next((root / "images").rglob("*.png")).unlink(), "missing"),
    "corrupt image": (lambda root, csv: next((root / "images").rglob("*.png")).write_bytes(b"\x89PNG broken"), ".png"),
    "missing column": (lambda root, csv: edit_csv(csv, lambda t: t.drop(columns=["patient", "B"])), "B"),
    "bad label value": (lambda root, csv: edit_csv(csv, lambda t: t.assign(C="2")), "C"),
    "duplicate paths": (lambda root, csv: edit_csv(csv, lambda t: t.assign(path=t["path"][0])), "more than once"),
    "empty after filtering": (lambda root, csv: edit_csv(csv, lambda t: t.assign(view="LATERAL")), "frontal"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_manifest(dataset, case, capsys):
    root, csv = dataset
    damage, needle = BAD_INPUTS[case]
    damage(root, csv)
    out = root / "shards"
    assert main(prepare_args(root, csv, out, "--views", "frontal")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle.lower() in err.lower()
    assert not (out / MANIFEST_NAME).exists()


def test_more_folds_than_patients_is_a_user_error(tmp_path, capsys):
    csv = make_dataset(tmp_path, n_patients=3)
    assert main(prepare_args(tmp_path, csv, tmp_path / "out", "--folds", "5")) == 2
    assert "fold" in capsys.readouterr().err.lower()


def test_cli_process_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cxrdist", "prepare", "--csv", str(tmp_path / "nope.csv"), "--images", str(tmp_path / "imgs"),
                             "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "nope.csv" in result.stderr
