"""Errors meant for people: one line that names the file or argument and what to do.

The CLI prints these without a traceback; any other exception is a bug and keeps its traceback.
"""


class VtokError(Exception):
    """Base of all user-facing vtok errors."""


class ConfigError(VtokError):
    """A configuration value, option or preset name is invalid."""


class CheckpointError(VtokError):
    """A checkpoint directory is missing files or its tensors do not match its config."""


class InputError(VtokError):
    """An input file (image or token file) cannot be used."""
