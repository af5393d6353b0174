"""ASL and BCE against independent oracles: timm's ASL and torch's BCE."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from timm.loss import AsymmetricLossMultiLabel

from cxrdist.errors import UserError
from cxrdist.model.config import LossConfig
from cxrdist.model.loss import AsymmetricLoss, build_loss


def random_batch(seed: int, n: int = 64, c: int = 14, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64).float() * scale
    targets = (torch.rand(n, c, generator=g) < 0.3).float()
    return logits, targets


def timm_asl_sum(**kwargs) -> AsymmetricLossMultiLabel:
    """timm's ASL summing over batch and labels (the original reduction, older timm's only one)."""
    if "reduction" in inspect.signature(AsymmetricLossMultiLabel).parameters:
        kwargs["reduction"] = "sum"
    return AsymmetricLossMultiLabel(**kwargs)


@pytest.mark.parametrize(
    "params",
    [
        dict(gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8),
        dict(gamma_neg=2.0, gamma_pos=1.0, clip=0.0, eps=1e-8),
    ],
)
def test_asl_equals_timm_sum_divided_by_entries(params):
    logits, targets = random_batch(0)
    ours_in = logits.clone().requires_grad_(True)
    theirs_in = logits.clone().requires_grad_(True)
    ours = AsymmetricLoss(**params)(ours_in, targets)
    theirs = timm_asl_sum(**params)(theirs_in, targets) / targets.numel()
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-4, atol=1e-9)


def test_asl_pos_weight_equals_timm():
    if "pos_weight" not in inspect.signature(AsymmetricLossMultiLabel).parameters:
        pytest.skip("this timm's ASL has no pos_weight")
    logits, targets = random_batch(1, c=4)
    weight = [1.0, 2.0, 0.5, 3.0]
    ours = AsymmetricLoss(pos_weight=weight)(logits, targets)
    theirs = timm_asl_sum(gamma_pos=0.0, pos_weight=torch.tensor(weight))(logits, targets)
    torch.testing.assert_close(ours, theirs / targets.numel(), rtol=1e-5, atol=1e-7)


def test_asl_without_focusing_or_clipping_is_bce():
    logits, targets = random_batch(2, scale=4.0)
    logits = logits.clamp(-15, 15)  # beyond ~18, ASL's eps clamp (as in the reference) kicks in
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    asl = AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)(x1, targets)
    bce = F.binary_cross_entropy_with_logits(x2, targets)
    asl.backward()
    bce.backward()
    torch.testing.assert_close(asl, bce, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", ["asl", "bce"])
def test_mask_takes_the_mean_over_kept_entries_only(name):
    logits, targets = random_batch(3)
    mask = (torch.rand(logits.shape, generator=torch.Generator().manual_seed(4)) < 0.7).float()
    loss = build_loss(LossConfig(name=name, gamma_neg=0.0, clip=0.0))
    masked = loss(logits, targets, mask)
    expected = F.binary_cross_entropy_with_logits(logits[mask == 1], targets[mask == 1])
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["asl", "bce"])
def test_masked_entries_get_exactly_zero_gradient(name):
    logits, targets = random_batch(5)
    logits[0, 0] = 40.0  # a saturated entry, masked: still exactly zero gradient
    targets[0, 0] = 0.0
    mask = torch.ones_like(logits)
    mask[:, ::3] = 0
    mask[0, 0] = 0
    x = logits.clone().requires_grad_(True)
    build_loss(LossConfig(name=name))(x, targets, mask).backward()
    assert torch.count_nonzero(x.grad[mask == 0]) == 0
    kept_positives = (mask == 1) & (targets == 1)  # ASL's clip zeroes easy negatives on purpose
    assert torch.count_nonzero(x.grad[kept_positives]) == int(kept_positives.sum())
    # and the masked logits do not change the value at all
    moved = logits.clone()
    moved[mask == 0] = -7.0
    loss = build_loss(LossConfig(name=name))
    assert loss(moved, targets, mask).item() == loss(logits, targets, mask).item()


def test_fully_masked_batch_gives_zero_and_finite_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    loss = AsymmetricLoss()(x, torch.ones(4, 3), torch.zeros(4, 3))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["asl", "bce"])
def test_low_precision_extreme_logits_are_finite(dtype, name):
    logits = torch.tensor([[30.0, -30.0, 30.0, -30.0]] * 2, dtype=dtype, requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    loss = build_loss(LossConfig(name=name))(logits, targets)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert logits.grad.dtype == dtype
    assert torch.isfinite(logits.grad.float()).all()


def test_bce_pos_weight_equals_torch():
    logits, targets = random_batch(6, c=3)
    weight = [2.0, 1.0, 0.25]
    ours = build_loss(LossConfig(name="bce", pos_weight=weight), num_labels=3)(logits, targets)
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor(weight))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-8)


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="loss.name"):
        build_loss(LossConfig(name="focal"))
    with pytest.raises(UserError, match="pos_weight has 2 values"):
        build_loss(LossConfig(pos_weight=[1.0, 2.0]), num_labels=14)
    with pytest.raises(UserError, match="clip"):
        build_loss(LossConfig(clip=1.5))
