"""ThreadPoolMixIn: a bounded set of reused worker threads (issue 3, part 1).

Theory of operation
-------------------
Three places a request can be, and each is bounded:

1. **The kernel's listen backlog.** The serving loop stops accepting (it takes
   the listener out of its selector) whenever the hand-off queue is full, so
   excess connections wait there, not in this process.
2. **Parked.** A stream connection that has sent nothing yet waits in the
   serving loop's selector, holding no worker: connections that open and stay
   silent cannot starve the pool. ``park_timeout`` closes those that stay silent
   too long. Its first byte (or EOF) moves it on.
3. **The hand-off queue** (at most ``queue_size``), from which at most
   ``max_workers`` threads take requests and run the usual
   ``finish_request``/``handle_error``/``shutdown_request`` chain.

A connection that became readable while the queue was full is held in a short
"ready" list; the listener stays out of the selector until that list has moved
into the queue, so the list can only be as long as the number of connections
parked when the queue filled. Workers wake the loop when they free a slot it is
waiting for.

Parking assumes the client speaks first. For protocols where the server speaks
first (SMTP, FTP banners), set ``park_until_readable = False``.

Hooks overridden: ``process_request``, ``server_close``, and the private loop
hooks of ``BaseServer.serve_forever``. Attributes read: ``max_workers``,
``queue_size``, ``park_until_readable``, ``park_timeout``, ``daemon_threads``,
``block_on_close``.
"""

from __future__ import annotations

import _socket
import collections
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from netserve._servers import BaseServer, TCPServer, UDPServer

__all__ = [
    "PoolStatistics",
    "ThreadPoolMixIn",
    "ThreadPoolTCPServer",
    "ThreadPoolUDPServer",
]

if TYPE_CHECKING:
    _MixInBase = BaseServer
else:
    _MixInBase = object

# Marks a parked connection's selector key.
_PARKED = "netserve-parked"


@dataclass(frozen=True)
class PoolStatistics:
    """A snapshot of a thread pool's state, from ``statistics()``."""

    max_workers: int
    #: Worker threads alive now (started on demand, up to max_workers).
    workers: int
    #: Workers running a request.
    busy_workers: int
    #: Requests waiting in the hand-off queue (and ready ones waiting for it).
    queued: int
    #: Stream connections waiting for their first byte.
    parked: int
    #: Requests finished, with or without an error.
    handled: int
    #: Requests whose handler raised (each went to handle_error()).
    errors: int
    #: Parked connections closed because they stayed silent past park_timeout.
    park_timeouts: int
    #: Whether the serving loop is accepting (False: the queue is full, or no
    #: loop is running).
    accepting: bool


class _Pool:
    """Worker threads and the bounded hand-off queue between them and the loop."""

    def __init__(self, server: ThreadPoolMixIn) -> None:
        self.server = server
        self.max_workers = max(1, server.max_workers)
        self.queue_size = max(1, server.queue_size)
        self.daemon = server.daemon_threads
        self.jobs: collections.deque[tuple[Any, Any]] = collections.deque()
        self.lock = threading.Lock()
        self.work_ready = threading.Condition(self.lock)
        self.room_ready = threading.Condition(self.lock)
        self.threads: set[threading.Thread] = set()
        self.idle = 0
        self.busy = 0
        self.handled = 0
        self.errors = 0
        self.closing = False
        # Set by the loop when it stops accepting for want of room; the worker
        # that makes room then wakes it.
        self.loop_wants_room = False

    def has_room(self) -> bool:
        return len(self.jobs) < self.queue_size

    def offer(self, job: tuple[Any, Any]) -> bool:
        """Queue a job if there is room; never blocks."""
        with self.lock:
            if len(self.jobs) >= self.queue_size:
                return False
            self._enqueue(job)
            return True

    def put(self, job: tuple[Any, Any]) -> None:
        """Queue a job, waiting for room."""
        with self.lock:
            while len(self.jobs) >= self.queue_size:
                self.room_ready.wait()
            self._enqueue(job)

    def _enqueue(self, job: tuple[Any, Any]) -> None:
        if self.closing:
            raise RuntimeError("the server's thread pool is closed")
        self.jobs.append(job)
        if self.idle:
            self.work_ready.notify()
        elif len(self.threads) < self.max_workers:
            self._start_worker_locked()

    def _start_worker_locked(self) -> None:
        thread = threading.Thread(target=self._work, name="netserve-pool-worker")
        thread.daemon = self.daemon
        self.threads.add(thread)
        thread.start()

    def _work(self) -> None:
        server = self.server
        try:
            while True:
                with self.lock:
                    while not self.jobs and not self.closing:
                        self.idle += 1
                        self.work_ready.wait()
                        self.idle -= 1
                    if not self.jobs:
                        return  # closing, and nothing is left to do
                    request, client_address = self.jobs.popleft()
                    self.busy += 1
                    self.room_ready.notify()
                    wake_loop = self.loop_wants_room
                    self.loop_wants_room = False
                if wake_loop:
                    server._netserve_stop.wake()
                try:
                    if not server._netserve_run_request(request, client_address):
                        with self.lock:
                            self.errors += 1
                finally:
                    with self.lock:
                        self.busy -= 1
                        self.handled += 1
        finally:
            # Also when a handler's SystemExit ends this thread. A job queued
            # while this thread still counted as a worker would find no one to
            # take it: start the replacement now.
            with self.lock:
                self.threads.discard(threading.current_thread())
                if self.jobs and not self.idle:
                    self._start_worker_locked()

    def close(self, *, wait: bool) -> None:
        """Let the workers finish what is queued, then end; join them if ``wait``."""
        with self.lock:
            self.closing = True
            self.work_ready.notify_all()
        # Join until none is left: a worker ended by SystemExit may have started
        # a replacement meanwhile.
        while wait:
            with self.lock:
                threads = list(self.threads)
            if not threads:
                break
            for thread in threads:
                thread.join()


