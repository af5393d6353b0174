"""EMA of the whole network, A included, against the update formula."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cxrdist.model.config import ModelConfig
from cxrdist.model.ema import ModelEma
from cxrdist.model.network import build_model


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone="test_resnet"), num_labels=5)


def change_everything(model) -> None:
    """New values for every parameter (A included) and BatchNorm statistic."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.refine.enforce_zero_diagonal()
    model.train()
    model(torch.randn(4, 3, 32, 32))  # moves running_mean / running_var / num_batches_tracked


def test_one_update_is_the_weighted_average_for_every_tensor():
    model = tiny_model()
    decay = 0.9
    ema = ModelEma(model, decay=decay, warmup=False)
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    change_everything(model)
    new = model.state_dict()
    assert ema.decay_at(None) == decay
    ema.update(model)
    averaged = ema.state_dict()
    assert set(averaged) == set(new) and "refine.weight" in averaged
    for name, value in averaged.items():
        if value.is_floating_point():
            expected = decay * old[name] + (1 - decay) * new[name]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
        else:  # integer buffers (num_batches_tracked) are copied
            assert torch.equal(value, new[name]), name
    assert torch.count_nonzero(averaged["refine.weight"]) > 0


def test_warm_up_starts_with_a_copy_and_ramps_to_the_decay():
    model = tiny_model()
    ema = ModelEma(model, decay=0.999, warmup=True)
    change_everything(model)
    assert ema.decay_at(1) == 0.0
    ema.update(model, step=1)
    for name, value in ema.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    decays = [ema.decay_at(step) for step in (10, 100, 1000, 10**6)]
    assert decays == sorted(decays) and decays[-1] == 0.999 and 0 < decays[0] < 0.9


def test_copy_is_fp32_and_evaluates_for_a_bf16_model():
    model = tiny_model().to(torch.bfloat16)
    ema = ModelEma(model, decay=0.5, warmup=False)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values() if v.is_floating_point())
    ema.update(model)
    assert not ema.module.training
    out = ema.module(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_state_dict_round_trip():
    model = tiny_model()
    ema = ModelEma(model, decay=0.9, warmup=False)
    change_everything(model)
    ema.update(model)
    restored = ModelEma(tiny_model(seed=1), decay=0.9, warmup=False)
    restored.load_state_dict(ema.state_dict())
    for name, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name


def test_a_ddp_wrapped_model_is_unwrapped():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_model()
        wrapped = DistributedDataParallel(model)
        ema = ModelEma(wrapped, decay=0.5, warmup=False)
        assert not any(k.startswith("module.") for k in ema.state_dict())
        old = ema.state_dict()["refine.weight"].clone()
        change_everything(model)
        ema.update(wrapped)
        torch.testing.assert_close(
            ema.state_dict()["refine.weight"], 0.5 * old + 0.5 * model.refine.weight.detach()
        )
    finally:
        dist.destroy_process_group()


def test_a_different_network_is_refused():
    ema = ModelEma(tiny_model(), decay=0.9)
    other = build_model(ModelConfig(backbone="test_resnet"), num_labels=5)
    other.refine = None
    with pytest.raises(ValueError, match="keys differ"):
        ema.update(other)


def test_averaged_a_keeps_the_live_sparsity_pattern():
    model = tiny_model()
    ema = ModelEma(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.refine.A.fill_(0.5)
        model.refine.enforce_zero_diagonal()
    ema.update(model)  # every off-diagonal coupling is 0.05 in the average now
    with torch.no_grad():
        model.refine.A[0, 1] = 0.0  # the prox step zeroed this one
    ema.update(model)
    averaged = ema.module.refine.A.detach()
    assert averaged[0, 1].item() == 0.0
    assert averaged[1, 0].item() == pytest.approx(0.9 * 0.05 + 0.1 * 0.5)
    assert ema.module.refine.sparsity() == model.refine.sparsity()


def test_warmup_power_is_an_option_and_the_effective_decay_is_logged(trained_experiment):
    import json

    model = torch.nn.Linear(2, 2)
    assert ModelEma(model, decay=0.999, warmup_power=1.0).decay_at(100) == pytest.approx(0.99)  # timm counts from step 1
    assert ModelEma(model, decay=0.999, warmup=False).decay_at(5) == pytest.approx(0.999)
    lines = (trained_experiment / "fold-0" / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    assert train and all(r["ema_decay"] == pytest.approx(min(0.98, 1 - r["step"] ** (-0.6667))) for r in train)


def test_the_readme_states_the_decay_the_code_uses():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`d(step) = min(train.ema_decay, 1 - step^(-p))`" in readme
    ema = ModelEma(torch.nn.Linear(2, 2), decay=0.9998, warmup_power=2 / 3)
    for step in (1, 2, 3, 10, 1000, 32000, 10**6):
        assert ema.decay_at(step) == pytest.approx(min(0.9998, 1 - step ** (-2 / 3)), abs=1e-15)


@pytest.mark.parametrize("step", [1, 50])
def test_a_skipped_step_on_the_device_leaves_the_ema_and_a_taken_one_is_timms_update(step):
    model = tiny_model()
    skipped, taken, reference = (ModelEma(model, decay=0.99) for _ in range(3))
    change_everything(model)
    before = {k: v.clone() for k, v in skipped.state_dict().items()}
    skipped.update(model, step, torch.tensor(True))
    taken.update(model, step, torch.tensor(False))
    reference.update(model, step)
    for key, value in skipped.state_dict().items():
        assert torch.equal(value, before[key]), key
        assert torch.allclose(taken.state_dict()[key].float(), reference.state_dict()[key].float(), rtol=0, atol=1e-6), key
    assert not torch.equal(taken.state_dict()["refine.weight"], before["refine.weight"])
