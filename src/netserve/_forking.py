"""ForkingMixIn: a child process per request, with the stdlib's semantics.

Hooks overridden: ``process_request`` (forks), ``service_actions`` and
``handle_timeout`` (reap), ``server_close`` (reap, waiting if ``block_on_close``).
Attributes read: ``max_children``, ``block_on_close``; ``active_children`` holds
the pids of the children this server started.

A server reaps only its own children, pid by pid: ``waitpid(-1)`` would steal the
exit status of processes other code started (house style; the stdlib test starts
such a process and checks its status). To wait for *any* of our children when
``max_children`` is reached, we watch their pidfds (Linux 5.3+); elsewhere we
wait for one of them.
"""

from __future__ import annotations

import os
import select
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from netserve._servers import BaseServer

__all__ = ["ForkingMixIn"]

if TYPE_CHECKING:
    _MixInBase = BaseServer
else:
    _MixInBase = object


class ForkingMixIn(_MixInBase):
    """Handle each request in a new child process."""

    # handle_request() waits at most this long, so that children are reaped even
    # on a server driven by handle_request() alone.
    timeout: float | None = 300
    active_children: set[int] | None = None
    max_children: int = 40
    # server_close() waits for every child to exit.
    block_on_close: bool = True

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap finished children; first wait while ``max_children`` are running.

        With ``blocking``, wait for every child to exit.
        """
        children = self.active_children
        if not children:
            return
        while len(children) >= self.max_children:
            _wait_for_one_of(children)
            _reap(children, blocking=False)
        _reap(children, blocking=blocking)

    def handle_timeout(self) -> None:
        """Reap finished children."""
        self.collect_children()

    def service_actions(self) -> None:
        """Reap finished children on every pass of ``serve_forever()``."""
        self.collect_children()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Fork; the child handles the request and exits, the parent carries on."""
        # Reaping here too makes max_children a bound for handle_request() loops,
        # which never call service_actions().
        self.collect_children()
        pid = os.fork()
        if pid == 0:
            self._serve_in_child(request, client_address)
        if self.active_children is None:
            self.active_children = set()
        self.active_children.add(pid)
        # The child has its own copy of the connection.
        self.close_request(request)

    def _serve_in_child(self, request: Any, client_address: Any) -> NoReturn:
        # The child must never return into the parent's loop or run its cleanup
        # (atexit, finalizers): every path ends in os._exit. The status is 0 only
        # when the handler returned normally.
        status = 1
        try:
            try:
                self.finish_request(request, client_address)
                status = 0
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
        finally:
            # os._exit skips the flush that a normal exit would do.
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(status)

    def server_close(self) -> None:
        """Close the server, then reap children (waiting if ``block_on_close``)."""
        super().server_close()
        self.collect_children(blocking=self.block_on_close)


def _reap(children: set[int], *, blocking: bool) -> None:
    flags = 0 if blocking else os.WNOHANG
    for pid in list(children):
        try:
            done, _ = os.waitpid(pid, flags)
        except ChildProcessError:
            done = pid  # already reaped by someone else: it is gone either way
        if done:
            children.discard(pid)


def _wait_for_one_of(children: set[int]) -> None:
    """Block until at least one of ``children`` has exited (it is reaped later)."""
    pidfds: list[int] = []
    try:
        for pid in children:
            try:
                pidfds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                return  # already gone: the caller's reap pass will see it
        poller = select.poll()
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        poller.poll()
    except (AttributeError, OSError):
        # No pidfds here (not Linux, or an old kernel): wait for one child.
        pid = min(children)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        children.discard(pid)
    finally:
        for fd in pidfds:
            os.close(fd)
