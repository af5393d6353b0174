"""model.json: the typed ModelCard round-trips, validates, and refuses old or foreign cards in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cxrdist.data.manifest import Manifest, ShardInfo, SplitInfo
from cxrdist.data.spec import ImageSpec
from cxrdist.errors import UserError
from cxrdist.model.card import CARD_FORMAT_VERSION, ModelCard
from cxrdist.model.config import ModelConfig, RefineConfig

LABELS = ["Edema", "Atelectasis", "Cardiomegaly"]


def manifest() -> Manifest:
    shards = [ShardInfo("fold-0/shard-000000.tar", 10, 100, "ab" * 32)]
    return Manifest(LABELS, {"fold-0": SplitInfo(10, 5, shards)}, num_folds=1, seed=3, source={},
                    image={"format": "jpg", "max_size": 128, "quality": 95})


def card(tmp_path) -> ModelCard:
    model = ModelConfig(backbone="test_resnet", pretrained=True, pretrained_path="/somewhere/w.safetensors", refine=RefineConfig(alpha=0.5))
    image = ImageSpec(64, 3, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "bicubic")
    metrics = {"split": "fold-0", "ema": {"macro_auc": 0.75, "per_label": {"Edema": float("nan")}}, "live": {"macro_auc": 0.7}}
    return ModelCard.build(model, LABELS, ["ones", "ones", "zeros"], image, manifest(), tmp_path, experiment="exp", fold=0, step=12,
                           epoch=1.5, eval_batch_size=16, metrics=metrics)


def test_round_trip_keeps_every_field_and_writes_strict_json(tmp_path):
    original = card(tmp_path)
    path = original.write(tmp_path)
    data = json.loads(path.read_text())  # strict: NaN became null
    assert data["format_version"] == CARD_FORMAT_VERSION and data["metrics"]["ema"]["per_label"]["Edema"] is None
    assert data["dataset"] == manifest().identity() and data["stored_image"]["max_size"] == 128
    assert "refinement" not in data and data["model"]["refine"]["alpha"] == 0.5  # alpha recorded once
    again = ModelCard.read(tmp_path)
    assert again.model == ModelConfig(backbone="test_resnet", refine=RefineConfig(alpha=0.5))  # pretrained source not kept
    assert again.image == original.image and again.policy() == ["ones", "ones", "zeros"]
    assert (again.labels, again.fold, again.step, again.eval_batch_size) == (LABELS, 0, 12, 16)
    assert again.to_json() == original.to_json()


def test_unknown_sections_survive_and_evaluation_has_room(tmp_path):
    data = json.loads(card(tmp_path).to_json())
    data["evaluation"] = {"uncertain": "exclude"}
    data["later_section"] = {"x": 1}
    again = ModelCard.from_dict(data)
    assert again.evaluation == {"uncertain": "exclude"} and again.extra == {"later_section": {"x": 1}}
    assert json.loads(again.to_json())["later_section"] == {"x": 1}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format_version=1, kind=None), "older cxrdist"),
    (lambda d: d.clear(), "not a cxrdist model card"),
    (lambda d: d.update(format_version=99), "format version 99"),
    (lambda d: d.pop("labels"), "lacks labels"),
    (lambda d: d["label_policy"].pop("Edema"), "label_policy"),
    (lambda d: d["image"].update(channels=1), "in_chans"),
    (lambda d: d["image"].update(interpolation="lanczos9"), "interpolation"),
    (lambda d: d["model"].update(no_such_field=1), "malformed"),
])
def test_bad_cards_are_one_line_user_errors(tmp_path, change, message):
    data = json.loads(card(tmp_path).to_json())
    change(data)
    with pytest.raises(UserError, match=message) as err:
        ModelCard.from_dict(data, "x/model.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("x/model.json")


def test_cli_refuses_an_old_card_in_one_line(tmp_path):
    best = tmp_path / "fold-0" / "best"
    best.mkdir(parents=True)
    (best / "model.json").write_text(json.dumps({"format_version": 1, "labels": LABELS, "fold": 0}))
    (best / "model.safetensors").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "cxrdist", "evaluate", "--runs", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "older cxrdist" in result.stderr