class _Parked:
    __slots__ = ("client_address", "deadline", "request")

    def __init__(self, request: socket.socket, client_address: Any, deadline: float) -> None:
        self.request = request
        self.client_address = client_address
        self.deadline = deadline


class ThreadPoolMixIn(_MixInBase):
    """Handle requests on a bounded pool of reused worker threads."""

    # At most this many worker threads, started as requests need them.
    max_workers: int = 32
    # At most this many requests wait for a worker; beyond that the server stops
    # accepting and connections wait in the kernel's backlog.
    queue_size: int = 8
    # A stream connection takes a worker only once it has sent something.
    park_until_readable: bool = True
    # Close a parked connection that sent nothing for this long (None: never).
    park_timeout: float | None = None
    daemon_threads: bool = False
    # Excess connections wait in the kernel's backlog (see above): give it room.
    request_queue_size: int = socket.SOMAXCONN
    # server_close() waits for the workers to finish what was handed to them.
    block_on_close: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the server's own __init__: a failed bind calls server_close().
        self._netserve_pool_state = _Pool(self)
        self._netserve_parked: dict[int, _Parked] = {}
        self._netserve_park_order: collections.deque[_Parked] = collections.deque()
        self._netserve_ready_list: collections.deque[tuple[Any, Any]] = collections.deque()
        self._netserve_park_timeouts = 0
        self._netserve_selector_now: selectors.BaseSelector | None = None
        self._netserve_listening = True
        super().__init__(*args, **kwargs)

    def statistics(self) -> PoolStatistics:
        """An immutable snapshot of the pool's state."""
        pool = self._netserve_pool_state
        with pool.lock:
            return PoolStatistics(
                max_workers=pool.max_workers,
                workers=len(pool.threads),
                busy_workers=pool.busy,
                queued=len(pool.jobs) + len(self._netserve_ready_list),
                parked=len(self._netserve_parked),
                handled=pool.handled,
                errors=pool.errors,
                park_timeouts=self._netserve_park_timeouts,
                accepting=self._netserve_listening and self._netserve_selector_now is not None,
            )

    def process_request(self, request: Any, client_address: Any) -> None:
        """Park a silent stream connection, or hand the request to a worker."""
        pool = self._netserve_pool_state
        selector = self._netserve_selector_now
        if selector is None:
            # Not inside serve_forever() (handle_request()): nobody would watch a
            # parked connection, so hand it over, waiting for room.
            pool.put((request, client_address))
        elif self.park_until_readable and _is_stream(request) and not _has_input(request):
            deadline = (
                time.monotonic() + self.park_timeout if self.park_timeout is not None else 0.0
            )
            parked = _Parked(request, client_address, deadline)
            self._netserve_parked[request.fileno()] = parked
            if self.park_timeout is not None:
                self._netserve_park_order.append(parked)
            selector.register(request, selectors.EVENT_READ, _PARKED)
        elif not pool.offer((request, client_address)):
            # The loop only accepts while there is room, so this is a race with
            # another producer; keep the request rather than drop it.
            self._netserve_ready_list.append((request, client_address))

    # -- the serving loop's hooks ------------------------------------------------------

    def _netserve_selector(self) -> selectors.BaseSelector:
        # Many parked connections: epoll costs nothing per idle descriptor.
        return selectors.DefaultSelector()

    def _netserve_loop_started(self, selector: selectors.BaseSelector) -> None:
        self._netserve_selector_now = selector
        self._netserve_listening = True
        for parked in self._netserve_parked.values():
            selector.register(parked.request, selectors.EVENT_READ, _PARKED)

    def _netserve_loop_stopped(self, selector: selectors.BaseSelector) -> None:
        # Parked connections stay parked; the next loop watches them again.
        self._netserve_selector_now = None

    def _netserve_ready(self, key: selectors.SelectorKey) -> None:
        # A parked connection spoke (or closed): it is ready for a worker.
        selector = self._netserve_selector_now
        assert selector is not None
        selector.unregister(key.fileobj)
        parked = self._netserve_parked.pop(key.fd)
        job = (parked.request, parked.client_address)
        if self._netserve_ready_list or not self._netserve_pool_state.offer(job):
            self._netserve_ready_list.append(job)

    def _netserve_before_wait(
        self, selector: selectors.BaseSelector, poll_interval: float | None
    ) -> float | None:
        pool = self._netserve_pool_state
        ready = self._netserve_ready_list
        while ready and pool.offer(ready[0]):
            ready.popleft()
        room = not ready and pool.has_room()
        if not room:
            with pool.lock:
                pool.loop_wants_room = True
            # Look again now that the flag is set: a worker may have made room in
            # between, and it would not have woken us.
            room = not ready and pool.has_room()
        if room != self._netserve_listening:
            if room:
                selector.register(self, selectors.EVENT_READ)
            else:
                selector.unregister(self)
            self._netserve_listening = room
        return self._netserve_expire_parked(selector, poll_interval)

    def _netserve_expire_parked(
        self, selector: selectors.BaseSelector, poll_interval: float | None
    ) -> float | None:
        order = self._netserve_park_order
        if not order:
            return poll_interval
        now = time.monotonic()
        while order and order[0].deadline <= now:
            parked = order.popleft()
            if self._netserve_parked.get(parked.request.fileno()) is parked:
                del self._netserve_parked[parked.request.fileno()]
                selector.unregister(parked.request)
                self._netserve_park_timeouts += 1
                self.shutdown_request(parked.request)
        if not order:
            return poll_interval
        until_next = max(0.0, order[0].deadline - now)
        return until_next if poll_interval is None else min(poll_interval, until_next)

    def server_close(self) -> None:
        """Close the listener and parked connections; let the workers finish.

        Requests already handed to the pool are handled; with ``block_on_close``
        this waits for them.
        """
        super().server_close()
        pool = self._netserve_pool_state
        for parked in self._netserve_parked.values():
            self.shutdown_request(parked.request)
        self._netserve_parked.clear()
        self._netserve_park_order.clear()
        while self._netserve_ready_list:
            pool.put(self._netserve_ready_list.popleft())
        pool.close(wait=self.block_on_close)


