"""Hostile inputs, one test per case of issue 11: exit code, exactly one error line, no traceback, and the
state of the file system afterwards (old data intact, nothing outside the output touched, no partial files)."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrdist.cli import main
from cxrdist.data.manifest import MANIFEST_NAME
from cxrdist.data.datasets import load_manifest

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
    from cxrdist.data.ingest import prepare as prepare_module
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


def test_the_leftover_of_a_killed_prepare_is_removed_by_the_next_run(prepared, capsys):
    """kill -9 leaves the hidden staging directory behind (nothing can clean up); the next prepare of the same
    --out removes it when its process is gone, and leaves those of live processes and of other hosts alone."""
    from cxrdist.atomic import staging_directory

    root, csv, images, out = prepared
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ours = staging_directory(out).name.rsplit("-", 1)[0]
        dead, live, elsewhere = (out.with_name(name) for name in (f"{ours}-{killed.pid}", f"{ours}-{running.pid}", f".{out.name}.partial-node7-1"))
        for leftover in (dead, live, elsewhere):
            (leftover / "train").mkdir(parents=True)
            (leftover / "train" / "shard-000000.tar").write_bytes(b"half a shard")
        assert main(prepare_args(csv, images, out, "--seed", "5")) == 0
        assert f"removed {dead}" in capsys.readouterr().out
        assert not dead.exists() and live.is_dir() and elsewhere.is_dir()
        assert load_manifest(out).seed == 5
    finally:
        running.kill()
        running.wait()


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


@pytest.mark.parametrize("extra, needle", [(["--seed", "-1"], "--seed"), (["--quality", "0"], "quality"), (["--quality", "101"], "quality")])
def test_bad_prepare_numbers_are_one_line(data, capsys, extra, needle):
    root, csv, images = data
    assert main(prepare_args(csv, images, root / "out", *extra)) == 2
    one_error(capsys, needle)
    assert not (root / "out").exists()


# ---------------------------------------------------------------- 6, 8, 9: no silent leak, nothing read from outside


def test_one_file_named_two_ways_is_refused(data, capsys):
    root, csv, images = data
    table = pd.read_csv(csv, dtype=str)
    table.loc[1, "path"] = "./" + table.loc[0, "path"]  # another patient's row names the same file
    table.loc[1, "patient"] = "someone-else"
    table.to_csv(csv, index=False)
    assert main(prepare_args(csv, images, root / "out")) == 2
    one_error(capsys, "more than once")
    assert not (root / "out").exists()


def test_a_symlink_to_a_listed_image_is_refused(data, capsys):
    root, csv, images = data
    table = pd.read_csv(csv, dtype=str)
    (images / "alias.png").symlink_to(images / table.loc[0, "path"])
    table.loc[1, "path"] = "alias.png"
    table.to_csv(csv, index=False)
    assert main(prepare_args(csv, images, root / "out")) == 2
    one_error(capsys, "same file")
    no_leftovers(root)


def test_csv_without_patient_column_is_refused_unless_waived(data, capsys):
    root, csv, images = data
    pd.read_csv(csv, dtype=str).drop(columns=["patient"]).to_csv(csv, index=False)
    assert main(prepare_args(csv, images, root / "out")) == 2
    one_error(capsys, "--no-patient-grouping")
    assert not (root / "out").exists()
    assert main(prepare_args(csv, images, root / "out", "--no-patient-grouping")) == 0
    assert "note: no patient grouping" in capsys.readouterr().out
    assert any("own patient" in n for n in load_manifest(root / "out").source["notes"])


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_paths_leading_outside_images_are_refused_unless_allowed(data, capsys, kind):
    root, csv, images = data
    secret = root / "secret.png"
    secret.write_bytes((images / "p00" / "img0.png").read_bytes())
    table = pd.read_csv(csv, dtype=str)
    if kind == "symlink":
        (images / "p00" / "link.png").symlink_to(secret)
        table.loc[0, "path"] = "p00/link.png"
    else:
        table.loc[0, "path"] = "../secret.png" if kind == "dotdot" else str(secret)
    table.to_csv(csv, index=False)
    assert main(prepare_args(csv, images, root / "out")) == 2
    one_error(capsys, "outside --images")
    assert not (root / "out").exists()
    assert main(prepare_args(csv, images, root / "out", "--allow-outside-images")) == 0


def test_skip_leaves_out_missing_and_unreadable_images_and_lists_both(data, capsys):
    root, csv, images = data
    (images / "p03" / "img1.png").unlink()
    (images / "p04" / "img0.png").write_bytes(b"garbage")
    out = root / "out"
    assert main(prepare_args(csv, images, out)) == 2
    one_error(capsys, "missing")
    assert main(prepare_args(csv, images, out, "--on-bad-image", "skip")) == 0
    assert "1 missing, 1 unreadable" in capsys.readouterr().out
    skipped = load_manifest(out).skipped_images
    assert skipped["count"] == 2 and skipped["missing"] == 1
    assert sorted(skipped["paths"]) == ["p03/img1.png", "p04/img0.png"]
    assert sum(s.num_samples for s in load_manifest(out).splits.values()) == 22


# ---------------------------------------------------------------- 10: a pixel limit for every decoder


def huge_png(path: Path, side: int = 13000) -> None:
    """A real 16-bit grayscale PNG of side x side zeros (a few hundred KB), written row by row."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, row, parts = zlib.compressobj(9), b"\x00" * (1 + 2 * side), []
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def huge_jpeg(path: Path, side: int = 13000) -> None:
    """A small JPEG whose frame header claims side x side pixels."""
    import io

    buffer = io.BytesIO()
    Image.new("L", (16, 16)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    path.write_bytes(bytes(data))


def huge_dicom(path: Path, side: int = 13000) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x00" * 64
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("make, suffix", [(huge_png, ".png"), (huge_jpeg, ".jpg"), (huge_dicom, ".dcm")])
def test_an_image_over_the_pixel_limit_is_a_bad_image_before_decoding(tmp_path, make, suffix):
    import resource

    from cxrdist.data.ingest.images import read_grayscale
    from cxrdist.errors import BadImage

    path = tmp_path / f"huge{suffix}"
    make(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadImage, match="more than the limit"):
        read_grayscale(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing near the 338 MB decode


def test_prepare_skips_an_oversized_image_as_bad(data, capsys):
    root, csv, images = data
    huge_png(images / "p05" / "img0.png")
    assert main(prepare_args(csv, images, root / "out")) == 2
    one_error(capsys, "more than the limit")
    assert main(prepare_args(csv, images, root / "out", "--on-bad-image", "skip")) == 0
    assert load_manifest(root / "out").skipped_images["paths"] == ["p05/img0.png"]


# ---------------------------------------------------------------- manifests that must not pass verify


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(splits=[]), "malformed"),
    (lambda m: m.update(num_folds="3"), "num_folds"),
    (lambda m: m["splits"].pop("fold-1"), "fold-1"),
])
def test_verify_rejects_a_malformed_manifest(prepared, capsys, edit, needle):
    import json

    root, csv, images, out = prepared
    data = json.loads((out / MANIFEST_NAME).read_text())
    edit(data)
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    assert main(["verify", str(out)]) == 2
    one_error(capsys, needle)
