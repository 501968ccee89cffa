"""Child processes a server started: reaped pid by pid, never ``waitpid(-1)``.

Shared by the forking model and, later, the prefork supervisor. ``waitpid(-1)``
would steal the exit status of processes other code started (house style; the
stdlib's own test starts such a process and checks its status), so every wait
names a pid. Waiting for *any* of our children uses their pidfds (Linux 5.3+);
elsewhere it waits for one of them.

Theory of operation
-------------------
The pids live in a set the owner passes in (the forking server's
``active_children``, which the stdlib documents). Reaping takes ``_lock``, so
the serving loop and the background reaper never reap the same pid twice and
never lose an exit status: the one that reaps a pid reports it through
``on_exit(pid, exitcode)``.

``reap_in_background()`` is for a server closed without waiting
(``block_on_close = False``): a daemon thread waits on the pidfds of the
children still running and reaps each as it exits, then ends. Without it those
children would stay zombies for the life of the process (issue 10).
"""

from __future__ import annotations

import os
import select
import selectors
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

__all__ = ["Children", "exit_child"]


def exit_child(status: int) -> NoReturn:
    """End a forked child: never back into the caller's stack or the parent's
    cleanup (atexit, finalizers), but with what it printed written out
    (``os._exit`` skips the flush a normal exit does)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


# How long wait_for_one() pauses between looks when it has no pidfd to wait on.
_NO_PIDFD_PAUSE = 0.05


class Children:
    """The pids one owner started, and the means to reap them."""

    def __init__(self, pids: set[int], on_exit: Callable[[int, int], None]) -> None:
        self.pids = pids
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        # pid -> pidfd, registered in a serving loop's selector by watch(); the
        # pidfds seen readable since (see exited()).
        self._watched: dict[int, int] = {}
        self._exited: set[int] = set()

    def __len__(self) -> int:
        return len(self.pids)

    def add(self, pid: int) -> None:
        with self._lock:
            self.pids.add(pid)

    def reap(self) -> None:
        """Reap every child that has exited, without waiting."""
        with self._lock:
            for pid in list(self.pids):
                self._reap_locked(pid, os.WNOHANG)

    def reap_all(self) -> None:
        """Wait for every child to exit, reaping each."""
        while self.pids:
            self.wait_for_one()
            self.reap()

    def _reap_locked(self, pid: int, flags: int) -> None:
        try:
            done, status = os.waitpid(pid, flags)
        except ChildProcessError:
            # Reaped by someone else (a SIGCHLD handler set to SIG_IGN, say): it
            # is gone, and its status with it.
            done, status = pid, 0
        if done:
            self.pids.discard(pid)
            self._on_exit(pid, os.waitstatus_to_exitcode(status))

    def wait_for_one(self, timeout: float | None = None) -> None:
        """Block until at least one child has exited (or ``timeout`` passed)."""
        with self._lock:
            pids = list(self.pids)
        if not pids:
            return
        pidfds: list[int] = []
        try:
            for pid in pids:
                try:
                    pidfds.append(os.pidfd_open(pid))
                except ProcessLookupError:
                    return  # already gone: the caller's reap sees it
            poller = select.poll()
            for fd in pidfds:
                poller.register(fd, select.POLLIN)
            poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
        except (AttributeError, OSError):
            # No pidfd (not Linux, an old kernel, or a full descriptor table):
            # nothing to wait on for "any of them", so look again shortly,
            # within the timeout. Rare, and a pause, never a busy loop.
            time.sleep(_NO_PIDFD_PAUSE if timeout is None else min(_NO_PIDFD_PAUSE, timeout))
        finally:
            for fd in pidfds:
                os.close(fd)

    def watch(self, selector: selectors.BaseSelector, data: object) -> bool:
        """Have ``selector`` report each child's exit: a pidfd per running child
        is registered with ``data`` (those of children reaped since are
        dropped). False where pidfds cannot be had (not Linux, an old kernel,
        a full descriptor table): the caller must look again on its own."""
        with self._lock:
            pids = set(self.pids)
        exited, self._exited = self._exited, set()
        for pid in [p for p, fd in self._watched.items() if p not in pids or fd in exited]:
            self._unwatch_one(selector, pid)
        for pid in pids.difference(self._watched):
            try:
                fd = os.pidfd_open(pid)
            except (AttributeError, OSError):
                # No pidfd; or the pid was reaped by someone else (a SIGCHLD
                # set to SIG_IGN): nothing would wake for it, and the caller's
                # next reap() forgets it.
                return False
            self._watched[pid] = fd  # first: closed by unwatch() whatever follows
            selector.register(fd, selectors.EVENT_READ, data)
        return True

    def exited(self, fd: int) -> None:
        """A watched pidfd became readable: reap. The next ``watch()`` drops
        that pidfd (it stays readable, and its pid, once reaped, may come back
        as another child of ours)."""
        self.reap()
        self._exited.add(fd)

    def unwatch(self, selector: selectors.BaseSelector) -> None:
        """Undo ``watch()``: unregister and close every pidfd."""
        self._exited.clear()
        for pid in list(self._watched):
            self._unwatch_one(selector, pid)

    def _unwatch_one(self, selector: selectors.BaseSelector, pid: int) -> None:
        fd = self._watched.pop(pid)
        try:
            selector.unregister(fd)
        except (KeyError, ValueError):
            pass  # never registered there (a loop that left without unwatch())
        os.close(fd)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every child not yet reaped (a pid is not reused
        before it is reaped, so none of these can be another process)."""
        with self._lock:
            for pid in self.pids:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    def reap_in_background(self) -> None:
        """Reap the children still running as they exit, on a daemon thread."""
        with self._lock:
            if not self.pids or (self._reaper is not None and self._reaper.is_alive()):
                return
            self._reaper = threading.Thread(
                target=self._reap_until_none_left, name="netserve-reaper", daemon=True
            )
            self._reaper.start()

    def _reap_until_none_left(self) -> None:
        while self.pids:
            self.wait_for_one()
            self.reap()
