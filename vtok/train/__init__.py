"""Training: config and presets, the loop, checkpoints and resume, distributed setup."""
