"""Leakage caught the way it happens (data/ingest/fingerprint.py, data/ingest/leakage.py): the same radiograph re-encoded, resized,
stored in another format or cropped by a pixel is recognised, different radiographs are not; prepare keeps such images
in one split and stores the fingerprints; `data.shards` refuses the same radiographs prepared twice and two copies of
one public source sharing patients; real tar shards and NIH's own table format throughout."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from trainer_utils import cpu_env

from cxrdist.cli import main
from cxrdist.data.datasets import open_datasets
from cxrdist.data.ingest.fingerprint import MATCH_BITS, WORDS, distance, fingerprint, near_pairs
from cxrdist.data.ingest.fingerprint_store import FINGERPRINTS_NAME, fingerprints_from_shards, read_fingerprints
from cxrdist.data.ingest.images import load_for_shard
from cxrdist.data.manifest import load_one_manifest
from cxrdist.errors import UserError

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NIH_FINDINGS = ["Cardiomegaly", "Effusion", "No Finding", "Atelectasis|Effusion", "Nodule"]


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory) -> list[Path]:
    """48 synthetic radiographs of 48 patients, 384 px PNG."""
    from cxrdist.data.synth.dataset import make_synthetic_dataset

    root = tmp_path_factory.mktemp("radiographs")
    make_synthetic_dataset(root, n=150, size=384, seed=4, workers=1, progress=False)
    table = pd.read_csv(root / "labels.csv", dtype=str).drop_duplicates("patient")
    return [root / "images" / path for path in table["path"].head(48)]


def reencoded(pixels: np.ndarray, fmt: str, quality: int = 90) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))


def resized(pixels: np.ndarray, factor: float) -> np.ndarray:
    height, width = pixels.shape
    return np.asarray(Image.fromarray(pixels).resize((round(width * factor), round(height * factor)), Image.Resampling.BICUBIC))


def test_the_same_radiograph_is_recognised_and_different_ones_are_not(radiographs):
    originals = [load_for_shard(path, 384) for path in radiographs]
    prints = np.stack([fingerprint(p) for p in originals])
    copies = {
        "jpeg q75": lambda p: reencoded(p, "JPEG", 75),
        "half size": lambda p: resized(p, 0.5),
        "2/3 size as JPEG": lambda p: reencoded(resized(p, 2 / 3), "JPEG", 95),
        "PNG of a JPEG": lambda p: reencoded(reencoded(p, "JPEG", 95), "PNG"),
        "1 px cropped": lambda p: p[1:-1, 1:-1],
    }
    for name, copy in copies.items():
        moved = distance(np.stack([fingerprint(copy(p)) for p in originals]), prints)
        assert moved.max() <= MATCH_BITS, (name, moved.max())
    apart = distance(prints[:, None, :], prints[None, :, :])[np.triu_indices(len(prints), 1)]
    assert apart.min() > MATCH_BITS


def test_near_pairs_equals_brute_force():
    rng = np.random.default_rng(0)
    prints = rng.integers(0, 2**63, size=(3000, WORDS), dtype=np.uint64)
    for k in range(0, 300, 3):  # planted near copies: 0 to 15 bits flipped
        flips = rng.choice(255, size=k % 16, replace=False)
        copy = prints[k].copy()
        for bit in flips:
            copy[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
        prints[1500 + k] = copy
    full = distance(prints[:, None, :], prints[None, :, :])
    for max_bits in (0, 7, MATCH_BITS):
        i, j = np.nonzero(np.triu(full <= max_bits, 1))
        assert np.array_equal(np.stack(near_pairs(prints, max_bits=max_bits)), np.stack([i, j]))
        a, b = prints[:1800], prints[1200:]
        i, j = np.nonzero(distance(a[:, None, :], b[None, :, :]) <= max_bits)
        assert np.array_equal(np.stack(near_pairs(a, b, max_bits)), np.stack([i, j]))


def write_generic(root: Path, radiographs: list[Path], copies: dict[int, int]) -> Path:
    """images/ + labels.csv: image k of patient k for every radiograph, plus for each (copy -> source) in `copies` a
    resized JPEG of radiograph `source` as the only image of a patient of its own."""
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for k, path in enumerate(radiographs):
        shutil.copy(path, images / f"p{k:03d}.png")
        rows.append((f"p{k:03d}.png", f"P{k:03d}", k % 2, k % 3 == 0))
    for copy, source in copies.items():
        Image.fromarray(resized(load_for_shard(radiographs[source], 384), 0.75)).save(images / f"c{copy:03d}.jpg", quality=92)
        rows.append((f"c{copy:03d}.jpg", f"C{copy:03d}", source % 2, source % 3 == 0))
    table = pd.DataFrame([{"path": p, "patient": pt, "Cardiomegaly": int(a), "Pleural Effusion": int(b)} for p, pt, a, b in rows])
    table.to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def prepare_args(csv: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--csv", str(csv), "--images", str(csv.parent / "images"), "--out", str(out), "--folds", "3",
            "--max-size", "96", "--format", "png", "--samples-per-shard", "8", "--labels", "Cardiomegaly,Pleural Effusion", *extra]


def test_prepare_keeps_the_same_radiograph_of_two_patients_in_one_split_and_stores_fingerprints(radiographs, tmp_path, capsys):
    copies = {k: 2 * k for k in range(10)}  # ten patients whose only image is another patient's radiograph
    csv = write_generic(tmp_path / "raw", radiographs, copies)
    out = tmp_path / "shards"
    assert main(prepare_args(csv, out)) == 0
    said = capsys.readouterr().out
    assert "10 pairs of images are the same radiograph" in said and "whose 20 patients are kept in one split" in said
    manifest = load_one_manifest(out)
    table = read_fingerprints(out, manifest)
    assert manifest.fingerprints["file"] == FINGERPRINTS_NAME and len(table) == 58
    split_of = dict(zip(table.path, table.split))
    assert all(split_of[f"c{copy:03d}.jpg"] == split_of[f"p{source:03d}.png"] for copy, source in copies.items())
    # the stored fingerprints are those of the stored images, within the match threshold
    recomputed = fingerprints_from_shards(out, manifest)
    order = np.argsort(recomputed.key)
    assert np.array_equal(recomputed.key[order], np.sort(table.key))
    assert distance(recomputed.prints[order], table.prints[np.argsort(table.key)]).max() <= MATCH_BITS

    # a fold file that splits them is refused
    folds = tmp_path / "folds.csv"
    pd.DataFrame({"path": table.path, "patient": table.patient,
                  "split": [f"fold-{k % 3}" for k in range(len(table))]}).to_csv(folds, index=False)
    assert main(prepare_args(csv, tmp_path / "again", "--folds-from", str(folds))) == 2
    assert "puts the same radiograph in two splits" in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_datasets_of_one_run_must_not_hold_the_same_radiographs(radiographs, tmp_path):
    csv = write_generic(tmp_path / "raw", radiographs, {})
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(prepare_args(csv, first)) == 0
    assert main(prepare_args(csv, second, "--seed", "7", "--format", "jpg", "--max-size", "80")) == 0  # other folds, other bytes
    spec = [{"location": str(first), "name": "first"}, {"location": str(second), "name": "second"}]
    with pytest.raises(UserError, match=r"datasets first and second are not distinct: second has 48 images the same radiograph"):
        open_datasets(spec)
    # prepared before fingerprints were stored (manifest format 1): computed from the shards, the same refusal
    manifest = json.loads((second / "manifest.json").read_text())
    (second / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1, "fingerprints": {}}))
    (second / FINGERPRINTS_NAME).unlink()
    with pytest.raises(UserError, match="not distinct"):
        open_datasets(spec)


def write_nih(root: Path, radiographs: list[Path], patients: list[int], spelling: str) -> Path:
    """An NIH-format table (Data_Entry_2017 or its 2020 spelling) and its PNGs: one image per patient id given."""
    images = root / "images"
    images.mkdir(parents=True)
    end = "," if spelling == "2017" else ""  # the 2017 file ends every line with a comma, its 2020 revision does not
    lines = [NIH_HEADER.rstrip(",") + end]
    for radiograph, patient in zip(radiographs, patients):
        name = f"{patient:08d}_000.png"
        shutil.copy(radiograph, images / name)
        lines.append(f'{name},{NIH_FINDINGS[patient % len(NIH_FINDINGS)]},0,{patient},58,M,PA,2048,2048,0.143,0.143{end}')
    csv = root / f"Data_Entry_{spelling}.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def test_two_copies_of_one_public_source_must_not_share_patients(radiographs, tmp_path):
    """Two NIH uploads with different radiographs but patient ids in common (NIH's ids are global) are refused together;
    the same ids in generic CSVs (each hospital's own numbering) are not a leak."""
    first = write_nih(tmp_path / "up1", radiographs[:24], list(range(1, 25)), "2017")
    second = write_nih(tmp_path / "up2", radiographs[24:], list(range(20, 44)), "2020")  # patients 20..24 in both
    locations = {}
    for name, csv in (("up1", first), ("up2", second)):
        locations[name] = tmp_path / f"{name}-shards"
        assert main(["prepare", "--source", "nih", "--csv", str(csv), "--images", str(csv.parent / "images"), "--out", str(locations[name]),
                     "--folds", "2", "--max-size", "64", "--format", "png"]) == 0
    spec = [{"location": str(path), "name": name} for name, path in locations.items()]
    with pytest.raises(UserError, match=r"5 patients in both \(same source, so the same patient ids"):
        open_datasets(spec)
    for name in locations:  # the same tables as generic CSVs: patient ids local to each
        manifest = json.loads((locations[name] / "manifest.json").read_text())
        manifest["source"]["name"] = "csv"
        (locations[name] / "manifest.json").write_text(json.dumps(manifest))
    assert open_datasets(spec)[1].num_samples(["fold-0", "fold-1"]) == 48


def test_external_validation_refuses_resized_copies_of_training_images_or_leaves_them_out(evaluated_experiment, synth_shards, tmp_path):
    """An external dataset holding 30 of the training radiographs (resized, as JPEG, under other names and patients) next to
    30 new ones: refused with one line, or with --leave-out-overlap scored on the 30 new ones, said and recorded."""
    from cxrdist.data.synth.dataset import make_synthetic_dataset

    runs, _ = evaluated_experiment
    raw = synth_shards.parent / "raw"
    trained = pd.read_csv(raw / "labels.csv", dtype=str).head(30)
    new = pd.read_csv(make_synthetic_dataset(tmp_path / "new", n=30, size=96, seed=99, workers=1, progress=False), dtype=str)
    images = tmp_path / "external" / "images"
    images.mkdir(parents=True)
    for k, path in enumerate(trained["path"]):
        Image.fromarray(resized(load_for_shard(raw / "images" / path, 96), 0.8)).save(images / f"old{k:02d}.jpg", quality=90)
    for k, path in enumerate(new["path"]):
        shutil.copy(tmp_path / "new" / "images" / path, images / f"new{k:02d}.png")
    table = pd.concat([trained.assign(path=[f"old{k:02d}.jpg" for k in range(30)], patient=[f"X{k}" for k in range(30)]),
                       new.assign(path=[f"new{k:02d}.png" for k in range(30)], patient=[f"Y{k}" for k in range(30)])])
    table.to_csv(tmp_path / "external" / "labels.csv", index=False)
    shards = tmp_path / "external-shards"
    assert main(["prepare", "--csv", str(tmp_path / "external" / "labels.csv"), "--images", str(images), "--out", str(shards),
                 "--folds", "2", "--max-size", "64", "--format", "png"]) == 0

    def evaluate(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cxrdist", "evaluate", "--runs", str(runs), "--external", str(shards), "--split", "all",
                               "--resamples", "20", "--workers", "0", "--out", str(tmp_path / "scored"), *extra],
                              capture_output=True, text=True, env=cpu_env(1), timeout=600)

    refused = evaluate()
    assert refused.returncode == 2 and "has 30 images the same radiograph as one of the other's" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "scored").exists()
    scored = evaluate("--leave-out-overlap")
    assert scored.returncode == 0, scored.stderr
    assert "left out 30 external images of 30 patients" in scored.stderr
    metrics = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    assert metrics["num_samples"] == 30 and metrics["left_out"] == {"images": 30, "patients": 30}
    assert set(pd.read_csv(tmp_path / "scored" / "predictions.csv")["path"].str.split("/").str[-1]) == {f"new{k:02d}.png" for k in range(30)}
