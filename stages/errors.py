"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class UsageError(Exception):
    """A bad argument or input: the message says what is wrong and how to fix it."""


EXIT_USAGE = 2
