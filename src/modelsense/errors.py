"""Errors that modelsense raises on bad input.

Every check at a boundary (files, arrays, options) raises one of these with a message that says what
was expected, what was received and how to fix it, before any work starts.
"""


class ModelsenseError(Exception):
    """Base class of every error raised on purpose by modelsense."""


class DataError(ModelsenseError, ValueError):
    """A dataset could not be loaded or failed validation."""


class ConfigError(ModelsenseError, ValueError):
    """An option or a combination of options is invalid."""
