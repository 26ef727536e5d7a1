"""The error type for anything a user can fix, and how every pld_ds command reports it: one line on
stderr, exit code 2, no traceback (``--debug`` shows it)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import NoReturn


class UserError(Exception):
    """Bad input: the message names the file, key or shard and what was expected."""

    def __str__(self) -> str:
        # Messages quote library errors (h5py's hold newlines), and the CLIs promise one line.
        return " ".join(part.strip() for part in super().__str__().splitlines() if part.strip())


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line too (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


@contextlib.contextmanager
def one_line_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """A UserError inside becomes `prog: error: message` on stderr and exit code 2 (re-raised with debug)."""
    try:
        yield
    except UserError as err:
        if debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
