"""Progress of long command-line work (generation, the stages of a run, the dates of a backfill).

Code deep in the pipeline calls :func:`note`; it does nothing unless the command line turned progress on with
:func:`shown_on_terminal`, which it does only when standard output is a terminal, so logs, pipes and CI
output stay as they were. A module-level listener (not a context variable): stage tasks run in Prefect's
worker threads, which must report to the same terminal.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

_listener: Callable[[str], None] | None = None
_lock = threading.Lock()


def note(message: str) -> None:
    """Tell the person at the terminal what the command is doing now (no-op when nobody is watching)."""
    listener = _listener
    if listener is not None:
        listener(message)


@contextmanager
def shown_on_terminal(stream: TextIO | None = None) -> Iterator[bool]:
    """Print progress lines, each stamped with the seconds since the start, while inside the block, if
    ``stream`` (default: standard output) is a terminal. Yields whether progress is shown."""
    global _listener
    stream = stream or sys.stdout
    if not stream.isatty():
        yield False
        return
    started = time.perf_counter()

    def show(message: str) -> None:
        with _lock:
            stream.write(f"[{time.perf_counter() - started:6.1f}s] {message}\n")
            stream.flush()

    previous, _listener = _listener, show
    try:
        yield True
    finally:
        _listener = previous
