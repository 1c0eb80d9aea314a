"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class CompoundError(Exception):
    """An error caused by the user's input or environment, not by a bug."""
