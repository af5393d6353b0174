"""build_model with timm's tiny test_resnet: heads, channels, local weights, model card, groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import timm.data
import timm.optim
import torch

from cxrdist.errors import UserError
from cxrdist.model.config import ModelConfig, RefineConfig
from cxrdist.model.network import CXRNet, build_model, image_spec, place_model
from cxrdist.model.params import param_groups
from cxrdist.model.refine import LabelGraphRefinement

TINY = "test_resnet"


class NotWeights:
    """Something torch.load(weights_only=True) must refuse to unpickle."""


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 1000-class test_resnet saved as safetensors, as a downloaded ImageNet file would be."""
    torch.manual_seed(1)
    source = timm.create_model(TINY, pretrained=False)
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    safetensors.torch.save_file(weights, str(path))
    return path, weights


@pytest.mark.parametrize("in_chans", [3, 1])
@pytest.mark.parametrize("enabled", [True, False])
def test_build_heads_channels_and_refinement(in_chans, enabled):
    cfg = ModelConfig(backbone=TINY, in_chans=in_chans, refine=RefineConfig(enabled=enabled))
    model = build_model(cfg, num_labels=14).eval()
    x = torch.randn(2, in_chans, 64, 64)
    out = model(x)
    assert out.shape == (2, 14) and out.dtype == torch.float32
    assert model.backbone.get_classifier().out_features == 14
    if enabled:
        assert isinstance(model.refine, LabelGraphRefinement)
        assert model.refine.A.shape == (14, 14)
    else:
        assert model.refine is None
        assert not any("refine" in name for name in model.state_dict())
    # zero-initialised A: the refined model starts exactly at the baseline
    assert torch.equal(out, model.forward_base(x))


def test_grayscale_input_is_replicated_for_a_3_channel_backbone():
    model = build_model(ModelConfig(backbone=TINY), num_labels=3).eval()
    gray = torch.rand(2, 1, 48, 48)
    torch.testing.assert_close(model(gray), model(gray.repeat(1, 3, 1, 1)))


def test_channels_last_gives_the_same_logits():
    model = build_model(ModelConfig(backbone=TINY), num_labels=4).eval()
    x = torch.randn(2, 3, 48, 48)
    expected = model(x)
    assert place_model(model, "cpu").channels_last is False  # only on CUDA
    model.to(memory_format=torch.channels_last)
    model.channels_last = True
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_pretrained_path_loads_every_backbone_tensor(imagenet_like):
    path, weights = imagenet_like
    model = build_model(ModelConfig(backbone=TINY, pretrained_path=str(path)), num_labels=14)
    loaded = model.backbone.state_dict()
    for name, tensor in weights.items():
        if name.startswith("fc."):
            continue  # the 1000-class head is replaced by a fresh 14-label one
        assert torch.equal(loaded[name], tensor), name
    assert loaded["fc.weight"].shape == (14, weights["fc.weight"].shape[1])
    assert "state_dict" not in model.backbone.pretrained_cfg  # tensors not kept in the config


def test_pretrained_path_torch_file_and_one_channel_adaptation(imagenet_like, tmp_path):
    _, weights = imagenet_like
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)
    model = build_model(ModelConfig(backbone=TINY, in_chans=1, pretrained_path=str(path)), 14)
    loaded = model.backbone.state_dict()
    # timm's adaptation for one channel: the sum of the RGB filters
    torch.testing.assert_close(loaded["conv1.0.weight"], weights["conv1.0.weight"].sum(1, keepdim=True))
    assert torch.equal(loaded["layer1.0.conv1.weight"], weights["layer1.0.conv1.weight"])


def test_pretrained_path_errors_are_user_errors(imagenet_like, tmp_path):
    _, weights = imagenet_like
    with pytest.raises(UserError, match="does not exist"):
        build_model(ModelConfig(backbone=TINY, pretrained_path=str(tmp_path / "nope.safetensors")), 14)
    pickle = tmp_path / "pickle.pth"
    torch.save({"model": NotWeights()}, pickle)
    with pytest.raises(UserError, match="cannot read"):
        build_model(ModelConfig(backbone=TINY, pretrained_path=str(pickle)), 14)
    wrong = dict(weights)
    wrong["layer1.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    wrong_path = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file(wrong, str(wrong_path))
    with pytest.raises(UserError, match="does not fit backbone"):
        build_model(ModelConfig(backbone=TINY, pretrained_path=str(wrong_path)), 14)
    with pytest.raises(UserError, match="not a timm model"):
        build_model(ModelConfig(backbone="no_such_net"), 14)
    with pytest.raises(UserError, match="in_chans"):
        build_model(ModelConfig(backbone=TINY, in_chans=2), 14)


def test_image_spec_uses_timms_data_config():
    spec = image_spec(ModelConfig(backbone=TINY), 48)
    data_cfg = timm.data.resolve_model_data_config(timm.create_model(TINY))
    assert spec.mean == tuple(data_cfg["mean"]) and spec.std == tuple(data_cfg["std"])
    assert spec.size == 48 and spec.channels == 3 and spec.interpolation == data_cfg["interpolation"]
    json.dumps(spec.to_dict())
    default = image_spec(ModelConfig(in_chans=1), 380)  # seresnext101: ImageNet statistics, bicubic
    assert default.mean == (pytest.approx((0.485 + 0.456 + 0.406) / 3),)
    assert default.interpolation == "bicubic"


def test_param_groups_match_timm_and_isolate_a():
    model = build_model(ModelConfig(backbone=TINY), num_labels=5)
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.05)}
    assert set(groups) == {"decay", "no_decay", "refine"}
    assert groups["decay"]["weight_decay"] == 0.05
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["refine"]["weight_decay"] == 0.0
    assert [id(p) for p in groups["refine"]["params"]] == [id(model.refine.A)]
    # oracle for the backbone: timm's own split (biases and norm layers: no decay)
    timm_groups = timm.optim.param_groups_weight_decay(model.backbone, weight_decay=0.05)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in timm_groups}
    assert {id(p) for p in groups["decay"]["params"]} == by_decay[0.05]
    assert {id(p) for p in groups["no_decay"]["params"]} == by_decay[0.0]
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())
    torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)  # accepted as is


def test_param_groups_without_refinement_has_no_refine_group():
    model = CXRNet(timm.create_model(TINY, num_classes=3), None)
    assert [g["name"] for g in param_groups(model, 0.01)] == ["decay", "no_decay"]
