"""Errors a user can act on (each message names the problem and the fix), and the stop signal
that is no error at all. At the bottom of the layers, so that any of them can raise these."""


class PipelineError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits non-zero."""

    exit_code = 2


class ConfigError(PipelineError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(PipelineError):
    """A dataset is missing, corrupt, truncated or does not match its manifest."""


class OutputError(PipelineError):
    """An output cannot be written: its disk is full, or a quota or file-size limit is reached."""


class Terminated(BaseException):
    """SIGTERM (a scheduler, `kill`, `timeout`), raised in the main thread so that `finally`
    blocks and context managers run on the way out. A BaseException, as KeyboardInterrupt is,
    so that no `except Exception` on the way swallows it. `pipeline.cli.exits` raises it from
    its signal handler; training and tuning raise it where a library caught the signal first."""


# What a stop signal raises: a run ended by one is KILLED (stopped on purpose), not FAILED.
STOPPED = (KeyboardInterrupt, Terminated)
