"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class CompoundError(Exception):
    """An error caused by the user's input or environment, not by a bug."""

    exit_code = 2


class RunInterrupted(CompoundError):
    """The user stopped a run (Ctrl-C); the message says how to continue it."""

    exit_code = 130
