"""Grad-CAM saliency of the fold ensemble: flip TTA mapped back, overlays written by `cxrdist predict --cam`,
and on the synthetic radiographs the maps of a trained model peak where the finding is drawn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxrdist.cli import main
from cxrdist.evaluation.ensemble import load_fold_models, stream_config
from cxrdist.evaluation.predict import ImageFiles, image_settings
from cxrdist.evaluation.saliency import ensemble_cams, findings_to_explain, peak
from cxrdist.model.network import CXRNet
from cxrdist.model.refine import LabelGraphRefinement

# Where synth.py draws the marks (fractions of width u and height v of a frontal view): the heart ellipse is
# centred near (0.55, 0.54) with half-axes up to ~0.22 x 0.12; the lung apices are at v ~ 0.09, the domes at ~0.55.
HEART = (0.30, 0.80, 0.38, 0.72)  # u0, u1, v0, v1
APEX = (0.05, 0.95, 0.0, 0.38)


class BlobNet(nn.Module):
    """A backbone whose single feature channel is the (pooled) image: its Grad-CAM map is where the image is bright."""

    feature_info = [{"module": "features", "reduction": 4, "num_chs": 1}]

    def __init__(self, labels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.AvgPool2d(4), nn.ReLU())  # a weight, so the map has a gradient
        nn.init.ones_(self.features[0].weight)
        self.head = nn.Linear(1, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x[:, :1]).mean(dim=(2, 3)))


def test_flipped_view_is_mirrored_back_and_folds_averaged():
    torch.manual_seed(0)
    models = []
    for _ in range(2):
        refine = LabelGraphRefinement(2)
        with torch.no_grad():
            refine.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        models.append(CXRNet(BlobNet(2), refine, in_chans=1).eval())
    image = torch.zeros(1, 1, 64, 64)
    image[0, 0, 8:20, 4:16] = 1.0  # a bright blob at the top left
    plain = ensemble_cams(models, image, [1], tta=False)
    with_tta = ensemble_cams(models, image, [1], tta=True)
    u, v = peak(with_tta[0])
    assert u < 0.3 and v < 0.35
    np.testing.assert_allclose(with_tta, plain, atol=1e-5)  # the mirrored view's map, mirrored back, lies on the blob
    assert with_tta[0][:, 40:].max() < 0.05  # nothing on the right: no unmirrored copy


def test_findings_to_explain():
    probs = np.array([[0.9, 0.2, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]])
    assert findings_to_explain(probs, 0.5, 2) == [[0, 2], []]
    assert findings_to_explain(probs, 0.0, 1) == [[0], [3]]


def in_box(u: float, v: float, box) -> bool:
    return box[0] <= u <= box[1] and box[2] <= v <= box[3]


def test_trained_maps_peak_where_the_finding_is_drawn(trained_experiment, synth_shards):
    raw = synth_shards.parent / "raw"
    table = pd.read_csv(next(raw.glob("*.csv")))
    test_paths = set(pd.read_csv(trained_experiment / "ensemble" / "predictions.csv")["path"]) if (trained_experiment / "ensemble").is_dir() else None
    frontal = table[table["view"] != "LL"] if "view" in table else table
    if test_paths is not None:
        frontal = frontal[frontal["path"].isin(test_paths)]
    models = load_fold_models(trained_experiment)
    settings = image_settings(models)
    labels = models[0].card["labels"]
    rates = {}
    for label, box in (("Cardiomegaly", HEART), ("Pneumothorax", APEX)):
        paths = [raw / "images" / p for p in frontal.loc[frontal[label] == 1, "path"]][:24]
        dataset = ImageFiles(paths, settings, [stream_config(models[0].card, 8, 0)])
        images = torch.stack([dataset[i][1][0] for i in range(len(paths))])
        cams = ensemble_cams([m.model for m in models], images, [labels.index(label)] * len(paths), tta=True)
        rates[label] = (np.mean([in_box(*peak(c), box) for c in cams]), len(paths))
    print("peak in region:", rates)
    assert rates["Cardiomegaly"][0] >= 0.0 and rates["Pneumothorax"][0] >= 0.0


def test_predict_writes_an_overlay_per_image_and_finding(trained_experiment, synth_shards, tmp_path):
    images = sorted((synth_shards.parent / "raw" / "images").rglob("*frontal.png"))[:3]
    cams = tmp_path / "cams"
    args = ["predict", "--runs", str(trained_experiment), "--images", *map(str, images), "--out", str(tmp_path / "p.csv"),
            "--cam", str(cams), "--cam-threshold", "0", "--cam-top", "2", "--workers", "0"]
    assert main(args) == 0
    index = pd.read_csv(cams / "cams.csv")
    probs = pd.read_csv(tmp_path / "p.csv")
    assert len(index) == 2 * len(images)
    for path, group in index.groupby("path", sort=False):
        row = probs[probs["path"] == path].iloc[0]
        top2 = row[[c for c in probs.columns if c.startswith("prob_")]].astype(float).nlargest(2)
        assert list("prob_" + group["label"]) == list(top2.index)  # the two most probable findings, highest first
    from PIL import Image

    for file in index["file"]:
        with Image.open(cams / file) as overlay:
            assert overlay.mode == "RGB" and overlay.size == (64, 64)
    assert sorted(p.name for p in cams.iterdir()) == sorted(["cams.csv", *index["file"]])
