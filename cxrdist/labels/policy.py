"""Uncertainty label policies: raw labels (1 / 0 / -1 / blank) -> (targets, mask).

Shards keep the raw labels; the policy is chosen at training time, per label:
- "ignore" (U-Ignore): an uncertain entry is masked out of the loss (mask 0, target 0),
- "zeros"  (U-Zeros):  uncertain counts as negative,
- "ones"   (U-Ones):   uncertain counts as positive.
A blank (NaN: the finding is not mentioned) is a negative with mask 1 under every policy.
NOT_ANNOTATED (-2: the image's dataset does not annotate that finding at all, cxrdist/data/datasets.py)
is masked out (mask 0) under every policy: it is neither a negative nor a target.

The "default" policy is the CheXpert paper's best per-label choice (Irvin et al. 2019, Table 3):
U-Ones for Atelectasis and Edema, U-Zeros for the rest; labels outside the CheXpert set get zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from cxrdist.errors import UserError

if TYPE_CHECKING:
    import torch

POLICIES = ("ignore", "zeros", "ones")
DEFAULT = "default"
CHEXPERT_U_ONES = frozenset({"Atelectasis", "Edema"})
NOT_ANNOTATED = -2.0
RAW_VALUES = (1.0, 0.0, -1.0, NOT_ANNOTATED)


def default_policy(label: str) -> str:
    return "ones" if label in CHEXPERT_U_ONES else "zeros"


def resolve_policy(spec: str | Mapping[str, str], label_names: Sequence[str]) -> list[str]:
    """One policy per label from "default", "ignore"/"zeros"/"ones", or {label: policy}.

    In a mapping, the key "default" sets the policy of every label not named (its value may
    itself be "default"); without it those labels get the CheXpert default.
    """
    if isinstance(spec, str):
        rest, overrides = _check_policy(spec, "uncertain policy"), {}
    elif isinstance(spec, Mapping):
        overrides = {str(k): _check_policy(v, f"uncertain policy for {k!r}") for k, v in spec.items()}
        rest = overrides.pop(DEFAULT, DEFAULT)
        unknown = sorted(set(overrides) - set(label_names))
        if unknown:
            raise UserError(
                f"uncertain policy: unknown label(s) {', '.join(map(repr, unknown))}; "
                f"labels are {', '.join(label_names)}"
            )
    else:
        raise UserError(f"uncertain policy must be a name or a mapping, got {type(spec).__name__}")
    policy = [overrides.get(label, rest) for label in label_names]
    return [default_policy(label) if p == DEFAULT else p for label, p in zip(label_names, policy)]


def _check_policy(value: object, where: str) -> str:
    name = str(value).strip().lower()
    if name not in POLICIES and name != DEFAULT:
        raise UserError(f"{where}: {value!r} is not one of {', '.join((DEFAULT, *POLICIES))}")
    return name


def apply_policy(
    raw: torch.Tensor | np.ndarray, policy: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, mask), both float32 torch tensors shaped like `raw` (N, C)."""
    import torch  # here: the config (and so `cxrdist info`) reads this module's names without loading torch

    raw = torch.as_tensor(raw).float()
    if raw.ndim != 2 or raw.shape[1] != len(policy):
        raise ValueError(f"raw labels of shape {tuple(raw.shape)} for {len(policy)} policies")
    blank = torch.isnan(raw)
    known = torch.zeros_like(blank)
    for value in RAW_VALUES:
        known |= raw == value
    if not bool((known | blank).all()):
        bad = raw[~(known | blank)].unique()[:5].tolist()
        raise UserError(f"raw labels must be 1, 0, -1 or blank (or -2: not annotated); found {bad}")
    uncertain = raw == -1
    uncertain_target = torch.tensor([float(p == "ones") for p in policy], device=raw.device)
    ignored = torch.tensor([p == "ignore" for p in policy], device=raw.device)
    not_annotated = raw == NOT_ANNOTATED
    targets = torch.where(blank | not_annotated, torch.zeros_like(raw), raw)
    targets = torch.where(uncertain, uncertain_target.expand_as(raw), targets)
    mask = ~(uncertain & ignored) & ~not_annotated
    return targets, mask.float()
