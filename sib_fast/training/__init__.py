"""Training with the S-IB loss: the step (exact or finite-difference VJP), data, models, checkpoints."""
