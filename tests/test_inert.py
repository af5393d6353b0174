"""An inert refinement (A all zero, or nearly) is said out loud, naming the knob."""

from __future__ import annotations

import json

import numpy as np

from cxrdist.model.inert import inert_message, max_logit_shift


def test_inert_by_hand():
    a = np.zeros((3, 3))
    assert "exactly zero" in inert_message(a, 0.3, 1e-3) and "model.refine.l1=0.001" in inert_message(a, 0.3, 1e-3)
    a[0, 1], a[2, 1], a[1, 1] = 0.01, -0.02, 5.0  # the diagonal is not part of the refinement
    assert max_logit_shift(a, 0.3) == 0.3 * 0.03
    assert "nearly zero (2 couplings" in inert_message(a, 0.3, 1e-3)
    a[0, 2] = 0.1
    assert inert_message(a, 0.3, 1e-3) is None


def test_training_and_report_say_so(trained_experiment, tmp_path):
    from safetensors.torch import load_file

    from cxrdist.evaluation.report.report import run_report

    run = trained_experiment / "fold-0"
    coupling = load_file(str(run / "best" / "model.safetensors"))["refine.weight"].numpy()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = [r for r in records if r["kind"] == "refinement"]
    assert len(summary) == 1 and summary[0]["knob"] == "model.refine.l1"
    assert summary[0]["inert"] == (inert_message(coupling, 0.3, 1e-3) is not None)
    page = run_report(trained_experiment, tmp_path / "report").read_text()
    assert ("refinement is inert" in page) == summary[0]["inert"]
