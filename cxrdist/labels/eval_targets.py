"""Evaluation targets: raw labels (1 / 0 / -1 / blank) -> (targets, mask) for every AUC, whatever
the training policy.

The training policy (`data.label_policy`, cxrdist/labels/policy.py) decides what the loss sees; it never
decides what a prediction is scored against, so runs trained with different policies are scored
against one ground truth and their AUCs are comparable. The rule, the same for every label:
- "ignore_uncertain" (default): an uncertain (-1) entry is left out of that label's AUC,
- "zeros": uncertain counts as negative (what the paper's code scored against),
- "ones":  uncertain counts as positive.
A blank (the finding is not mentioned) is a negative and 1/0 are taken as written under every rule.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from cxrdist.errors import UserError
from cxrdist.labels.policy import apply_policy

EVAL_TARGETS = ("ignore_uncertain", "zeros", "ones")
DEFAULT_EVAL_TARGETS = "ignore_uncertain"
_AS_POLICY = {"ignore_uncertain": "ignore", "zeros": "zeros", "ones": "ones"}


def check_eval_targets(rule: object, where: str = "eval.targets") -> str:
    name = str(rule).strip().lower()
    if name not in EVAL_TARGETS:
        raise UserError(f"{where}: {rule!r} is not one of {', '.join(EVAL_TARGETS)}")
    return name


def evaluation_policy(rule: str, num_labels: int) -> list[str]:
    """The per-label uncertainty policy that produces the rule's targets (for apply_policy callers)."""
    return [_AS_POLICY[check_eval_targets(rule)]] * num_labels


def evaluation_targets(raw: np.ndarray, rule: str = DEFAULT_EVAL_TARGETS) -> tuple[np.ndarray, np.ndarray]:
    """(targets, mask) as float32 numpy arrays shaped like `raw` (N, C); mask 0 = not scored."""
    raw = np.asarray(raw, dtype=np.float32)
    targets, mask = apply_policy(raw, evaluation_policy(rule, raw.shape[1] if raw.ndim == 2 else 0))
    return targets.numpy(), mask.numpy()


def rule_from_cards(cards: Iterable, override: str | None = None) -> str:
    """The rule to evaluate with: `override` if given, else the one the cards (model.card.ModelCard) record,
    which must agree, else the default. A card's evaluation section defaults to the default rule."""
    if override is not None:
        return check_eval_targets(override, "--eval-targets")
    recorded = {card.evaluation.targets for card in cards}
    if len(recorded) > 1:
        raise UserError(f"the models record different evaluation targets ({', '.join(sorted(recorded))}); pass --eval-targets")
    return check_eval_targets(recorded.pop()) if recorded else DEFAULT_EVAL_TARGETS


def training_policies(cards: dict) -> dict[str, dict]:
    """{model name: {label: training policy}}, recorded next to the evaluation rule (for reference only)."""
    return {name: dict(card.evaluation.training_policy) for name, card in cards.items()}
