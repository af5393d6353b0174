"""Label-Graph Refinement: formula, zero diagonal, proximal L1, and that it learns a coupling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from cxrdist.errors import UserError
from cxrdist.model.config import LossConfig
from cxrdist.model.loss import build_loss
from cxrdist.model.network import CXRNet
from cxrdist.model.refine import LabelGraphRefinement, clip_coefficient


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of tiny steps: on a busy 2-core machine extra threads only spin (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_output_equals_input_at_init():
    z = torch.randn(8, 5)
    refine = LabelGraphRefinement(5)
    assert torch.equal(refine(z), z)
    assert torch.count_nonzero(refine.A) == 0


def test_forward_is_the_formula_with_a_masked_diagonal():
    torch.manual_seed(0)
    refine = LabelGraphRefinement(4, alpha=0.7)
    with torch.no_grad():
        refine.A.copy_(torch.randn(4, 4))  # diagonal too: forward must ignore it
    z = torch.randn(6, 4)
    a = refine.A.detach().clone()
    a.fill_diagonal_(0)
    expected = z + 0.7 * torch.sigmoid(z) @ a
    torch.testing.assert_close(refine(z), expected)


def test_runs_in_fp32_under_autocast():
    refine = LabelGraphRefinement(3)
    with torch.no_grad():
        refine.A.copy_(torch.tensor([[0.0, 0.3, -0.2], [0.1, 0.0, 0.5], [0.4, -0.6, 0.0]]))
    z = torch.randn(5, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = refine(z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, refine(z.float()), rtol=0, atol=0)


def test_gradients_reach_a_but_not_its_diagonal():
    refine = LabelGraphRefinement(4)
    z = torch.randn(16, 4)
    F.binary_cross_entropy_with_logits(refine(z), (torch.rand(16, 4) < 0.5).float()).backward()
    grad = refine.A.grad
    off = ~torch.eye(4, dtype=torch.bool)
    assert torch.count_nonzero(grad[off]) == 12
    assert torch.count_nonzero(grad.diagonal()) == 0


def test_detach_stops_the_backbone_gradient_through_sigmoid():
    a = torch.tensor([[0.0, 2.0], [0.5, 0.0]])
    z = torch.tensor([[0.3, -1.2], [2.0, 0.1]])
    grads = {}
    for detach in (False, True):
        refine = LabelGraphRefinement(2, alpha=0.5, detach=detach)
        with torch.no_grad():
            refine.A.copy_(a)
        zz = z.clone().requires_grad_(True)
        refine(zz).sum().backward()
        grads[detach] = zz.grad
        assert refine.A.grad is not None and torch.count_nonzero(refine.A.grad) == 2
    assert torch.equal(grads[True], torch.ones_like(z))  # only the identity path
    s = torch.sigmoid(z)
    expected = 1 + 0.5 * s * (1 - s) * a.sum(dim=1)  # d/dz_i of sum_j alpha * s_i * A_ij
    torch.testing.assert_close(grads[False], expected)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_diagonal_stays_zero_over_many_steps(optimizer):
    torch.manual_seed(0)
    refine = LabelGraphRefinement(5, sparsity="subgradient", l1=1e-2)
    if optimizer == "adam":
        opt = torch.optim.AdamW(refine.parameters(), lr=0.05, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(refine.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(200):
        z = torch.randn(32, 5)
        target = (torch.sigmoid(z) > 0.5).float()  # would reward a positive self-coupling
        loss = F.binary_cross_entropy_with_logits(refine(z), target) + refine.l1_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.count_nonzero(refine.A.diagonal()) == 0
    assert torch.count_nonzero(refine.A) > 0  # it did train


def test_proximal_step_is_the_soft_threshold():
    refine = LabelGraphRefinement(3, l1=0.5)
    a = torch.tensor([[0.0, 0.049, -0.2], [0.051, 0.0, -0.03], [1.0, -0.06, 0.0]])
    with torch.no_grad():
        refine.A.copy_(a)
    refine.proximal_step(lr=0.1)  # threshold 0.05
    expected = torch.tensor([[0.0, 0.0, -0.15], [0.001, 0.0, 0.0], [0.95, -0.01, 0.0]])
    torch.testing.assert_close(refine.A.detach(), expected, rtol=0, atol=1e-7)
    assert refine.A[0, 1].item() == 0.0 and refine.A[1, 2].item() == 0.0  # exact zeros
    assert refine.sparsity() == pytest.approx(2 / 6)


def test_proximal_step_with_adam_uses_its_denominator():
    # One Adam step from A = 0 with gradient G moves every entry by -lr * sign(G) (m_hat /
    # sqrt(v_hat) = G / |G|), and v_hat = G^2, so the threshold is lr * l1 / |G|: entries with
    # |G| < l1 (not worth their L1 cost) become exactly zero, the others keep lr * (1 - l1 / |G|).
    lr, l1 = 0.1, 0.5
    refine = LabelGraphRefinement(3, l1=l1)
    opt = torch.optim.Adam(refine.parameters(), lr=lr)
    g = torch.tensor([[0.0, 0.2, -2.0], [1.0, 0.0, -0.4], [0.3, 4.0, 0.0]])
    (refine.coupling() * g).sum().backward()
    opt.step()
    refine.proximal_step(lr, opt)
    expected = -torch.sign(g) * lr * (1 - l1 / g.abs()).clamp(min=0)
    expected.fill_diagonal_(0)
    torch.testing.assert_close(refine.A.detach(), expected, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(refine.A) == 3


def test_subgradient_mode_is_the_plain_l1_term():
    refine = LabelGraphRefinement(2, l1=0.1, sparsity="subgradient")
    with torch.no_grad():
        refine.A.copy_(torch.tensor([[5.0, -0.3], [0.2, 0.0]]))
    torch.testing.assert_close(refine.l1_penalty(), torch.tensor(0.05))  # diagonal not counted
    refine.proximal_step(lr=10.0)
    assert refine.A[0, 1].item() == pytest.approx(-0.3)  # prox is a no-op here
    proximal = LabelGraphRefinement(2, l1=0.1)
    assert proximal.l1_penalty().item() == 0.0


def test_top_couplings_by_magnitude_with_names():
    refine = LabelGraphRefinement(3)
    with torch.no_grad():
        refine.A.copy_(torch.tensor([[0.0, -0.9, 0.0], [0.2, 0.0, 0.0], [0.0, 0.5, 0.0]]))
    names = ["Edema", "Effusion", "Cardiomegaly"]
    top = refine.top_couplings(names, k=10)
    assert [(s, t) for s, t, _ in top] == [
        ("Edema", "Effusion"),
        ("Cardiomegaly", "Effusion"),
        ("Effusion", "Edema"),
    ]
    assert top[0][2] == pytest.approx(-0.9)
    assert len(refine.top_couplings(names, k=1)) == 1
    assert refine.sparsity() == pytest.approx(3 / 6)


def test_bad_sparsity_mode_is_a_user_error():
    with pytest.raises(UserError, match="sparsity"):
        LabelGraphRefinement(3, sparsity="lasso")


# --- learning: label j copies label i, but the backbone sees no feature for j -----------------

SOURCE, TARGET, LABELS = 1, 4, 6


def copy_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, LABELS, generator=g)
    y = (x + 0.5 * torch.randn(n, LABELS, generator=g) > 0).float()
    y[:, TARGET] = y[:, SOURCE]
    return x, y


class BlindLinear(nn.Module):
    """A linear 'backbone' whose logit for TARGET is a bias only: it cannot see any feature."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(LABELS, LABELS)
        mask = torch.ones(LABELS, LABELS)
        mask[TARGET] = 0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.linear.weight * self.mask, self.linear.bias)


