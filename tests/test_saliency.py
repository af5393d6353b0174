"""Grad-CAM saliency of the fold ensemble: flip TTA mapped back, overlays written by `cxrdist predict --cam`,
and on the synthetic radiographs the maps of a trained model peak where the finding is drawn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cxrdist.cli import main
from cxrdist.data.synth.label_table import LABELS
from cxrdist.data.synth.render import render_radiograph
from cxrdist.evaluation.prediction.saliency import ensemble_cams, findings_to_explain, peak
from cxrdist.model.config import ModelConfig
from cxrdist.model.network import CXRNet, build_model
from cxrdist.model.refine import LabelGraphRefinement

# Where data/synth/render.py draws the marks (fractions of width u and height v of a frontal view): the heart ellipse is
# centred near (0.55, 0.54) with half-axes up to ~0.22 x 0.12; the lung apices are at v ~ 0.09, the domes at ~0.55.
HEART = (0.30, 0.80, 0.38, 0.72)  # u0, u1, v0, v1
APEX = (0.05, 0.95, 0.0, 0.38)  # the apices and the first ~third of the lungs' height
UPPER_LUNG = (0.05, 0.95, 0.0, 0.45)  # the lungs above the hila
FINDINGS = ("Cardiomegaly", "Pneumothorax")


class BlobNet(nn.Module):
    """A backbone whose single feature channel is the (pooled) image: its Grad-CAM map is where the image is bright."""

    def __init__(self, labels: int) -> None:
        super().__init__()
        self.feature_info = [{"module": "features", "reduction": 4, "num_chs": 1}]
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


def rendered(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n frontal (PA) synthetic radiographs at 64 px, each showing Cardiomegaly and Pneumothorax with probability 1/2
    and nothing else, normalised as the eval stream does; targets (n, 2)."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 2)) < 0.5).astype(np.float32)
    signs = np.zeros((n, len(LABELS)))
    signs[:, [LABELS.index(label) for label in FINDINGS]] = targets
    images = np.stack([render_radiograph(signs[i], "PA", 64, seed, i, i) for i in range(n)])
    return torch.from_numpy(images).float().div(255).sub(0.5).div(0.25)[:, None], torch.from_numpy(targets)


@pytest.fixture(scope="module")
def localising_models() -> list[CXRNet]:
    """Two "fold" models (test_resnet, 64 px, refinement on) trained for 150 steps on 600 rendered radiographs:
    the smallest thing we found whose two findings reach AUC ~1 (the session's 1-epoch fixture reaches ~0.6).
    Not cheaper on purpose: alone, the seed-2 model (150 steps) puts Cardiomegaly's peak in the apex band (heart 0.12, apex 0.62),
    and at 60 steps seeds 1-2 drop to 0.90 / 0.36 in the heart; two models averaged are what makes the rates stable."""
    images, targets = rendered(600, seed=1)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(backbone="test_resnet", pretrained=False, in_chans=1), len(FINDINGS))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(150):
            batch = torch.randint(0, len(images), (32,))
            loss = nn.functional.binary_cross_entropy_with_logits(model(images[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        models.append(model.eval())
    return models


def test_trained_maps_peak_where_the_finding_is_drawn(localising_models):
    images, targets = rendered(96, seed=2)
    rates = {}
    for j, (label, box) in enumerate(zip(FINDINGS, (HEART, UPPER_LUNG))):
        positive = targets[:, j] > 0
        cams = ensemble_cams(localising_models, images[positive], [j] * int(positive.sum()), tta=True)
        peaks = [peak(c) for c in cams]
        rates[label] = float(np.mean([in_box(u, v, box) for u, v in peaks]))
        rates[label + " apex"] = float(np.mean([in_box(u, v, APEX) for u, v in peaks]))
    print("peak in region:", rates)
    # Measured (2-core VM, this fixture): Cardiomegaly 1.00 in the heart box, 0.00 in the apex box; Pneumothorax 1.00 in the
    # upper lung, 0.38 in the strict apex box (render.py's rim is widest along the upper lateral chest wall, not at the very top).
    # The boxes cover 17% and 45% of the image. Asserted with a margin:
    assert rates["Cardiomegaly"] >= 0.8
    assert rates["Cardiomegaly apex"] <= 0.2  # the two findings' maps point to different places
    assert rates["Pneumothorax"] >= 0.8


def test_predict_writes_an_overlay_per_image_and_finding(trained_experiment, synth_shards, tmp_path):
    images = sorted((synth_shards.parent / "raw" / "images").rglob("*frontal.png"))[:3]
    cams = tmp_path / "cams"
    args = ["predict", "--runs", str(trained_experiment), "--images", *map(str, images), "--out", str(tmp_path / "p.csv"),
            "--cam", str(cams), "--cam-threshold", "0", "--cam-top", "2", "--workers", "0"]
    assert main(args) == 0
    index = pd.read_csv(cams / "cams.csv", keep_default_na=False)
    probs = pd.read_csv(tmp_path / "p.csv")
    assert len(index) == 2 * len(images)
    for path, group in index.groupby("path", sort=False):
        row = probs[probs["path"] == path].iloc[0]
        top2 = row[[c for c in probs.columns if c.startswith("prob_") and c != "prob_No Finding"]].astype(float).nlargest(2)
        assert list("prob_" + group["label"]) == list(top2.index)  # the two most probable findings (No Finding has no map), highest first
    assert set(index["chest_flag"]) <= {"", "peak outside the chest", "map mostly outside the chest"}
    assert ((index["chest_fraction"] >= 0) & (index["chest_fraction"] <= 1)).all()
    from PIL import Image

    for file in index["file"]:
        with Image.open(cams / file) as overlay:
            # at the stored size (64 px here) under a caption band that names the finding
            assert overlay.mode == "RGB" and overlay.width == 64 and overlay.height > 64
    assert sorted(p.name for p in cams.iterdir()) == sorted(["cams.csv", *index["file"]])
    assert main([*args[:-4], "--cam-top", "0"]) == 2  # a user error: one line, exit 2
