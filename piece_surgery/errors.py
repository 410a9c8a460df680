"""The one exception type for mistakes a user can cause (bad input, wrong files, bad options)."""


class PieceError(Exception):
    """A user-facing error: the message is one line that says what is wrong and what to do."""
