"""Evaluation targets do not depend on the training policy (cxrdist/labels/eval_targets.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxrdist.errors import UserError
from cxrdist.evaluation.prediction.ensemble import run_evaluate
from cxrdist.labels.eval_targets import check_eval_targets, evaluation_targets, rule_from_cards
from cxrdist.model.card import CardEvaluation
from cxrdist.training.config import load_config

NAN = float("nan")
RAW = np.array([[1, 0, -1, NAN], [-1, NAN, 1, 0]], dtype=np.float32).T  # (4, 2): one column per label


def test_rules_by_hand():
    targets, mask = evaluation_targets(RAW, "ignore_uncertain")
    assert targets.tolist() == [[1, 0], [0, 0], [0, 1], [0, 0]]
    assert mask.tolist() == [[1, 0], [1, 1], [0, 1], [1, 1]]
    targets, mask = evaluation_targets(RAW, "zeros")
    assert targets.tolist() == [[1, 0], [0, 0], [0, 1], [0, 0]] and mask.all()
    targets, mask = evaluation_targets(RAW, "ones")
    assert targets.tolist() == [[1, 1], [0, 0], [1, 1], [0, 0]] and mask.all()


def test_unknown_rule_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="eval.targets"):
        check_eval_targets("default")
    with pytest.raises(UserError, match="eval.targets"):
        load_config(None, ["data.shards=x", "eval.targets=U-Ones"])
    assert load_config(None, ["data.shards=x"]).eval.targets == "ignore_uncertain"


def cards(*sections: dict) -> list[SimpleNamespace]:
    """Stand-ins for ModelCards: only the evaluation section, read from model.json's dict as a card reads it."""
    return [SimpleNamespace(evaluation=CardEvaluation.from_dict(section, {"Edema": "ones"})) for section in sections]


def test_rule_comes_from_the_flag_then_the_cards_then_the_default():
    zeros = {"targets": "zeros", "training_policy": {"Edema": "ones"}}
    assert rule_from_cards(cards({}, {})) == "ignore_uncertain"  # a card from before the section: the default
    assert rule_from_cards(cards(zeros, zeros)) == "zeros"
    assert rule_from_cards(cards(zeros), "ones") == "ones"
    assert rule_from_cards([]) == "ignore_uncertain"
    with pytest.raises(UserError, match="different evaluation targets"):
        rule_from_cards(cards(zeros, {}))


def copy_with_training_policy(runs: Path, out: Path, policy: str) -> Path:
    """The same trained weights, with cards claiming another training policy."""
    for card_path in runs.glob("fold-*/best/model.json"):
        best = out / card_path.parent.parent.name / "best"
        shutil.copytree(card_path.parent, best)
        card = json.loads(card_path.read_text())
        card["label_policy"] = {label: policy for label in card["labels"]}
        card["evaluation"]["training_policy"] = card["label_policy"]
        (best / "model.json").write_text(json.dumps(card))
    return out


def test_same_predictions_same_aucs_whatever_the_training_policy(trained_experiment, tmp_path, synth_shards):
    card = json.loads(next(trained_experiment.glob("fold-*/best/model.json")).read_text())
    assert card["evaluation"]["targets"] == "ignore_uncertain"
    assert card["evaluation"]["training_policy"] == card["label_policy"]
    results = {}
    for policy in ("ones", "zeros", "ignore"):
        runs = copy_with_training_policy(trained_experiment, tmp_path / policy, policy)
        results[policy] = run_evaluate(runs, split="test", tta=False, out=tmp_path / f"out-{policy}", batch_size=32, workers=0, resamples=50)
    for policy in ("zeros", "ignore"):
        assert results[policy]["ensemble"] == results["ones"]["ensemble"]
        assert results[policy]["models"] == results["ones"]["models"]
    assert results["ones"]["eval_targets"] == "ignore_uncertain"
    assert set(results["ones"]["training_policy"]["fold-0"].values()) == {"ones"}

    # The default leaves uncertain entries out: sklearn on the raw labels with -1 rows dropped.
    zeros = run_evaluate(tmp_path / "ones", split="test", tta=False, out=tmp_path / "out-z", batch_size=32, workers=0, resamples=50,
                         eval_targets="zeros")
    table = pd.read_csv(tmp_path / "out-ones" / "predictions.csv")
    labels = results["ones"]["labels"]
    assert zeros["eval_targets"] == "zeros"
    differs = 0
    for label in labels:
        known = table[f"target_{label}"].notna()
        y = table.loc[known, f"target_{label}"]
        if y.nunique() == 2:
            expected = roc_auc_score(y, table.loc[known, f"prob_{label}"])
            assert results["ones"]["ensemble"]["per_label"][label] == pytest.approx(expected, abs=1e-12)
        differs += zeros["ensemble"]["per_label"][label] != results["ones"]["ensemble"]["per_label"][label]
    assert differs > 0  # the synthetic test split has uncertain entries: the rules really differ