# Plain integers, worked out once: socket's flags and kinds are enums, and
# combining or converting them runs Python code (an enum call, about a
# microsecond) on every connection.
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_STREAM = int(socket.SOCK_STREAM)
_kind_of = _socket.socket.type.__get__  # socket.type, without the enum


def _has_input(sock: socket.socket) -> bool:
    """Whether the peer has already sent something (or closed).

    Under connection churn the first bytes usually arrive with the connection;
    one peek then saves parking it: two epoll_ctl calls and a loop pass.
    """
    try:
        sock.recv(1, _PEEK_NOW)
    except BlockingIOError:
        return False
    except OSError:
        return True  # an error is for the handler to meet
    return True


def _is_stream(request: Any) -> bool:
    return isinstance(request, socket.socket) and _kind_of(request) == _STREAM


class ThreadPoolTCPServer(ThreadPoolMixIn, TCPServer):
    """A TCP server on a bounded thread pool."""


class ThreadPoolUDPServer(ThreadPoolMixIn, UDPServer):
    """A UDP server on a bounded thread pool."""


if hasattr(socket, "AF_UNIX"):
    from netserve._servers import UnixDatagramServer, UnixStreamServer

    __all__ += ["ThreadPoolUnixDatagramServer", "ThreadPoolUnixStreamServer"]

    class ThreadPoolUnixStreamServer(ThreadPoolMixIn, UnixStreamServer):
        """A Unix stream server on a bounded thread pool."""

    class ThreadPoolUnixDatagramServer(ThreadPoolMixIn, UnixDatagramServer):
        """A Unix datagram server on a bounded thread pool."""
