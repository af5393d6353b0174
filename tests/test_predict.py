"""`cxrdist predict` on new files gives what `evaluate` gives for the same image in a shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxrdist.data.ingest.images import read_grayscale
from cxrdist.data.shards import SampleSpec, ShardJob, read_shard_samples, write_shard
from cxrdist.errors import UserError
from cxrdist.evaluation.prediction.image_files import stored_pixels
from cxrdist.evaluation.prediction.predict import collect_images, run_predict

SAMPLES = 3


def write_dicom(path: Path, pixels: np.ndarray) -> Path:
    """8-bit MONOCHROME2 DICOM whose window (center 128, width 256) maps the stored values onto themselves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "test"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def test_samples(evaluated_experiment, synth_shards) -> pd.DataFrame:
    runs, _ = evaluated_experiment
    table = pd.read_csv(runs / "ensemble" / "predictions.csv")
    picked = table.iloc[[0, len(table) // 2, len(table) - 1]].copy()
    picked["source"] = [synth_shards.parent / "raw" / "images" / p for p in picked["path"]]
    return picked


def prob_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith("prob_")]


def test_png_and_dicom_give_the_evaluated_probabilities(evaluated_experiment, test_samples, tmp_path, capsys):
    runs, _ = evaluated_experiment
    dicoms = []
    for i, source in enumerate(test_samples["source"]):
        pixels = read_grayscale(source)
        dicom = write_dicom(tmp_path / "dicom" / f"image{i}", pixels)  # no suffix: found by its DICM marker
        assert np.array_equal(read_grayscale(dicom), pixels)
        dicoms.append(dicom)
    broken = tmp_path / "dicom" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    files = [*test_samples["source"], tmp_path / "dicom"]

    out = run_predict(runs, files, tmp_path / "preds.csv", batch_size=4, workers=1)
    assert f"{broken}" in capsys.readouterr().err
    table = pd.read_csv(out)
    expected = test_samples[prob_columns(test_samples)].to_numpy()
    labels = [c.removeprefix("prob_") for c in prob_columns(test_samples)]
    assert list(table.columns) == ["path", "operating_point"] + [c for label in labels for c in (f"prob_{label}", f"call_{label}")]
    assert list(table["path"]) == [str(p) for p in [*test_samples["source"], *dicoms]]  # broken.png skipped, order kept
    np.testing.assert_allclose(table[prob_columns(table)].to_numpy()[:SAMPLES], expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(table[prob_columns(table)].to_numpy()[SAMPLES:], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_predict_stores_pixels_as_prepare_does(synth_shards, tmp_path, fmt):
    """The bytes predict feeds the decoder are the bytes prepare writes to a shard (JPEG: after the q95 round trip)."""
    images = synth_shards.parent / "raw" / "images"
    paths = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))[:4]
    specs = tuple(SampleSpec(f"k{i}", p, "p", "s", "AP", (None,)) for i, p in enumerate(paths))
    image = {"format": fmt, "max_size": 40, "quality": 95}
    write_shard(ShardJob(str(images), str(tmp_path / "shard.tar"), specs, fmt, image["max_size"], image["quality"], skip_bad=False))
    stored = [data for _, data, _ in read_shard_samples(tmp_path / "shard.tar")]
    assert stored == [stored_pixels(images / p, image) for p in paths]


def test_collect_images_and_errors(evaluated_experiment, tmp_path):
    runs, _ = evaluated_experiment
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.PNG", "a/b/y.jpeg", "a/b/z.dcm", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"junk")
    found = collect_images([tmp_path / "a", tmp_path / "a" / "x.PNG"])
    assert found == [tmp_path / "a" / "b" / "y.jpeg", tmp_path / "a" / "b" / "z.dcm", tmp_path / "a" / "x.PNG"]
    with pytest.raises(UserError, match="no such file or directory"):
        collect_images([tmp_path / "missing.png"])
    with pytest.raises(UserError, match="none of the 3 image files could be read"):
        run_predict(runs, [tmp_path / "a"], tmp_path / "out.csv", workers=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no PNG, JPEG or DICOM files"):
        run_predict(runs, [tmp_path / "empty"], tmp_path / "out.csv", workers=0)
