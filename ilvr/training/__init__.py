"""Training: DeepSpeed engines, the momentum teacher, the loop, checkpoints, tracking."""
