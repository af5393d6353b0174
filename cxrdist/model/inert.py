"""Is the learned label coupling inert? Said out loud at the end of training, in metrics.jsonl and in
the report, with the knob that controls it, instead of exporting a plain backbone silently."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrdist.text import count

# The refinement adds alpha * sigmoid(z) @ A; sigmoid <= 1, so no logit moves by more than
# alpha * max_j sum_i |A_ij|. Below this many logits it changes no decision worth the name.
INERT_LOGIT_SHIFT = 0.01
KNOB = "model.refine.l1"
COUPLING_KEY = "refine.weight"  # A in a model's safetensors file


def max_logit_shift(coupling: np.ndarray, alpha: float) -> float:
    """An upper bound on how far the refinement can move any logit (off-diagonal A)."""
    a = np.abs(np.asarray(coupling, dtype=np.float64))
    np.fill_diagonal(a, 0.0)
    return float(alpha * a.sum(axis=0).max()) if a.size else 0.0


def inert_message(coupling: np.ndarray, alpha: float, l1: float) -> str | None:
    """A one-line explanation when A is all zero or nearly so, else None."""
    shift = max_logit_shift(coupling, alpha)
    if shift > INERT_LOGIT_SHIFT:
        return None
    nonzero = int((np.abs(coupling) > 1e-6).sum() - (np.abs(np.diag(coupling)) > 1e-6).sum())
    state = "exactly zero" if nonzero == 0 else f"nearly zero ({count(nonzero, 'coupling')}, moving no logit by more than {shift:.2g})"
    return (f"the label-graph refinement is inert: A is {state}, so the model is the plain backbone; "
            f"the L1 weight {KNOB}={l1:g} pruned the couplings (lower it; README, Method: 'Does the refinement help?')")


def best_model_inert(best: Path) -> str | None:
    """inert_message for a trained model directory (best/) whose card has the refinement on; None otherwise."""
    from safetensors import safe_open

    from cxrdist.layout import WEIGHTS_FILE
    from cxrdist.model.card import ModelCard

    card = ModelCard.read(best)
    refine = card.model.refine
    if not refine.enabled or not (best / WEIGHTS_FILE).is_file():
        return None
    with safe_open(str(best / WEIGHTS_FILE), framework="pt") as handle:
        if COUPLING_KEY not in handle.keys():
            return None
        coupling = handle.get_tensor(COUPLING_KEY).float().numpy()
    return inert_message(coupling, float(refine.alpha), float(refine.l1))
