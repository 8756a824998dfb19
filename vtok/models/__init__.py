"""Model architectures and the preset registry."""
