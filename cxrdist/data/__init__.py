"""Data stage: sources, images, folds, shards, manifest, streams."""
