"""Training stage: config, distributed loop, checkpoints, preemption, logging.
Imports model, data, the foundation modules and evaluation's scoring/ and figures.py; never clinical, prediction or report."""
