"""Uncertainty policies on a hand-written table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cxrdist.errors import UserError
from cxrdist.labels import CHEXPERT_LABELS, NIH_LABELS
from cxrdist.labels.policy import apply_policy, resolve_policy

NAN = float("nan")
LABELS = ["Atelectasis", "Cardiomegaly", "Edema", "Custom Finding"]
RAW = np.array(
    [
        [1, 0, -1, NAN],
        [-1, -1, NAN, -1],
        [NAN, 1, 0, 1],
        [0, NAN, -1, 0],
    ],
    dtype=np.float32,
)


def test_default_is_u_ones_for_atelectasis_and_edema_only():
    policy = resolve_policy("default", CHEXPERT_LABELS)
    ones = {label for label, p in zip(CHEXPERT_LABELS, policy) if p == "ones"}
    assert ones == {"Atelectasis", "Edema"}
    assert set(policy) == {"ones", "zeros"}
    # NIH spells the same findings the same way; anything else gets zeros
    nih = dict(zip(NIH_LABELS, resolve_policy("default", NIH_LABELS)))
    assert nih["Atelectasis"] == "ones" and nih["Effusion"] == "zeros"


def test_default_on_the_table():
    policy = resolve_policy("default", LABELS)
    assert policy == ["ones", "zeros", "ones", "zeros"]
    targets, mask = apply_policy(RAW, policy)
    expected = [
        [1, 0, 1, 0],
        [1, 0, 0, 0],
        [0, 1, 0, 1],
        [0, 0, 1, 0],
    ]
    assert targets.dtype == torch.float32 and mask.dtype == torch.float32
    assert targets.tolist() == expected
    assert mask.tolist() == [[1] * 4] * 4  # blank and uncertain both count under ones/zeros


def test_ignore_masks_uncertain_and_keeps_blank_as_negative():
    targets, mask = apply_policy(torch.from_numpy(RAW), resolve_policy("ignore", LABELS))
    assert targets.tolist() == [
        [1, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 1, 0, 1],
        [0, 0, 0, 0],
    ]
    assert mask.tolist() == [
        [1, 1, 0, 1],
        [0, 0, 1, 0],
        [1, 1, 1, 1],
        [1, 1, 0, 1],
    ]


def test_per_label_mapping_with_and_without_default_key():
    spec = {"Cardiomegaly": "ignore", "Custom Finding": "ones", "default": "zeros"}
    policy = resolve_policy(spec, LABELS)
    assert policy == ["zeros", "ignore", "zeros", "ones"]
    targets, mask = apply_policy(RAW, policy)
    assert targets[1].tolist() == [0, 0, 0, 1]
    assert mask[1].tolist() == [1, 0, 1, 1]
    # without "default" the rest follows the CheXpert default; OmegaConf mappings work too
    config = OmegaConf.create({"Cardiomegaly": "IGNORE"})
    assert resolve_policy(config, LABELS) == ["ones", "ignore", "ones", "zeros"]


def test_errors_name_what_is_wrong():
    with pytest.raises(UserError, match="'Pneumonia'"):
        resolve_policy({"Pneumonia": "ones"}, LABELS)
    with pytest.raises(UserError, match="'u-maybe'"):
        resolve_policy("u-maybe", LABELS)
    with pytest.raises(UserError, match="for 'Edema'"):
        resolve_policy({"Edema": "half"}, LABELS)
    bad = RAW.copy()
    bad[0, 0] = 2
    with pytest.raises(UserError, match="1, 0, -1 or blank"):
        apply_policy(bad, ["zeros"] * 4)
