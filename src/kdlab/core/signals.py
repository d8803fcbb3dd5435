"""Signal handling in one place: every temporary SIGINT/SIGTERM handler of kdlab goes through
:func:`handling`, which installs a handler for the block and restores the previous ones.

Python delivers signals to the main thread only, so in any other thread the helpers that install
handlers do nothing.

Loader worker processes (streamed data sets) ignore the stop signals that reach their whole
process group or job (a scheduler's pre-emption, Ctrl-C in a terminal): the main process decides
when to stop and stops them itself (:func:`worker_ignores_stop_signals`,
:func:`stop_signals_blocked`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from kdlab.core.errors import RunInterrupted

__all__ = ["CHILD_SIGNALS", "STOP_SIGNALS", "WRITE_SIGNALS", "Handler", "child_exits_ignored",
           "handling", "sigterm_raises", "signals_deferred", "stop_signals_blocked",
           "worker_ignores_stop_signals"]

#: the signals that ask a run to stop: Ctrl-C and a scheduler's or ``kill``'s SIGTERM.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

#: a child process ended (none where the platform has no SIGCHLD). torch's DataLoader raises
#: from its SIGCHLD handler, wherever the main process is, when a worker dies.
CHILD_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGCHLD", None),) if s is not None)

#: what a checkpoint write holds back until it is complete (:func:`signals_deferred`). SIGCHLD
#: comes first, so it is put back first: a stop signal arriving while the handlers are put back
#: finds SIGCHLD's own handler already in place.
WRITE_SIGNALS: tuple[signal.Signals, ...] = CHILD_SIGNALS + STOP_SIGNALS

#: the stop signals a worker can block and wait for (POSIX only).
_CAN_BLOCK = hasattr(signal, "pthread_sigmask")

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
def signals_deferred(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Hold ``signals`` (default SIGINT and SIGTERM) for the duration of the block, then deliver
    them: the stop signals first, in the order received, then the others (``WRITE_SIGNALS``
    adds SIGCHLD, so that a loader worker's death cannot interrupt a write either).

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

    with handling(hold, signals):
        yield
    # stop signals first (sorted is stable: each group stays in the order received)
    for sig in sorted(dict.fromkeys(received), key=lambda s: s not in STOP_SIGNALS):
        signal.raise_signal(sig)


@contextlib.contextmanager
def sigterm_raises(exc: Callable[[int], BaseException] = RunInterrupted) -> Iterator[None]:
    """During the block SIGTERM raises ``exc(signum)`` (default :class:`RunInterrupted`: the
    run ends "interrupted", like Ctrl-C)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise exc(signum)

    with handling(handler, (signal.SIGTERM,)):
        yield


def _no_op(signum: int, frame: FrameType | None) -> None:
    """A handler that does nothing (unlike ``SIG_IGN``, which for SIGCHLD also reaps children
    automatically, so that nobody could wait for them any more)."""


def child_exits_ignored() -> contextlib.AbstractContextManager[bool]:
    """During the block a child's exit (SIGCHLD) runs no handler, so torch's DataLoader does not
    raise from the middle of whatever runs when a worker dies (its next fetch still notices).
    For a run that is already stopping. Yields whether the handler was installed."""
    return handling(_no_op, CHILD_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT and SIGTERM in the calling thread during the block (a no-op where the
    platform cannot), then restore its signal mask; signals that arrived meanwhile are
    delivered then (to another thread earlier, where one does not block them).

    Processes forked inside the block start with the signals blocked, so a stop signal to the
    process group cannot end a loader worker before :func:`worker_ignores_stop_signals` runs in
    it."""
    if not _CAN_BLOCK:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_ignores_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGINT, and SIGTERM from any process
    but its parent (the signal of a scheduler or of ``kill -TERM -- -PGID`` reaches every process
    of the group, and would end the workers before the main process could finish its step and
    checkpoint). SIGTERM from the parent, which is how the main process ends workers that do
    not stop by themselves (``Process.terminate``, also at interpreter exit), still ends the
    worker at once with status 0, as torch's own worker handler does.

    SIGTERM stays blocked in every thread of the worker and a daemon thread waits for it
    (``sigwaitinfo``, which names the sender). Where the platform has no ``sigwaitinfo``
    (macOS, Windows) only SIGINT is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not (_CAN_BLOCK and hasattr(signal, "sigwaitinfo")):
        if _CAN_BLOCK:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=_exit_on_parents_sigterm, name=f"kdlab-worker-{worker_id}-sigterm",
                     daemon=True).start()


def _exit_on_parents_sigterm() -> None:
    """Wait for SIGTERM (blocked in the worker); end the worker when its parent sent it."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == os.getppid():
            os._exit(0)
