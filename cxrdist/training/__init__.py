"""Training stage: config, distributed loop, checkpoints, preemption, logging."""
