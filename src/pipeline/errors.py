"""Errors a user can act on. Each message names the problem and the fix."""


class PipelineError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits non-zero."""

    exit_code = 2


class ConfigError(PipelineError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(PipelineError):
    """A dataset is missing, corrupt, truncated or does not match its manifest."""
