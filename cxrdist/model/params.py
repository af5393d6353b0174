"""Optimizer parameter groups: weight decay only where it regularises."""

from __future__ import annotations

from typing import Any

from torch import nn

from cxrdist.model.refine import LabelGraphRefinement


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Groups "decay" (conv / linear weights), "no_decay" (biases, norm layers: ndim <= 1, and
    names a timm model lists in no_weight_decay()) and "refine" (A: its only shrinkage is L1).

    Empty groups are left out; frozen parameters too. Each group carries its "name".
    """
    refine_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, LabelGraphRefinement)
        for p in module.parameters()
    }
    exempt = _no_weight_decay_names(model)
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "refine": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in refine_ids:
            groups["refine"].append(param)
        elif param.ndim <= 1 or name in exempt:
            groups["no_decay"].append(param)
        else:
            groups["decay"].append(param)
    decay = {"decay": weight_decay, "no_decay": 0.0, "refine": 0.0}
    return [
        {"name": name, "params": params, "weight_decay": decay[name]}
        for name, params in groups.items()
        if params
    ]


def _no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names that timm models exempt (position embeddings, tokens, ...)."""
    names = set()
    for prefix, module in model.named_modules():
        exempt = getattr(module, "no_weight_decay", None)
        if callable(exempt):
            names |= {f"{prefix}.{n}" if prefix else n for n in exempt()}
    return names
