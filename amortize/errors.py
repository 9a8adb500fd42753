"""User-facing errors: one line naming the file (or argument) and the reason."""

from __future__ import annotations


class AmortizeError(Exception):
    """An error caused by the user's input, reported as a single line without a traceback.

    Args:
        subject: the file, directory or argument at fault (shown first).
        reason: what is wrong with it, in plain words.
    """

    def __init__(self, subject: str, reason: str):
        self.subject = str(subject)
        self.reason = reason
        super().__init__(f"{self.subject}: {reason}")


class BadArgument(AmortizeError):
    """A command-line or API argument is out of range or inconsistent (CLI exit code 2)."""


class BadInput(AmortizeError):
    """An input file cannot be used: missing, unreadable, corrupt or of an unsupported kind."""
