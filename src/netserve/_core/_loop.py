"""Coordination between ``serve_forever()`` and ``shutdown()``.

Theory of operation
-------------------
The stdlib's loop wakes every ``poll_interval`` to look at a flag, so ``shutdown()``
takes up to that long to return. Here the loop also watches the read end of a
socketpair, and ``shutdown()`` writes one byte to the other end: the loop wakes at
once, whatever ``poll_interval`` is (issue 2, "shutdown() returns within a few
milliseconds").

Rules:

1. Every field below is read and written under ``_lock``. The byte is written
   under the lock too, so the loop can never close the socketpair between our
   look at it and our write (a closed fd could have been reused by then).
2. A stop request outlives the loop that did not see it: ``shutdown()`` before
   ``serve_forever()`` makes the next loop return at once, as documented for the
   stdlib. The loop clears the request when it leaves.
3. ``shutdown()`` waits for the loop to stop only when there is a loop to wait
   for and it is running on another thread. Called on the serving thread (from a
   handler), on a thread the loop itself waits for (the hub's), or with no loop
   running, it asks and returns: it never deadlocks.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["StopControl", "drain", "poke"]


def poke(writer: socket.socket) -> None:
    """Write one wake-up byte; a full pipe means a wake-up is already pending."""
    try:
        writer.send(b"\0")
    except BlockingIOError:
        pass


def drain(reader: socket.socket) -> None:
    """Empty the wake-up socket, so that a level-triggered wait blocks again."""
    try:
        while reader.recv(4096):
            pass
    except BlockingIOError:
        pass


class StopControl:
    """The state that ``serve_forever()`` and ``shutdown()`` share."""

    __slots__ = ("_changed", "_generation", "_loop_thread", "_requested", "_waker")

    def __init__(self) -> None:
        # Re-entrant: a signal handler on the serving thread may call shutdown()
        # while that thread is inside enter_loop()/leave_loop() holding the lock.
        self._changed = threading.Condition(threading.RLock())
        self._requested = False
        self._loop_thread: int | None = None
        self._waker: socket.socket | None = None
        # Counts loops that have left. shutdown() waits for the count to move past
        # the loop it saw, not for "no loop": a new loop that starts in between
        # must not keep it waiting.
        self._generation = 0

    def requested(self) -> bool:
        """True once a stop has been asked for and the loop has not yet left."""
        # A plain read of a bool is atomic; the loop checks this on every pass.
        return self._requested

    def enter_loop(self) -> socket.socket:
        """Mark a loop as running on this thread; returns the socket to watch."""
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        with self._changed:
            if self._loop_thread is not None:
                reader.close()
                writer.close()
                raise RuntimeError("serve_forever() is already running on another thread")
            self._loop_thread = threading.get_ident()
            self._waker = writer
        return reader

    def leave_loop(self, reader: socket.socket) -> None:
        """Mark the loop as stopped, consume the stop request, release waiters."""
        with self._changed:
            writer, self._waker = self._waker, None
            self._loop_thread = None
            self._requested = False
            self._generation += 1
            reader.close()
            if writer is not None:
                writer.close()
            self._changed.notify_all()

    def loop_running(self) -> bool:
        """Whether a loop runs now, on any thread."""
        return self._loop_thread is not None  # one read: atomic

    def loop_running_elsewhere(self) -> bool:
        """Whether a loop runs now, on a thread other than this one."""
        with self._changed:
            thread = self._loop_thread
        return thread is not None and thread != threading.get_ident()

    def wake(self) -> None:
        """Wake the loop without asking it to stop (it runs another pass)."""
        with self._changed:
            if self._waker is not None:
                poke(self._waker)

    def request_stop(self, *, wait: bool = True) -> bool:
        """Ask the loop to stop; wait for it when that cannot deadlock.

        ``wait=False`` from a thread whose waiting would deadlock although it
        is not the loop's own (the hub's thread, which the loop needs to stop).
        Returns True when no loop runs any more, False when one still does (it
        was not waited for).
        """
        with self._changed:
            self._requested = True
            if self._waker is not None:
                poke(self._waker)
            if self._loop_thread is None:
                return True
            if not wait or self._loop_thread == threading.get_ident():
                return False
            seen = self._generation
            while self._generation == seen:
                self._changed.wait()
            return True
