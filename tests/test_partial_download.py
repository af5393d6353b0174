"""`cxrdist prepare` on what a user really has: a partial download (most images missing, one unreadable), a test list
that names only some of a patient's images, label columns nobody filled in. The image check comes before the folds,
and the folds, the balance table (printed and stored) and the shards describe exactly the images written."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrdist.cli import main
from cxrdist.data.ingest import folds as folds_lib
from cxrdist.data.manifest import load_one_manifest

LABELS = ["Cardiomegaly", "Pleural Effusion", "Edema"]


def write_table(root: Path, rows: int, present: int, blank: tuple[str, ...] = ()) -> Path:
    """`rows` images of rows // 2 patients (two each), the first `present` of them on disk (gray squares)."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"path": [f"img{k:03d}.png" for k in range(rows)], "patient": [f"P{k // 2:03d}" for k in range(rows)]})
    for j, label in enumerate(LABELS):
        table[label] = "" if label in blank else ((np.arange(rows) + j) % (j + 2) == 0).astype(int).astype(str)
    for path in table["path"].head(present):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(images / path)
    table.to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def prepare_args(csv: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--csv", str(csv), "--images", str(csv.parent / "images"), "--out", str(out), "--folds", "2", "--max-size", "32",
            "--format", "png", "--samples-per-shard", "4", "--labels", ",".join(LABELS), *extra]


def printed_images_row(text: str) -> list[int]:
    return [int(n) for n in re.search(r"^images +([\d ]+)$", text, re.M).group(1).split()]


def test_a_partial_download_is_folded_balanced_and_packed_as_written(tmp_path, capsys):
    csv = write_table(tmp_path / "raw", rows=60, present=21)
    (csv.parent / "images" / "img020.png").write_bytes(b"not a png")  # and one of the present images is unreadable
    out = tmp_path / "shards"
    assert main(prepare_args(csv, out, "--on-bad-image", "skip")) == 0
    said = capsys.readouterr().out
    assert sum(printed_images_row(said)) == 20  # the printed plan is of the 20 images written, not of the 60-row table
    assert "60 images" not in said and "40 images of the table left out (39 missing, 1 unreadable" in said
    manifest = load_one_manifest(out)
    assert sum(s.num_samples for s in manifest.splits.values()) == 20 and manifest.skipped_images["count"] == 40
    assert {name: s["num_samples"] for name, s in manifest.balance["splits"].items()} == {n: s.num_samples for n, s in manifest.splits.items()}
    for split in manifest.splits.values():
        sizes = [shard.num_samples for shard in split.shards]
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 4  # packed evenly from what was written
        for shard in split.shards:
            with tarfile.open(out / shard.file) as tar:
                assert len(tar.getnames()) == 2 * shard.num_samples


@pytest.mark.parametrize("broken", ["missing", "unreadable"])
def test_a_bad_image_is_refused_before_any_fold_is_computed(tmp_path, capsys, monkeypatch, broken):
    csv = write_table(tmp_path / "raw", rows=20, present=20 if broken == "unreadable" else 19)
    if broken == "unreadable":
        (csv.parent / "images" / "img007.png").write_bytes(b"\x89PNG truncated")

    def no_folds_yet(*args, **kwargs):
        raise AssertionError("the folds were computed before the images were checked")

    monkeypatch.setattr(folds_lib, "assign_splits", no_folds_yet)
    assert main(prepare_args(csv, tmp_path / "shards")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("img019.png" in err if broken == "missing" else "img007.png" in err)
    assert not (tmp_path / "shards").exists()


def test_a_test_list_that_splits_patients_says_how_many_moved(tmp_path, capsys):
    csv = write_table(tmp_path / "raw", rows=40, present=40)
    listed = tmp_path / "test_list.txt"
    listed.write_text("img000.png\nimg002.png\nimg003.png\nimg005.png\n")  # patients 0 and 2 in part, 1 wholly
    assert main(prepare_args(csv, tmp_path / "shards", "--test-list", str(listed))) == 0
    said = capsys.readouterr().out
    assert "names some but not all images of 2 patients: their other 2 images moved to the test split too (6 test images in all)" in said
    assert load_one_manifest(tmp_path / "shards").splits["test"].num_samples == 6


def test_a_label_blank_in_every_row_is_not_annotated_and_a_blank_table_is_refused(tmp_path, capsys):
    csv = write_table(tmp_path / "raw", rows=20, present=20, blank=("Edema",))
    assert main(prepare_args(csv, tmp_path / "shards")) == 0
    assert "1 label blank in every row of" in capsys.readouterr().out
    manifest = load_one_manifest(tmp_path / "shards")
    assert manifest.labels == ["Cardiomegaly", "Pleural Effusion"]  # Edema is not trained as negative for every image

    nothing = write_table(tmp_path / "nothing", rows=20, present=20, blank=tuple(LABELS))
    assert main(prepare_args(nothing, tmp_path / "refused")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the table annotates nothing" in err and not (tmp_path / "refused").exists()
