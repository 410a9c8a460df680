"""The one exception type for mistakes a user can cause (bad input, wrong files, bad options), and
the helpers that keep every message one short line."""

# An error quotes at most this many characters of a value it did not make (a file's contents, a
# library's message): a value can be megabytes long, an error line never is.
MAX_QUOTE = 200


class PieceError(Exception):
    """A user-facing error: the message is one line that says what is wrong and what to do.

    Control characters (a newline from a file's contents, say) are escaped, so the message stays
    one line whatever it quotes.
    """

    def __init__(self, message: str):
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name if it has none; with the
    line after it when it ends in a colon, as "Error(s) in loading state_dict:" does), cut to
    MAX_QUOTE characters: how a library's error is quoted in ours."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return quote(line)


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """A value as an error may quote it: its text cut to `limit` characters (with `...`)."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def no_device(name: str) -> PieceError:
    """The error for a device that is asked for but not here."""
    kind = "CUDA GPU" if name.startswith("cuda") else name.upper()
    return PieceError(f"--device {name} asked for, but no {kind} is available; use --device cpu")
