"""A signal's handler for the length of a block, and the one before it put back after."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def signal_handler(signum: int, handler=None) -> Iterator[bool]:
    """Within the block, ``handler`` for ``signum`` (None: leave it as it is, for a library to set),
    and after it the handler from before. Yields whether it applies: Python sets handlers on the main
    thread only, and elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = signal.getsignal(signum)
    if handler is not None:
        signal.signal(signum, handler)
    try:
        yield True
    finally:
        if previous is not None:  # None: a handler not set from Python, which it cannot put back
            signal.signal(signum, previous)
