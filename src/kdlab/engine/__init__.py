"""Training engine: the trainer, evaluation, run directories and atomic checkpoints."""
