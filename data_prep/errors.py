"""The one exception type that the command line turns into a one-line error and exit code 2."""

from __future__ import annotations


class PrepError(Exception):
    """Bad input: the message names the file or flag and says what was expected."""

    def __str__(self) -> str:
        # Messages quote library errors (pyarrow's and expat's may span lines); the CLI prints one line.
        return " ".join(part.strip() for part in super().__str__().splitlines() if part.strip())
