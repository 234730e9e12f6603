"""The exceptions absorber-memory raises.

One small hierarchy so callers can catch everything of ours with
`AbsorberError` and still tell apart bad input (also a `ValueError`, so code
written against plain Python conventions keeps working) from failures while
training or touching the disk.
"""

from __future__ import annotations


class AbsorberError(Exception):
    """Base class of every error absorber-memory raises on purpose."""


class ConfigError(AbsorberError, ValueError):
    """A configuration value is invalid; the message names the field."""


class InvalidMessageError(AbsorberError, ValueError):
    """A chat message (or list of them) is malformed; the message says which."""


class TemplateError(AbsorberError, ValueError):
    """The tokenizer's chat template cannot be rendered one message at a time."""


class ModelLoadError(AbsorberError, RuntimeError):
    """A base model or tokenizer could not be found or loaded."""


class AbsorptionError(AbsorberError, RuntimeError):
    """Absorption failed (e.g. non-finite loss); the adapter was rolled back."""


class StorageError(AbsorberError, OSError):
    """Saved memory is missing, corrupt, or was made for another base model."""


class InvalidSessionError(AbsorberError, ValueError):
    """A session or user id is malformed, unknown, or belongs to another user."""


class JobCancelled(AbsorberError):
    """An absorption job was cancelled (or its session forgotten) while it ran."""


class SkippedContentWarning(UserWarning):
    """Non-text parts of a message (images, audio, files) were left out: only text is remembered."""
