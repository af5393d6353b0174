"""Model and objective: network + Label-Graph Refinement, losses, EMA, parameter groups, the model card (import the submodules).
Imports only data and the foundation modules (cxrdist/*.py), never training or evaluation (tests/test_layering.py)."""
