"""ThreadingMixIn: a thread per request, with the stdlib's semantics.

Hooks overridden: ``process_request`` (starts the thread) and ``server_close``
(joins the threads when ``block_on_close``). Attributes read: ``daemon_threads``,
``block_on_close``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from netserve._core._servers import BaseServer

__all__ = ["ThreadingMixIn"]

# The mix-ins are typed as servers so that mypy checks their calls to the hooks;
# at run time they derive from object, as in the stdlib, and go first in the MRO.
if TYPE_CHECKING:
    _MixInBase = BaseServer
else:
    _MixInBase = object


class _JoinableThreads:
    """The non-daemon request threads that ``server_close()`` must join.

    Finished threads are dropped whenever a new one is added, so a long-running
    server does not keep every thread it ever started (bpo-37193).
    """

    __slots__ = ("_lock", "_threads")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def __len__(self) -> int:
        return len(self._threads)

    def add(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)

    def join_all(self) -> None:
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join()


class ThreadingMixIn(_MixInBase):
    """Handle each request in a new thread."""

    _netserve_handles_inline = False

    # Request threads are daemons: the interpreter exits without waiting for them.
    daemon_threads: bool = False
    # server_close() waits for the non-daemon request threads.
    block_on_close: bool = True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The body of a request thread: handle, report errors, always shut down."""
        self._netserve_run_request(request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a thread that runs ``process_request_thread``."""
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address)
        )
        thread.daemon = self.daemon_threads
        if self.block_on_close and not thread.daemon:
            self._joinable_threads().add(thread)
        thread.start()

    def _joinable_threads(self) -> _JoinableThreads:
        # Created on first use: only servers that block on close need it, and a
        # subclass's __init__ need not call ours. The stdlib's tests read
        # ``server._threads``, so that is its name.
        threads: _JoinableThreads | None = vars(self).get("_threads")
        if threads is None:
            threads = self._threads = _JoinableThreads()
        return threads

    def server_close(self) -> None:
        """Close the server, then join request threads if ``block_on_close``."""
        super().server_close()
        threads: _JoinableThreads | None = vars(self).get("_threads")
        if threads is not None:
            threads.join_all()
