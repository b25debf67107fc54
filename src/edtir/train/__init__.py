"""Training: configs, data, the loop, checkpoints and resume, torchrun glue (see docs/training.md)."""
