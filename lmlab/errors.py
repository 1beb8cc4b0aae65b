"""Errors meant for the user: the CLI prints them as one line (no traceback).

Every message names the file, line or key at fault and what was expected.
"""


class LmlabError(Exception):
    """Base class of user-facing errors."""


class ConfigError(LmlabError, ValueError):
    """A config key is unknown, missing or of the wrong type."""


class CheckpointError(LmlabError, ValueError):
    """A weights/tokenizer file is missing, truncated, or not what was expected."""


class DataError(LmlabError, ValueError):
    """A dataset file has a bad line, field or size."""


class OutputError(LmlabError):
    """An output path holds something lmlab did not write (or is not a folder): refused, never replaced."""
