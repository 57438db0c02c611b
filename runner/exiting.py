"""Stopping the batch loops when a Ray worker's process exits.

Ray Train runs the training function in a daemon thread. When Ray ends the worker (ASHA stopped the trial,
the sweep was interrupted), the process finalises while that thread may be inside a torch op; the thread
then wakes, `take_gil` calls `pthread_exit` through torch's C++ frames, and the process aborts with a
~100-line stack trace forwarded to the driver's console (docs/TRAPS.md). An exit handler runs before
finalisation: it asks the loops to stop at their next batch and waits (a bounded time) for the thread.
"""

from __future__ import annotations

import atexit
import threading

_exiting = threading.Event()


class ProcessExiting(RuntimeError):
    """The process is exiting: the loop stops between batches, before the interpreter finalises."""


def stop_loops_at_exit(timeout_s: float = 10.0) -> None:
    """Called from the thread that runs the loops: at exit, stop them and wait for this thread."""
    thread = threading.current_thread()

    def stop_and_wait() -> None:
        _exiting.set()
        thread.join(timeout_s)

    atexit.register(stop_and_wait)


def check() -> None:
    """Between batches of every long loop (image features, training, generation)."""
    if _exiting.is_set():
        raise ProcessExiting("the process is exiting; stopped between batches")
