"""model.json: the typed ModelCard round-trips, validates, and refuses old or foreign cards in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cxrdist.data.manifest import Manifest, ShardInfo, SplitInfo
from cxrdist.data.spec import ImageSpec
from cxrdist.data.transforms import eval_draft_side, train_draft_side
from cxrdist.errors import UserError
from cxrdist.model.card import CARD_FORMAT_VERSION, CardEvaluation, ModelCard
from cxrdist.model.config import ModelConfig, RefineConfig

LABELS = ["Edema", "Atelectasis", "Cardiomegaly"]


def manifest() -> Manifest:
    shards = [ShardInfo("fold-0/shard-000000.tar", 10, 100, "ab" * 32)]
    return Manifest(LABELS, {"fold-0": SplitInfo(10, 5, shards)}, num_folds=1, seed=3, source={},
                    image={"format": "jpg", "max_size": 128, "quality": 95})


def card_arguments(tmp_path) -> dict:
    model = ModelConfig(backbone="test_resnet", pretrained=True, pretrained_path="/somewhere/w.safetensors", refine=RefineConfig(alpha=0.5))
    image = ImageSpec(64, 3, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "bicubic")
    metrics = {"split": "fold-0", "ema": {"macro_auc": 0.75, "per_label": {"Edema": float("nan")}}, "live": {"macro_auc": 0.7}}
    return dict(model=model, labels=LABELS, policy=["ones", "ones", "zeros"], image=image, manifest=manifest(), shards=tmp_path,
                experiment="exp", fold=0, step=12, epoch=1.5, eval_batch_size=16, metrics=metrics)


def card(tmp_path) -> ModelCard:
    return ModelCard.build(**card_arguments(tmp_path))


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


def test_unknown_sections_survive(tmp_path):
    data = json.loads(card(tmp_path).to_json())
    data["later_section"] = {"x": 1}
    again = ModelCard.from_dict(data)
    assert again.extra == {"later_section": {"x": 1}}
    assert json.loads(again.to_json())["later_section"] == {"x": 1}


def test_evaluation_section_records_the_rule_next_to_the_training_policy(tmp_path):
    policy = dict(zip(LABELS, ["ones", "ones", "zeros"]))
    data = json.loads(card(tmp_path).to_json())
    assert data["evaluation"] == {"targets": "ignore_uncertain", "training_policy": policy}  # build's default rule
    zeros = ModelCard.build(**{**card_arguments(tmp_path), "evaluation": CardEvaluation.of("zeros", LABELS, ["ones", "ones", "zeros"])})
    again = ModelCard.from_json(zeros.to_json())
    assert again.evaluation == CardEvaluation("zeros", policy) and again.evaluation.training_policy == again.label_policy
    data.pop("evaluation")  # a card written before the section existed: the default rule, the card's training policy
    assert ModelCard.from_dict(data).evaluation == CardEvaluation("ignore_uncertain", policy)


def test_the_evaluation_resampler_is_recorded_and_a_card_without_it_keeps_torchvisions(tmp_path):
    """Cards written before the evaluation resize moved to Pillow (data/preprocess.py) resized with torchvision: their
    models keep it, so evaluating them again gives the numbers they hold (tests/test_transforms.py: the two differ)."""
    data = json.loads(card(tmp_path).to_json())
    assert data["image"]["resampler"] == "pillow" and ModelCard.from_dict(data).image.resampler == "pillow"
    data["image"].pop("resampler")
    legacy = ModelCard.from_dict(data)
    assert legacy.image.resampler == "torchvision" and json.loads(legacy.to_json())["image"]["resampler"] == "torchvision"
    assert legacy.image != card(tmp_path).image  # another input: a pass of its own (groups_by_preprocessing), not one export


def test_the_evaluation_decode_is_recorded_and_a_card_without_it_keeps_the_draft_at_the_input_size(tmp_path):
    """Cards written before evaluation decoded stored JPEGs at training's draft side decoded them at the input size: their
    models keep that (tests/test_stream.py: the two differ from 2x the input size on), so their numbers reproduce."""
    data = json.loads(card(tmp_path).to_json())
    assert data["image"]["eval_decode"] == "train_draft_side" and eval_draft_side(ModelCard.from_dict(data).image) == train_draft_side(64)
    data["image"].pop("eval_decode")
    legacy = ModelCard.from_dict(data)
    assert legacy.image.eval_decode == "img_size" and json.loads(legacy.to_json())["image"]["eval_decode"] == "img_size"
    assert eval_draft_side(legacy.image) == 64 and legacy.image.resampler == "pillow"
    assert legacy.image != card(tmp_path).image  # another input: a pass of its own (groups_by_preprocessing)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format_version=1, kind=None), "older cxrdist"),
    (lambda d: d.clear(), "not a cxrdist model card"),
    (lambda d: d.update(format_version=99), "format version 99"),
    (lambda d: d.pop("labels"), "lacks labels"),
    (lambda d: d["label_policy"].pop("Edema"), "label_policy"),
    (lambda d: d["image"].update(channels=1), "in_chans"),
    (lambda d: d["image"].update(interpolation="lanczos9"), "interpolation"),
    (lambda d: d["image"].update(resampler="opencv"), "resampler"),
    (lambda d: d["image"].update(eval_decode="full"), "eval_decode"),
    (lambda d: d["model"].update(no_such_field=1), "malformed"),
    (lambda d: d["evaluation"].update(targets="U-Ones"), "evaluation.targets"),
    (lambda d: d["evaluation"]["training_policy"].update(Edema="zeros"), "training_policy differs"),
    (lambda d: d.update(evaluation={"uncertain": "exclude"}), "evaluation must hold"),
    (lambda d: d.pop("vocabulary"), "lacks vocabulary"),
    (lambda d: d["vocabulary"].update(harmonised=["Edema"]), "each of the 3 labels"),
    (lambda d: d["vocabulary"].update(harmonised=["Edema", "Edema", "X"]), "names a label twice"),
    (lambda d: d.update(vocabulary=["Edema"]), "vocabulary must hold"),
])
def test_bad_cards_are_one_line_user_errors(tmp_path, change, message):
    data = json.loads(card(tmp_path).to_json())
    change(data)
    with pytest.raises(UserError, match=message) as err:
        ModelCard.from_dict(data, "x/model.json")
    assert "\n" not in str(err.value) and str(err.value).startswith("x/model.json")


def test_the_card_records_the_harmonised_names_and_where_the_vocabulary_came_from(tmp_path):
    """One NIH-prepared dataset: the model keeps the table's names, the card records what they are called harmonised
    (so --external, lodo and export match through the same names); NIH's 'No Finding' keeps a name of its own."""
    nih = manifest()
    nih.labels, nih.source = ["Effusion", "No Finding", "Cardiomegaly"], {"name": "nih"}
    built = ModelCard.build(**{**card_arguments(tmp_path), "labels": nih.labels, "manifest": nih, "shards": tmp_path / "nih-shards"})
    again = ModelCard.from_json(built.to_json())
    assert again.vocabulary.origin == "dataset"
    assert again.vocabulary.harmonised == ["Pleural Effusion", "No Finding (NIH)", "Cardiomegaly"]
    assert again.vocabulary.datasets == {"nih-shards": {"source": "nih", "labels": nih.labels, "label_map": {}}}


def test_a_format_2_card_still_loads_with_the_vocabulary_its_labels_imply(tmp_path):
    data = json.loads(card(tmp_path).to_json())
    data.pop("vocabulary")
    data.update(format_version=2, labels=["Effusion", "No Finding", "Cardiomegaly"],
                label_policy={"Effusion": "ones", "No Finding": "ones", "Cardiomegaly": "zeros"})
    data["evaluation"]["training_policy"] = data["label_policy"]
    old = ModelCard.from_dict(data)
    assert old.vocabulary.origin == "card format 2"
    assert old.vocabulary.harmonised == ["Pleural Effusion", "No Finding (source not recorded)", "Cardiomegaly"]


def test_cli_refuses_an_old_card_in_one_line(tmp_path):
    best = tmp_path / "fold-0" / "best"
    best.mkdir(parents=True)
    (best / "model.json").write_text(json.dumps({"format_version": 1, "labels": LABELS, "fold": 0}))
    (best / "model.safetensors").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "cxrdist", "evaluate", "--runs", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "older cxrdist" in result.stderr
