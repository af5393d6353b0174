"""An exported model needs nothing of cxrdist: the folder `cxrdist export` writes (model, sidecar, preprocess.py), run by
a Python that cannot import cxrdist, gives `cxrdist predict`'s probabilities to 1e-5 on PNG (8 and 16 bit, RGB), JPEG
(large: DCT-scaled decode; EXIF-rotated) and DICOM (8, 10 and 16 bit; rescale, Modality LUT Sequence, VOI LUT Sequence,
window, MONOCHROME1) radiographs, for models trained on PNG-stored and on JPEG-q95-stored images, and for a model
whose card predates the Pillow resize and training's JPEG draft side; their inputs are the evaluation stream's.

tests/data/cr_chest_mono1.dcm is a real chest radiograph: the public sample CR-MONO1-10-chest (Fuji CR, PA, 440 x 440,
10 bits stored, MONOCHROME1, window 550/1024; in fo-dicom's and dcmfx's test data), 4 x 4 block-averaged to 110 x 110,
its header kept. Every other file here is written from its pixels.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from cxrdist.cli import main
from cxrdist.data import preprocess
from cxrdist.data.shards import RawSample
from cxrdist.data.stream import StreamConfig, decode_eval_batch
from cxrdist.data.transforms import train_draft_side
from cxrdist.layout import CARD_FILE, fold_best_dirs
from cxrdist.model.card import ModelCard

REAL_CR = Path(__file__).parent / "data" / "cr_chest_mono1.dcm"
RUNNER = '''
import importlib.abc, json, sys

class NoCxrdist(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cxrdist" or name.startswith("cxrdist."):
            raise ImportError(f"{name}: an exported model must not need cxrdist")

sys.meta_path.insert(0, NoCxrdist())
folder, model, *images = sys.argv[1:]
sys.path.insert(0, folder)
import numpy as np
import preprocess

sidecar = json.load(open(f"{folder}/{model}.json"))
preprocessing = sidecar["preprocessing"]


def run(arguments, keep=None):
    batch = np.stack([getattr(preprocess, preprocessing["function"])(p, **arguments) for p in images])
    if keep:
        np.save(keep, batch)
    if sidecar["format"] == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(f"{folder}/{model}", providers=["CPUExecutionProvider"])
        return session.run(None, {sidecar["input"]["name"]: batch})[0].tolist()
    import torch
    return torch.jit.load(f"{folder}/{model}")(torch.from_numpy(batch)).detach().numpy().tolist()


probabilities = run(preprocessing["arguments"], keep="inputs.npy")  # the model inputs, for the test to compare
lossless = run({**preprocessing["arguments"], "stored_format": "png"})  # without the JPEG round trip of the training images
loaded = sorted(m for m in sys.modules if m == "cxrdist" or m.startswith("cxrdist."))
print(json.dumps({"probabilities": probabilities, "lossless": lossless, "preprocessor": preprocess.__file__, "cxrdist_modules": loaded}))
'''


def dicom_like(real: Dataset, pixels: np.ndarray, photometric: str, bits_stored: int, **attrs) -> Dataset:
    """The real radiograph's header with other pixels and display attributes (window, LUTs) replaced by `attrs`."""
    ds = copy.deepcopy(real)
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "VOILUTSequence", "ModalityLUTSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits_stored)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def lut_item(first: int, data: np.ndarray, **attrs) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), first, 16]
    item.add_new("LUTData", "US", [int(v) for v in data])
    for keyword, value in attrs.items():
        setattr(item, keyword, value)
    return item


