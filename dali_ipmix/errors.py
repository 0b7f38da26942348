"""The project's user-facing error type (no dependencies, importable from anywhere)."""


class UserError(Exception):
    """A problem with the user's input: printed as one line naming the file or flag, exit code 2."""
