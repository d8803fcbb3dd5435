"""Signal handling in one place: every temporary SIGINT/SIGTERM handler of kdlab goes through
:func:`handling`, which installs a handler for the block and restores the previous ones.

Python delivers signals to the main thread only, so in any other thread the helpers do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from kdlab.core.errors import RunInterrupted

__all__ = ["STOP_SIGNALS", "Handler", "handling", "sigterm_raises", "signals_deferred"]

#: the signals that ask a run to stop: Ctrl-C and a scheduler's or ``kill``'s SIGTERM.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: a signal handler ``f(signum, frame)``.
Handler = Callable[[int, FrameType | None], None]


@contextlib.contextmanager
def handling(handler: Handler, signals: tuple[signal.Signals, ...] = STOP_SIGNALS
             ) -> Iterator[bool]:
    """Install ``handler`` for ``signals`` during the block and restore the previous handlers
    after it. Yields whether it was installed (False outside the main thread: a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield True
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the duration of the block, then deliver them.

    A Ctrl-C landing inside ``torch.save`` raises from the middle of its writer, which torch
    reports as a corrupt-stream RuntimeError ("unexpected pos") instead of an interruption; the
    atomic write keeps the previous checkpoint, but the run would end as a failed write. Here a
    signal received during the write is recorded, the previous handlers are restored after it,
    and the signal is re-delivered to the process (so the run stops as interrupted, right after a
    complete checkpoint).
    """
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    with handling(hold):
        yield
    for sig in dict.fromkeys(received):
        signal.raise_signal(sig)


@contextlib.contextmanager
def sigterm_raises(exc: Callable[[int], BaseException] = RunInterrupted) -> Iterator[None]:
    """During the block SIGTERM raises ``exc(signum)`` (default :class:`RunInterrupted`: the
    run ends "interrupted", like Ctrl-C)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise exc(signum)

    with handling(handler, (signal.SIGTERM,)):
        yield
