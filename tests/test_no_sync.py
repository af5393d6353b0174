"""The training step never reads a tensor on the host (a device sync on CUDA): counted on CPU by
patching the tensor methods that bring a value over, during real `Trainer.train_batch` calls."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

import pytest
import torch
from trainer_utils import DEMO_CONFIG, fast_overrides

from cxrdist.errors import UserError
from cxrdist.training.config import load_config
from cxrdist.training.loop import BadSteps, Trainer, Window

# Every way a tensor's value reaches Python: each one waits for the device on CUDA.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
# apply_policy validates the raw labels of the batch while they are still on the host (before the
# copy to the device); that is the one host read the step may make, and it involves no device.
HOST_SIDE_CALLERS = {"apply_policy"}


@contextlib.contextmanager
def counting_host_reads():
    calls: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            calls[(name, caller if caller in HOST_SIDE_CALLERS else "step")] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture(scope="module")
def trainer(synth_shards, tmp_path_factory) -> Trainer:
    out = tmp_path_factory.mktemp("nosync")
    overrides = fast_overrides(synth_shards, out, **{"train.log_every": 1000, "train.max_bad_steps": 3})
    cfg = load_config(DEMO_CONFIG, overrides)
    assert cfg.model.refine.enabled and cfg.loss.name == "asl"
    return Trainer(cfg)


def batch_of(trainer: Trainer, n: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = trainer.cfg.data.img_size
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(-1, 2, (n, len(trainer.labels)), generator=g).float()
    return {"image": images, "labels_raw": labels, "key": [f"k{i}" for i in range(n)], "corrupt": 0}


def step(trainer: Trainer, batch: dict, window: Window) -> bool:
    """One micro-batch the way the loop feeds it: drawn through next_micro_batch, which counts the
    accumulation group's unmasked entries over all ranks (the global masked mean) first."""
    return trainer.train_batch(trainer.next_micro_batch(iter([batch] * trainer.cfg.train.grad_accum)), window)


def steps_in_step(trainer: Trainer) -> torch.Tensor:
    return trainer.optimizer.optimizer.state[trainer.net.refine.weight]["step"]


def test_a_training_step_reads_nothing_on_the_host(trainer):
    window = Window()
    step(trainer, batch_of(trainer, seed=1), window)  # first step: lazy optimizer state, EMA key check
    ema_before = [t.clone() for t in trainer.ema.module.state_dict().values()]
    with counting_host_reads() as calls:
        for seed in (2, 3):
            assert step(trainer, batch_of(trainer, seed=seed), window)
    step_reads = {k: v for k, v in calls.items() if k[1] == "step"}
    assert step_reads == {}, f"host reads inside the training step: {step_reads}"
    assert any(k[1] == "apply_policy" for k in calls)  # the counter does see the calls it should
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, trainer.ema.module.state_dict().values()))
    assert isinstance(window.grad_norm, torch.Tensor) and torch.isfinite(window.grad_norm)
    assert trainer.optimizer.optimizer.defaults["fused"] is True  # the optimizer that takes the skip decision on the device


def test_a_non_finite_step_is_skipped_on_the_device_and_stops_the_run_at_log_time(trainer):
    window = Window()
    step(trainer, batch_of(trainer, seed=4), window)
    trainer.settle_bad_steps()
    total_before, step_before = trainer.state.bad_steps_total, trainer.state.step
    weights = [p.detach().clone() for p in trainer.net.parameters()]
    adam_steps = steps_in_step(trainer).clone()
    bad = batch_of(trainer, seed=5)
    # NaN gradients (not NaN inputs, which would also poison the BatchNorm statistics).
    hook = trainer.net.refine.weight.register_hook(lambda grad: grad * float("nan"))
    with counting_host_reads() as calls:
        for _ in range(2):
            step(trainer, bad, window)
    assert {k: v for k, v in calls.items() if k[1] == "step"} == {}
    # Skipped on the device: no weight, no Adam step count and no coupling moved.
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.net.parameters()))
    assert torch.equal(steps_in_step(trainer), adam_steps)
    assert trainer.state.step == step_before + 2
    trainer.settle_bad_steps()  # 2 in a row < max_bad_steps=3: read, no stop
    assert (trainer.state.bad_steps_in_row, trainer.state.bad_steps_total) == (2, total_before + 2)
    step(trainer, bad, window)
    hook.remove()
    with pytest.raises(UserError, match="3 optimizer steps in a row had non-finite gradients"):
        trainer.settle_bad_steps()



def test_a_skipped_step_leaves_the_ema_and_advances_the_counter_and_the_schedule(trainer):
    window = Window()
    trainer.bad_steps = BadSteps(trainer.accelerator.device)  # the previous test ended on a run of skipped steps
    step(trainer, batch_of(trainer, seed=6), window)
    ema_before = [t.clone() for t in trainer.ema.module.state_dict().values()]
    step_before = trainer.state.step
    hook = trainer.net.refine.weight.register_hook(lambda grad: grad * float("nan"))
    with counting_host_reads() as calls:
        step(trainer, batch_of(trainer, seed=7), window)
    hook.remove()
    assert {k: v for k, v in calls.items() if k[1] == "step"} == {}
    assert all(torch.equal(a, b) for a, b in zip(ema_before, trainer.ema.module.state_dict().values()))  # the EMA did not move
    assert trainer.state.step == step_before + 1  # the counter and the LR schedule did
    assert trainer.optimizer.param_groups[0]["lr"] == trainer.scheduler._get_lr(step_before + 1)[0]
    step(trainer, batch_of(trainer, seed=8), window)  # the next taken step moves it again
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, trainer.ema.module.state_dict().values()))
    trainer.settle_bad_steps()
    assert trainer.state.bad_steps_in_row == 0
