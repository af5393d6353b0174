"""Data stage: sources, images, folds, shards, manifest, streams; synth/: synthetic radiographs for the demo and tests.
Imports only the foundation modules (cxrdist/*.py), never model, training or evaluation (tests/test_layering.py)."""
