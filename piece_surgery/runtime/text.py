"""Text from files and users made safe to show on a terminal."""

from __future__ import annotations

# Format characters that join or direct ordinary text (emoji sequences, Indic, Arabic and Hebrew
# script): printed as they are. The bidirectional overrides and isolates, which can make a line
# read as something else, are escaped with every other unprintable character.
_TEXT_FORMAT = {"\u200c", "\u200d", "\u00ad", "\u200e", "\u200f", "\u061c"}


def printable(text: str, *, keep_lines: bool = True) -> str:
    """`text` safe to print to a terminal: every character that is not printable (control codes
    such as ESC, which start terminal commands, carriage returns, bidirectional overrides) written
    as its Python escape (\\x1b, \\u202e). Newlines and tabs are kept where `keep_lines` (a model's
    answer stays readable); a name or field read from a file is one line, so there they are escaped
    too (a newline in it would print a line of its own, one that could pass for the tool's)."""
    kept = "\n\t" if keep_lines else ""
    return "".join(
        c if c.isprintable() or c in kept or c in _TEXT_FORMAT else c.encode("unicode_escape").decode()
        for c in text
    )
