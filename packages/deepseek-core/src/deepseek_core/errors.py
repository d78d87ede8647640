"""Errors that name the file, field or parameter at fault."""

from __future__ import annotations


class DeepSeekError(Exception):
    """Base class of the framework's own errors."""


class ConfigError(DeepSeekError, ValueError):
    """A config.json (or a preset, or a keyword) that cannot describe a model."""


class CheckpointError(DeepSeekError, ValueError):
    """A checkpoint directory that cannot be loaded or written."""


class ModelNotFoundError(DeepSeekError, FileNotFoundError):
    """A model id that resolves neither to a local directory nor to the hub."""