def train_copy_task(refine: LabelGraphRefinement | None) -> tuple[CXRNet, float]:
    torch.manual_seed(0)
    x, y = copy_task(4096, seed=0)
    model = CXRNet(BlindLinear(), refine)
    loss_fn = build_loss(LossConfig())
    lr = 0.05
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(300):
        idx = torch.randint(0, len(x), (256,))
        loss = loss_fn(model(x[idx]), y[idx])
        if refine is not None:
            loss = loss + refine.l1_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if refine is not None:
            refine.proximal_step(lr, opt)
    x_test, y_test = copy_task(2048, seed=1)
    with torch.no_grad():
        scores = model(x_test)
    return model, roc_auc_score(y_test[:, TARGET].numpy(), scores[:, TARGET].numpy())


def test_refinement_learns_the_copied_label_and_the_ablation_cannot():
    _, ablation_auc = train_copy_task(None)
    assert ablation_auc == pytest.approx(0.5)  # constant score for TARGET

    for mode in ("proximal", "subgradient"):
        refine = LabelGraphRefinement(LABELS, sparsity=mode)
        _, auc = train_copy_task(refine)
        a = refine.A.detach().abs()
        assert divmod(int(a.argmax()), LABELS) == (SOURCE, TARGET), mode
        assert refine.A[SOURCE, TARGET] > 0
        assert auc > 0.85, mode
        assert auc > ablation_auc + 0.3
        if mode == "proximal":  # exact zeros: only the true coupling (or nearly) survives
            assert refine.sparsity() >= 0.9
            assert refine.top_couplings([str(i) for i in range(LABELS)], k=1)[0][:2] == ("1", "4")
        else:  # the paper's L1 under Adam: small but never exactly zero
            assert refine.sparsity() < 0.2


