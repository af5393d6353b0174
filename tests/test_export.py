"""`cxrdist export`: the ONNX (run with onnxruntime on the CPU) and TorchScript files give `cxrdist predict`'s probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pandas as pd
import pytest
import torch

from cxrdist.cli import main
from cxrdist.evaluation.prediction.models import load_fold_models
from cxrdist.evaluation.prediction.image_files import ImageFiles
from cxrdist.evaluation.prediction.predict import image_settings, run_predict
from cxrdist.model.card import ModelCard


@pytest.fixture(scope="module")
def images(evaluated_experiment, synth_shards):
    runs, _ = evaluated_experiment
    table = pd.read_csv(runs / "ensemble" / "predictions.csv")
    return [synth_shards.parent / "raw" / "images" / p for p in table["path"].iloc[[0, 5, 10, 20]]]


def preprocessed(runs, images) -> np.ndarray:
    """The batch `cxrdist predict` feeds the models, built by its own dataset."""
    models = load_fold_models(runs)
    dataset = ImageFiles(images, image_settings(models), [models[0].card.image])
    return torch.stack([dataset[i][1][0] for i in range(len(images))]).numpy()


@pytest.mark.parametrize("fmt,tta", [("onnx", True), ("torchscript", False)])
def test_exported_model_matches_predict(evaluated_experiment, images, tmp_path, fmt, tta):
    runs, metrics = evaluated_experiment
    out = tmp_path / f"model.{fmt}"
    assert main(["export", "--runs", str(runs), "--format", fmt, "--out", str(out)] + (["--tta"] if tta else [])) == 0
    expected = pd.read_csv(run_predict(runs, images, tmp_path / "preds.csv", tta=tta, batch_size=4, workers=0))
    expected = expected[[f"prob_{label}" for label in metrics["labels"]]].to_numpy()
    batch = preprocessed(runs, images)
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": batch})[0]
        got_one = session.run(None, {"images": batch[:1]})[0]  # the batch axis is dynamic
        np.testing.assert_allclose(got_one, got[:1], rtol=0, atol=1e-6)
    else:
        got = torch.jit.load(str(out))(torch.from_numpy(batch)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)

    card = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    assert card["labels"] == metrics["labels"] and card["tta"] is tta and card["models"] == ["fold-0", "fold-1"]
    assert card["harmonised_labels"] == ModelCard.read(runs / "fold-0" / "best").vocabulary.harmonised  # CheXpert's names: themselves
    assert card["input"]["shape"][1:] == list(batch.shape[1:])
    label = metrics["labels"][2]
    assert card["thresholds"][label]["sens@spec90"] == metrics["operating_points"]["per_label"][label]["sens@spec90"]["threshold"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["preds.csv", out.name, out.name + ".json", "preprocess.py"])  # no temporaries left


def test_export_user_errors(evaluated_experiment, tmp_path, capsys):
    assert main(["export", "--runs", str(tmp_path / "nope"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no such runs directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_writes_its_preprocessor_only_over_an_earlier_exports(evaluated_experiment, tmp_path, capsys):
    runs, _ = evaluated_experiment
    mine = tmp_path / "preprocess.py"
    mine.write_text("print('my own script')\n")
    assert main(["export", "--runs", str(runs), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a cxrdist preprocessor" in err and str(mine) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preprocess.py"] and mine.read_text() == "print('my own script')\n"
    assert main(["export", "--runs", str(runs), "--format", "torchscript", "--out", str(tmp_path / "preprocess.py")]) == 2
    assert "name of the preprocessor" in capsys.readouterr().err

    mine.write_bytes(b'"""Reference preprocessing of cxrdist models, as an older cxrdist wrote it"""\n')
    assert main(["export", "--runs", str(runs), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    from cxrdist.data import preprocess

    assert mine.read_bytes() == Path(preprocess.__file__).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.json", "preprocess.py"]
