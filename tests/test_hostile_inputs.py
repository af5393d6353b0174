"""Hostile inputs, one test per case of issue 11: exit code, exactly one error line, no traceback, and the
state of the file system afterwards (old data intact, nothing outside the output touched, no partial files)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrdist.cli import main
from cxrdist.data.manifest import MANIFEST_NAME, load_manifest

LABELS = ["A", "B"]


def make_images(root: Path, n_patients: int = 12) -> Path:
    """root/images/pK/img{0,1}.png and root/labels.csv (path, patient, A, B)."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        for i in range(2):
            rel = f"p{p:02d}/img{i}.png"
            (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(root / "images" / rel)
            rows.append({"path": rel, "patient": f"p{p:02d}", "A": str(p % 2), "B": str(i)})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def prepare_args(csv: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--csv", str(csv), "--images", str(images), "--out", str(out), "--labels", ",".join(LABELS),
            "--folds", "2", "--samples-per-shard", "5", "--max-size", "32", "--format", "png", *extra]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "error:" in err
    assert needle.lower() in err.lower(), err
    return err


def no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".partial" in p.name or ".old-" in p.name]


@pytest.fixture
def data(tmp_path):
    csv = make_images(tmp_path)
    return tmp_path, csv, tmp_path / "images"


@pytest.fixture
def prepared(data, capsys):
    root, csv, images = data
    out = root / "shards"
    assert main(prepare_args(csv, images, out)) == 0
    capsys.readouterr()
    return root, csv, images, out


# ---------------------------------------------------------------- 1, 2: prepare never loses data


def test_failed_prepare_leaves_the_previous_dataset_intact(prepared, capsys):
    root, csv, images, out = prepared
    before = snapshot(out)
    last = pd.read_csv(csv)["path"].iloc[-1]  # late in the CSV: many shards are written before it fails
    (images / last).write_bytes(b"\x89PNG not really")
    assert main(prepare_args(csv, images, out, "--seed", "5")) == 2
    one_error(capsys, last)
    assert snapshot(out) == before
    load_manifest(out)
    no_leftovers(root)


def test_interrupted_prepare_leaves_the_previous_dataset_intact(prepared, capsys, monkeypatch):
    from cxrdist.data import prepare as prepare_module
    from cxrdist.data.shards import write_shard

    root, csv, images, out = prepared
    before = snapshot(out)
    written = []

    def ctrl_c_after_two_shards(jobs, workers, on_done):
        for job in jobs:
            if len(written) == 2:
                raise KeyboardInterrupt
            written.append(write_shard(job))
        return written

    monkeypatch.setattr(prepare_module, "run_jobs", ctrl_c_after_two_shards)
    assert main(prepare_args(csv, images, out, "--seed", "5")) == 130
    assert all(not Path(r.target).exists() for r in written)  # the partial shards are gone
    assert snapshot(out) == before
    no_leftovers(root)


def test_a_successful_prepare_replaces_the_old_dataset_whole(prepared, capsys):
    root, csv, images, out = prepared
    assert main(prepare_args(csv, images, out, "--samples-per-shard", "100")) == 0
    manifest = load_manifest(out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.tar")) == sorted(s.file for s in manifest.shards(list(manifest.splits)))
    no_leftovers(root)


@pytest.mark.parametrize("where", ["images", "images/p00", "test-in-images"])
def test_out_overlapping_the_images_is_refused_and_nothing_is_deleted(data, capsys, where):
    root, csv, images = data
    if where == "test-in-images":
        (images / "test").mkdir()
        (images / "test" / "x.png").write_bytes((images / "p00" / "img0.png").read_bytes())
        out = images
    else:
        out = root / where
    before = snapshot(root)
    assert main(prepare_args(csv, images, out, "--test-fraction", "0.3")) == 2
    one_error(capsys, "overlaps --images")
    assert snapshot(root) == before


def test_images_inside_out_is_refused(data, capsys):
    root, csv, images = data
    before = snapshot(root)
    assert main(prepare_args(csv, images, root)) == 2
    one_error(capsys, "overlaps")
    assert snapshot(root) == before


def test_out_holding_other_files_is_refused(data, capsys):
    root, csv, images = data
    out = root / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / "fold-0").mkdir()
    assert main(prepare_args(csv, images, out)) == 2
    one_error(capsys, "not a directory written by `cxrdist prepare`")
    assert (out / "notes.txt").read_text() == "precious" and (out / "fold-0").is_dir()


def test_out_an_existing_file_is_refused(data, capsys):
    root, csv, images = data
    (root / "file").write_text("x")
    assert main(prepare_args(csv, images, root / "file")) == 2
    one_error(capsys, "is a file")
    assert (root / "file").read_text() == "x"


def test_csv_inside_out_is_refused(prepared, capsys):
    root, csv, images, out = prepared
    moved = out / "labels.csv"
    moved.write_bytes(csv.read_bytes())
    before = snapshot(out)
    assert main(prepare_args(moved, images, out)) == 2
    one_error(capsys, "inside --out")
    assert snapshot(out) == before
