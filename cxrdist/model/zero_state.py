"""A parameter's fp32 master value and Adam state where DeepSpeed ZeRO-1/2 keeps them.

Under ZeRO-1/2 the optimizer steps flat fp32 partitions (one piece of every parameter group per rank)
and copies them into the module's weights after each step, so an in-place edit of the module's weight
is undone by the next step. DeepSpeed's `safe_*` API reads a parameter's master value and optimizer
state whole (an all-reduce: every rank must call it, in the same order) and writes the master back.
Nothing here imports DeepSpeed unless a DeepSpeed engine already did.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def full_master(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The whole fp32 master value of `param` (the same tensor on every rank), or None when no DeepSpeed
    ZeRO-1/2 optimizer holds one (DDP, one process: the module's weight is what the optimizer steps)."""
    if "deepspeed" not in sys.modules:  # nothing can have partitioned it
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


@torch.no_grad()
def write_master(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set the master value (this rank's piece of it) and the module's copy, which DeepSpeed itself would
    refresh only after its next step: the forward until then must see `value` too."""
    from deepspeed.utils import safe_set_full_fp32_param

    value = value.float()
    safe_set_full_fp32_param(param, value)
    param.copy_(value)


def adam_second_moment(param: torch.nn.Parameter, optimizer: Any) -> tuple[torch.Tensor, Any, dict] | None:
    """(the whole `exp_avg_sq` of `param` (`max_exp_avg_sq` with amsgrad), Adam's step count, the param group)
    from the DeepSpeed ZeRO-1/2 optimizer inside `optimizer` (accelerate's wrapper or the bare one), or None
    when there is no such optimizer, no Adam, or no step taken yet (the same answer on every rank)."""
    found = _zero_optimizer(optimizer)
    if found is None:
        return None
    zero, lp_groups = found
    index = next((i for i, group in enumerate(lp_groups) if any(p is param for p in group)), None)
    if index is None:
        return None
    group = zero.param_groups[index]  # group i of ours is group i of the base optimizer, holding this rank's flat partition
    state = zero.state.get(group["params"][0])
    if not state or "exp_avg_sq" not in state or "step" not in state or "betas" not in group:
        return None
    key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in state else "exp_avg_sq"
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_optimizer_state

    # DeepSpeed links each parameter's views into the optimizer state once, after the first group's first step, when
    # the later groups (A's "refine" among them) have no state yet: their views stay empty. Link this group's again
    # (views, no copy), which also follows a state replaced by a checkpoint load.
    lazy_init_hp_params_optimizer_state(lp_groups[index], group["params"][0], zero.state)
    return safe_get_full_optimizer_state(param, key), state["step"], group


def _zero_optimizer(optimizer: Any) -> tuple[Any, list] | None:
    """DeepSpeed's ZeRO-1/2 optimizer (`bit16_groups`) or its bf16 ZeRO-1 optimizer (`bf16_groups`), with
    its lists of the module's parameters per group, found through the wrappers' `.optimizer`."""
    if "deepspeed" not in sys.modules:
        return None
    while optimizer is not None:
        for name in ("bit16_groups", "bf16_groups"):
            groups = getattr(optimizer, name, None)
            if groups:
                return optimizer, groups
        optimizer = getattr(optimizer, "optimizer", None)
    return None