def write_radiographs(folder: Path) -> list[Path]:
    real = pydicom.dcmread(REAL_CR)
    raw = real.pixel_array  # uint16, 10 bits stored, MONOCHROME1 (bone dark in the stored values)
    gray = preprocess.read_dicom(real)  # bone bright, 8 bit
    inverted = (1023 - raw).astype(np.uint16)
    files: dict[str, Dataset | Image.Image | bytes] = {
        "cr_mono1_window.dcm": real,
        "cr_mono2_voi_lut_sequence.dcm": dicom_like(
            real, inverted, "MONOCHROME2", 10,
            VOILUTSequence=Sequence([lut_item(0, np.rint(65535 * (np.arange(1024) / 1023) ** 0.6).astype(np.uint16))])),
        "cr_modality_lut_sequence.dcm": dicom_like(
            real, inverted, "MONOCHROME2", 10,
            ModalityLUTSequence=Sequence([lut_item(0, np.rint(4095 * np.sqrt(np.arange(1024) / 1023)).astype(np.uint16), ModalityLUTType="US")])),
        "cr_8bit.dcm": dicom_like(real, gray, "MONOCHROME2", 8),
        "cr_16bit_rescale_window.dcm": dicom_like(real, (inverted.astype(np.uint32) * 64 + 17).astype(np.uint16), "MONOCHROME2", 16,
                                                  RescaleSlope=0.5, RescaleIntercept=-1000, WindowCenter=15000, WindowWidth=33000),
        "cr_8bit.png": Image.fromarray(gray),
        "cr_16bit.png": Image.fromarray(inverted * np.uint16(4)),  # 12-bit values in a 16-bit PNG
        "cr_rgb.png": Image.fromarray(gray).convert("RGB"),
        "cr_small.jpg": Image.fromarray(gray),
        "cr_large.jpg": Image.fromarray(gray).resize((720, 700), Image.Resampling.BICUBIC),  # decoded at a reduced DCT scale
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored turned 90 degrees counter-clockwise, displayed upright
    rotated = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(gray[:, 10:]))).save(rotated, format="JPEG", quality=90, exif=exif.tobytes())
    files["cr_exif_rotated.jpg"] = rotated.getvalue()
    paths = []
    for name, content in files.items():
        path = folder / name
        if isinstance(content, Dataset):
            content.save_as(path, enforce_file_format=True)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content.save(path, **({"quality": 90} if name.endswith(".jpg") else {}))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory) -> list[Path]:
    paths = write_radiographs(tmp_path_factory.mktemp("radiographs"))
    by_name = {p.name: p for p in paths}
    with Image.open(by_name["cr_16bit.png"]) as png:
        assert png.mode.startswith("I")  # really a 16-bit PNG
    readings = {name: preprocess.read_grayscale(p) for name, p in by_name.items()}
    assert readings["cr_exif_rotated.jpg"].shape == (110, 100)  # EXIF orientation applied: stored 100 rows x 110 columns
    for name, pixels in readings.items():  # each a radiograph, bone bright: the spine column brighter than the lung fields
        columns = pixels.astype(float).mean(axis=0)
        width = len(columns)
        assert columns[int(width * 0.45):int(width * 0.55)].mean() > columns[int(width * 0.2):int(width * 0.3)].mean() + 10, name
    return paths


def runs_with(trained_experiment: Path, folder: Path, stored_image: dict | None, resampler: str | None) -> Path:
    """The session's fold models (weights and cards) in `folder`, their cards saying the training images were stored as
    `stored_image` and resized for evaluation by `resampler`: what predict and export replay. A legacy resampler's card
    is a card from before the evaluation decode was recorded too (no image.eval_decode)."""
    for best in fold_best_dirs(trained_experiment):
        target = folder / best.relative_to(trained_experiment)
        shutil.copytree(best, target)
        card = ModelCard.read(target)
        image = dataclasses.replace(card.image, resampler=resampler) if resampler else card.image
        dataclasses.replace(card, stored_image=stored_image or card.stored_image, image=image).write(target)
        if resampler == "torchvision":
            data = json.loads((target / CARD_FILE).read_text())
            del data["image"]["eval_decode"]
            (target / CARD_FILE).write_text(json.dumps(data))
    return folder


