"""The one exception type that the CLI turns into a clear one-line message and a non-zero exit."""


class BdlensError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it, on one line."""
