"""The error type for anything a user can fix: printed as one line, exit code 2, no traceback."""


class UserError(Exception):
    """Bad input: the message names the file, key or shard and what was expected."""