def evaluation_inputs(paths: list[Path], card: ModelCard) -> np.ndarray:
    """What the evaluation stream feeds the model for these radiographs, stored as `prepare` stored the card's shards."""
    stored = card.stored_image
    raw = [RawSample(p.name, preprocess.stored_image(p, stored["format"], int(stored["max_size"]), int(stored.get("quality", 95))),
                     json.dumps({"labels": [0] * card.num_labels}).encode()) for p in paths]
    return decode_eval_batch(raw, StreamConfig(card.image), card.num_labels, hflip=False)["image"].numpy()


@pytest.mark.parametrize("case, fmt, tta", [
    ("as trained: png at 64 px", "onnx", True),
    ("jpg q95 at 160 px", "torchscript", False),
    ("legacy card: torchvision resize", "onnx", False),
])
def test_the_exported_folder_alone_gives_predicts_probabilities(trained_experiment, radiographs, tmp_path, case, fmt, tta):
    stored = {"format": "jpg", "max_size": 160, "quality": 95} if case.startswith("jpg") else None
    runs = runs_with(trained_experiment, tmp_path / "runs", stored, "torchvision" if case.startswith("legacy") else None)
    folder = tmp_path / "exported"
    model = f"cxr.{fmt}"
    assert main(["export", "--runs", str(runs), "--format", fmt, "--out", str(folder / model)] + (["--tta"] if tta else [])) == 0
    assert main(["predict", "--runs", str(runs), "--images", *map(str, radiographs), "--out", str(tmp_path / "preds.csv"),
                 "--workers", "0"] + ([] if tta else ["--no-tta"])) == 0
    predicted = pd.read_csv(tmp_path / "preds.csv")
    assert list(predicted["path"]) == [str(p) for p in radiographs]

    assert sorted(p.name for p in folder.iterdir()) == sorted([model, model + ".json", "preprocess.py"])
    assert (folder / "preprocess.py").read_bytes() == Path(preprocess.__file__).read_bytes()
    sidecar = json.loads((folder / f"{model}.json").read_text())
    steps = sidecar["preprocessing"]
    card = ModelCard.read(fold_best_dirs(runs)[0])
    assert steps["preprocessor"] == "preprocess.py" and steps["arguments"]["resampler"] == card.image.resampler
    assert steps["arguments"]["interpolation"] == card.image.interpolation and card.image.interpolation in steps["resize_filter"]
    assert steps["arguments"]["stored_format"] == card.stored_image["format"] and steps["made_with"]["pillow"]
    # a stored JPEG is decoded at training's draft side (2x it is 166 px: the 160 px JPEGs are decoded in full, not at 1/2
    # scale); a card from before keeps the input size its numbers were computed at
    legacy = case.startswith("legacy")
    assert card.image.eval_decode == ("img_size" if legacy else "train_draft_side")
    assert card.image.size == 64 and train_draft_side(64) == 83
    assert steps["arguments"]["draft_side"] == (64 if legacy else 83)

    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-I", str(runner), str(folder), model, *map(str, radiographs)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outside = json.loads(result.stdout)
    assert outside["cxrdist_modules"] == [] and Path(outside["preprocessor"]).parent == folder
    expected = predicted[[f"prob_{label}" for label in sidecar["labels"]]].to_numpy()
    np.testing.assert_allclose(np.array(outside["probabilities"]), expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "inputs.npy"), evaluation_inputs(radiographs, card))  # evaluate's input
    moved = np.abs(np.array(outside["lossless"]) - expected).max()  # the stored format matters: 1e-5 sees a skipped JPEG round trip
    assert moved > 1e-4 if stored else moved < 1e-6, moved


ALLOWED_IMPORTS = {"numpy", "PIL", "pydicom", "torch", "torchvision"}  # torch/torchvision: only for a legacy card's resize


def test_the_preprocessor_imports_nothing_but_numpy_pillow_pydicom_and_the_standard_library():
    tree = ast.parse(Path(preprocess.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    foreign = sorted(imported - ALLOWED_IMPORTS - set(sys.stdlib_module_names))
    assert not foreign and {"numpy", "PIL", "pydicom"} <= imported, foreign
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))  # no relative import either