def lasso_toy(other_grad: float, scaled: bool, sparsity: str = "proximal", steps: int = 600) -> float:
    """min_a 0.5 (a - 0.5)^2 + 0.1 |a| (optimum 0.40) with A[0, 1] = a, trained by Adam next to a
    parameter whose gradient norm is `other_grad`, under gradient clipping at 1.0 (as the trainer)."""
    refine = LabelGraphRefinement(2, l1=0.1, sparsity=sparsity)
    other = nn.Parameter(torch.zeros(1))
    params = [refine.weight, other]
    opt = torch.optim.Adam(params, lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * (refine.coupling()[0, 1] - 0.5) ** 2 + other_grad * other.sum() + refine.l1_penalty()
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        refine.proximal_step(lr, opt, scale=clip_coefficient(norm, 1.0) if scaled else 1.0)
        sched.step()
    return float(refine.A.detach()[0, 1])


@pytest.mark.parametrize("other_grad", [0.0, 2.0, 4.0])
def test_l1_means_the_same_at_every_gradient_norm_under_clipping(other_grad):
    assert lasso_toy(other_grad, scaled=True) == pytest.approx(0.40, abs=0.01)
    assert lasso_toy(other_grad, scaled=True, sparsity="subgradient") == pytest.approx(0.40, abs=0.01)


def test_unscaled_threshold_grows_with_the_clip():
    # What the trainer did before: the threshold ignores clipping, the optimum drifts to 0.5 - 0.1 / c.
    assert lasso_toy(0.0, scaled=False) == pytest.approx(0.40, abs=0.01)
    assert lasso_toy(4.0, scaled=False) == pytest.approx(0.10, abs=0.02)


def test_clip_coefficient_is_torchs():
    grads = [torch.full((3,), 2.0), torch.full((1,), -1.0)]
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    assert params[0].grad[0].item() == pytest.approx(2.0 * clip_coefficient(norm, 1.0), rel=1e-6)
    assert clip_coefficient(0.5, 1.0) == 1.0 and clip_coefficient(5.0, 0.0) == 1.0 and clip_coefficient(None, 1.0) == 1.0
