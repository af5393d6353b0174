"""Evaluation stage, one sub-package per concern, lower floors first: scoring/ and figures.py (training uses both),
clinical/, prediction/, report/. Each imports only its own floor and those below it (tests/test_layering.py)."""
