"""The one exception type that the command line turns into a one-line error and exit code 2."""

from __future__ import annotations


class PrepError(Exception):
    """Bad input: the message names the file or flag and says what was expected."""
