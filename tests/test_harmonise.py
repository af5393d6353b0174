"""Harmonised labels across datasets (cxrdist/labels/harmonise.py) and the "not annotated" state (cxrdist/labels/policy.py)."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from cxrdist.errors import UserError
from cxrdist.labels import CHEXPERT_LABELS, NIH_LABELS
from cxrdist.labels.harmonise import harmonise, synonym_table
from cxrdist.model.loss import build_loss
from cxrdist.model.config import LossConfig
from cxrdist.labels.policy import NOT_ANNOTATED, apply_policy
from cxrdist.labels.eval_targets import evaluation_targets


def test_nih_and_chexpert_share_effusion_and_keep_the_rest():
    vocab = harmonise({"chexpert": CHEXPERT_LABELS, "nih": NIH_LABELS})
    assert vocab.labels[: len(CHEXPERT_LABELS)] == CHEXPERT_LABELS
    effusion = vocab.labels.index("Pleural Effusion")
    assert vocab.columns["nih"][NIH_LABELS.index("Effusion")] == effusion
    assert vocab.labels[vocab.columns["nih"][NIH_LABELS.index("Pleural_Thickening")]] == "Pleural Thickening"
    # union: 14 CheXpert + the NIH ones CheXpert lacks (Infiltration, Mass, Nodule, Emphysema, Fibrosis, Pleural Thickening, Hernia)
    assert len(vocab.labels) == 14 + 7
    assert "Effusion" not in vocab.labels and "Pleural_Thickening" not in vocab.labels
    assert set(vocab.annotated("nih")) == {"Pleural Effusion" if n == "Effusion" else "Pleural Thickening" if n == "Pleural_Thickening" else n
                                           for n in NIH_LABELS}


def test_user_mapping_renames_and_drops_with_one_line(caplog):
    with caplog.at_level(logging.WARNING):
        vocab = harmonise({"a": ["Effusion", "Odd", "Hernia"], "b": ["Pleural Effusion", "Other"]}, {"a": {"Odd": "Other", "Hernia": None}})
    assert vocab.labels == ["Pleural Effusion", "Other"]
    assert vocab.columns == {"a": [0, 1, None], "b": [0, 1]}
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 1 and "'Hernia'" in dropped[0]


@pytest.mark.parametrize("datasets, user_map, vocabulary, words", [
    ({"a": ["X"], "b": ["X"]}, {"b": {"Typo": "X"}}, None, "it has no label"),
    ({"a": ["X", "Y"], "b": ["X"]}, {"a": {"Y": "X"}}, None, "both map onto"),
    ({"a": ["X", "Y"], "b": ["X"]}, None, ["X"], "not in data.vocabulary"),
    ({"a": ["X"], "b": ["Y"]}, None, None, "shares no label"),
    ({"nih": ["Effusion", "Pleural Effusion"]}, None, None, "both map onto"),
])
def test_bad_mappings_are_one_line_errors(datasets, user_map, vocabulary, words):
    with pytest.raises(UserError, match=words) as err:
        harmonise(datasets, user_map, vocabulary)
    assert "\n" not in str(err.value)


def test_labels_command_prints_the_synonyms_and_why_no_finding_is_kept_apart():
    out = subprocess.run([sys.executable, "-m", "cxrdist", "labels"], capture_output=True, text=True, check=True).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    assert ["nih", "Effusion", "Pleural Effusion", ""] in rows
    assert ["nih", "Pleural_Thickening", "Pleural Thickening", ""] in rows
    assert ["chexpert", "Pleural Effusion", "Pleural Effusion", ""] in rows
    [nih] = [r for r in rows if r[:2] == ["nih", "No Finding"]]
    [chexpert] = [r for r in rows if r[:2] == ["chexpert", "No Finding"]]
    assert nih[2] == "No Finding (NIH)" and "none of its 14 findings" in nih[3]  # the why, in words
    assert chexpert[2] == "No Finding" and "NIH" in chexpert[3]
    assert {r[0] for r in rows} == {"chexpert", "nih", "mimic"} and {len(r) for r in rows} == {4}
    assert len(rows) == len(synonym_table())


def test_nih_no_finding_is_not_merged_with_chexperts_unless_a_label_map_says_so():
    """NIH's 'No Finding' (none of its 14 findings) and CheXpert's (none of its 13, devices allowed) are two labels; by
    source: a dataset prepared with --source nih gets its own name, a generic CSV's 'No Finding' is CheXpert's."""
    tables = {"chexpert": ["No Finding", "Pleural Effusion"], "nih": ["No Finding", "Effusion"]}
    sources = {"chexpert": "chexpert", "nih": "nih"}
    apart = harmonise(tables, sources=sources)
    assert apart.labels == ["No Finding", "Pleural Effusion", "No Finding (NIH)"]
    assert apart.columns == {"chexpert": [0, 1], "nih": [2, 1]}
    merged = harmonise(tables, {"nih": {"No Finding": "No Finding"}}, sources=sources)
    assert merged.labels == ["No Finding", "Pleural Effusion"] and merged.columns["nih"] == [0, 1]
    as_csv = harmonise(tables, sources={"chexpert": "chexpert", "nih": "csv"})  # not known to be NIH's: the common name
    assert as_csv.labels == ["No Finding", "Pleural Effusion"]


def test_labels_outside_a_given_vocabulary_are_skipped_and_listed_when_asked():
    vocab = harmonise({"ext": ["Effusion", "Hernia", "Cardiomegaly"]}, vocabulary=["Cardiomegaly", "Pleural Effusion"], skip_outside=True)
    assert vocab.columns == {"ext": [1, None, 0]} and vocab.outside == {"ext": ["Hernia"]}
    with pytest.raises(UserError, match="not in data.vocabulary"):
        harmonise({"ext": ["Effusion", "Hernia"]}, vocabulary=["Pleural Effusion"])


def test_a_card_without_a_recorded_vocabulary_matches_nothing_on_a_name_whose_meaning_depends_on_the_source():
    from cxrdist.labels.harmonise import legacy_vocabulary

    single = legacy_vocabulary(["Effusion", "No Finding", "Hernia"], several_datasets=False)
    assert single.harmonised == ["Pleural Effusion", "No Finding (source not recorded)", "Hernia"]
    assert legacy_vocabulary(["Pleural Effusion", "No Finding"], several_datasets=True).harmonised == ["Pleural Effusion", "No Finding"]


@pytest.mark.parametrize("policy", ["ignore", "zeros", "ones"])
def test_not_annotated_is_masked_whatever_the_policy_and_blank_is_not(policy):
    raw = np.array([[1, 0, -1, np.nan, NOT_ANNOTATED]], dtype=np.float32)
    targets, mask = apply_policy(raw, [policy] * 5)
    assert mask[0, 4] == 0 and targets[0, 4] == 0
    assert mask[0, 3] == 1 and targets[0, 3] == 0  # blank: a negative
    eval_targets, eval_mask = evaluation_targets(raw, "zeros")
    assert eval_mask[0, 4] == 0 and eval_mask[0, 3] == 1


def test_not_annotated_entries_do_not_change_the_loss():
    """A column of -2 gives the loss of the same batch without that label (masked, not a negative)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    raw = torch.tensor([[1.0, 0.0, NOT_ANNOTATED]] * 3 + [[0.0, 1.0, NOT_ANNOTATED]] * 3)
    loss_fn = build_loss(LossConfig())
    targets, mask = apply_policy(raw, ["zeros"] * 3)
    as_negative = loss_fn(logits, targets, torch.ones_like(mask))
    masked = loss_fn(logits, targets, mask)
    ref_targets, ref_mask = apply_policy(raw[:, :2], ["zeros"] * 2)
    assert mask[:, 2].sum() == 0
    assert not torch.isclose(masked, as_negative)
    assert torch.isclose(loss_fn(logits[:, :2], ref_targets, ref_mask), masked)
