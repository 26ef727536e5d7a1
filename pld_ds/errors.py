"""The error type for anything a user can fix: printed as one line, exit code 2, no traceback."""


class UserError(Exception):
    """Bad input: the message names the file, key or shard and what was expected."""

    def __str__(self) -> str:
        # Messages quote library errors (h5py's hold newlines), and the CLIs promise one line.
        return " ".join(part.strip() for part in super().__str__().splitlines() if part.strip())
