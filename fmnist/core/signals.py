"""Signal handlers for the length of a block: one set and the one before put back after, or Ctrl-C held
until the block ends."""

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


@contextmanager
def sigint_held() -> Iterator[None]:
    """Ctrl-C within the block takes effect when it ends, as if it came then: for work that must not
    stop halfway, like writing a run's files (a KeyboardInterrupt inside a library's queue can leave
    its lock held, and the next call on it waits forever). On the main thread only, as above."""
    received = []
    try:
        with signal_handler(signal.SIGINT, lambda signum, frame: received.append(signum)):
            yield
    finally:
        if received:
            signal.raise_signal(signal.SIGINT)  # to the handler from before, now
