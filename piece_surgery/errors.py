"""The one exception type for mistakes a user can cause (bad input, wrong files, bad options)."""


class PieceError(Exception):
    """A user-facing error: the message is one line that says what is wrong and what to do.

    Control characters (a newline from a file's contents, say) are escaped, so the message stays
    one line whatever it quotes.
    """

    def __init__(self, message: str):
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))
