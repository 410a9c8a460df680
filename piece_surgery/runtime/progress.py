"""Progress on stderr that --quiet silences: a bar for counted work, a spinner for the rest."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

from piece_surgery.runtime.text import printable


class Progress:
    def __init__(self, total: int | None, desc: str, *, quiet: bool = False, unit: str = "ex"):
        desc = printable(desc, keep_lines=False)  # it may name a file: its control codes escaped
        self._bar = None if quiet else tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def note(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


@contextmanager
def working(message: str, *, quiet: bool = False) -> Iterator[None]:
    """A spinner with the elapsed time while uncounted work runs (loading a model), on a terminal."""
    if quiet or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.text import Text

    with Console(stderr=True).status(Text(printable(message, keep_lines=False))):
        yield


@contextmanager
def library_logs_silenced() -> Iterator[None]:
    """transformers' and huggingface_hub's own log lines (advice meant for their users, not ours:
    "We strongly recommend passing in an attention_mask", "No files have been modified") off for
    a while; errors still surface as exceptions, which the commands turn into one line."""
    import logging

    loggers = [logging.getLogger(name) for name in ("transformers", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
