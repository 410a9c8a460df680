"""One writer at a time into a folder that a command edits in place (eval --record into a delta):
an exclusive lock on the folder itself (flock), which the kernel drops when its holder ends, so no
lock file is left in the folder and no dead process keeps others out."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from piece_surgery.runtime.errors import PieceError

try:
    import fcntl
except ImportError:  # no flock on this system: writers still read afresh and check before writing
    fcntl = None

WAIT_S = 120.0  # a record takes milliseconds; a holder this slow is stuck, not busy


@contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` while the block runs (another holder: wait for it).
    PieceError naming `what` if another process holds it for over WAIT_S seconds. On a file
    system without flock, or for a folder that cannot be opened for reading, the block runs
    unlocked."""
    try:
        fd = os.open(folder, os.O_RDONLY) if fcntl is not None else None
    except OSError:
        fd = None
    if fd is None:
        yield
        return
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PieceError(
                        f"{what} is being written by another process for over {WAIT_S:g} s; "
                        "try again when it is done"
                    ) from None
                time.sleep(0.02)
            except OSError:  # a file system without flock (some network ones)
                break
        yield
    finally:
        os.close(fd)  # the lock goes with the descriptor
