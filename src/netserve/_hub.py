"""The greenlet hub: one epoll loop that runs handler greenlets (issue 3, part 2).

Theory of operation
-------------------
Rule 1: everything that touches greenlets happens on the hub's own thread.
Greenlets cannot be switched across threads, so the hub owns a thread for as
long as it has work (handlers alive, or a server accepting through it). Other
threads reach it only through ``call_soon_threadsafe()``, which queues a
function and writes a byte to the hub's wake-up socket. Because the handlers
live on that thread, they carry on after ``shutdown()`` exactly as request
threads do under ThreadingMixIn, and ``server_close()`` can wait for them.

Rule 2: a socket is registered with epoll once, edge-triggered, for reading and
writing, when it is created, and never re-registered. Each socket keeps a
"readable" hint, cleared by a short read and set by every EPOLLIN edge; once the
peer has hung up it stays set, since the edge that said so may have come with
the data that the short read took. A
greenlet that wants to read after a short read waits for the edge without
trying a recv that would fail. (Measured on the prototype: a failing recv
before each wait and re-registering on each wait cost 3.3 system calls a
request against 2.05 for a callback server.) With edge triggering, any data
that arrives after a read produces a new event, so no wake-up is lost.

Rule 3: the loop switches into a waiting greenlet as soon as its event is seen,
and the greenlet switches back when it next waits or ends; greenlets are
children of the hub's greenlet, so a finished one returns there too.

Rule 4: greenlets are reused. A greenlet whose work is done waits in a short
list of spares for the next ``spawn()``, instead of ending. Under connection
churn a fresh greenlet per connection cost about a tenth of the hub's time: on
CPython 3.11 each one maps a 16 KiB frame stack of its own (mmap, page faults,
munmap). A reused greenlet starts each task in an empty ``contextvars``
context, as a new one would. Spares end with the hub's thread.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import greenlet

from netserve._loop import drain, poke

__all__ = ["TIMEOUT", "Hub", "Timer", "current_hub"]

log = logging.getLogger("netserve.hub")

_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
# The peer has closed (or the connection failed): reads return at once from now
# on, and no further edge will say so, so "readable" becomes permanent.
_HANGUP_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# Registered once per socket (rule 2).
SOCKET_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET

# Passed to a waiting greenlet whose timer ran out.
TIMEOUT = object()
# Rebuild the timer heap once this many cancelled timers sit in it and they are
# the majority: a per-read timeout cancels a timer on every read.
_COMPACT_AFTER = 512

_local = threading.local()


def current_hub() -> Hub | None:
    """The hub whose thread this is, or None."""
    hub: Hub | None = getattr(_local, "hub", None)
    return hub


class Waiter(Protocol):
    """What the loop switches to when a socket becomes ready: a greenlet, or a
    starter that creates one (a parked connection)."""

    def switch(self, *args: Any) -> Any: ...


class HubSocket(Protocol):
    """The state the loop reads and writes on a registered socket."""

    _readable: bool
    _hangup: bool
    _reader: Waiter | None
    _writer: Waiter | None


class Timer:
    """A call scheduled on the hub; ``cancel()`` it if it is no longer wanted."""

    __slots__ = ("_hub", "active", "arg", "callback")

    def __init__(self, hub: Hub, callback: Callable[[Any], None], arg: Any) -> None:
        self._hub = hub
        self.callback = callback
        self.arg = arg
        self.active = True

    def cancel(self) -> None:
        if self.active:
            self.active = False
            self._hub._cancelled_timers += 1


class Hub:
    """An epoll loop on its own thread, switching between handler greenlets."""

    def __init__(
        self, name: str = "netserve-hub", *, daemon: bool = False, max_spares: int = 128
    ) -> None:
        self.name = name
        self.daemon = daemon
        self.sockets: dict[int, HubSocket] = {}
        self.greenlet: greenlet.greenlet | None = None
        self.active = 0  # handler greenlets alive
        self._epoll: select.epoll | None = None
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled_timers = 0
        self._sequence = itertools.count()
        self._ready: collections.deque[tuple[Waiter, Any]] = collections.deque()
        self._special: dict[int, Callable[[], None]] = {}
        # Cross-thread calls (rule 1).
        self._lock = threading.Lock()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._ended_thread: threading.Thread | None = None
        self._ident: int | None = None  # the thread's, while it runs the loop
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        # Reasons to keep the thread alive besides live greenlets.
        self._holds = 0
        self._closing = False
        # Finished greenlets waiting for the next spawn() (rule 4).
        self.max_spares = max_spares
        self._spares: list[greenlet.greenlet] = []

    # -- life cycle ------------------------------------------------------------------

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def on_hub_thread(self) -> bool:
        return self._ident == threading.get_ident()

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the hub's thread, starting the thread if needed.

        Raises ``OSError`` (a full descriptor table, say) if the thread has to
        start and cannot; ``fn`` is then not queued.
        """
        with self._lock:
            if self._closing:
                raise RuntimeError("the hub is closed")
            if self._thread is None:
                self._start_locked()
            self._calls.append(fn)
            assert self._wake_w is not None
            poke(self._wake_w)

    def run_sync(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the hub's thread and wait for its result."""
        if self.on_hub_thread():
            return fn()
        done = threading.Event()
        outcome: list[Any] = []

        def call() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as exc:
                outcome.append((False, exc))
            finally:
                done.set()

        self.call_soon_threadsafe(call)
        done.wait()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def hold(self) -> None:
        """Keep the thread running while idle (a server accepts through it)."""
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1

    def close(self) -> None:
        """Refuse new work and wait for the thread to end (on its own, once idle)."""
        with self._lock:
            self._closing = True
            threads = [t for t in (self._thread, self._ended_thread) if t is not None]
            if self._thread is not None and self._wake_w is not None:
                poke(self._wake_w)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    def _start_locked(self) -> None:
        # Everything the thread needs, or nothing: a failure leaves no descriptor.
        epoll = select.epoll()
        try:
            wake_r, wake_w = socket.socketpair()
        except BaseException:
            epoll.close()
            raise
        try:
            wake_r.setblocking(False)
            wake_w.setblocking(False)
            epoll.register(wake_r.fileno(), select.EPOLLIN)
            # Sockets that outlived an earlier thread (a server's datagram socket).
            for fd in self.sockets:
                epoll.register(fd, SOCKET_EVENTS)
            thread = threading.Thread(target=self._main, name=self.name, daemon=self.daemon)
            self._epoll, self._wake_r, self._wake_w = epoll, wake_r, wake_w
            self._special[wake_r.fileno()] = self._run_calls
            self._thread = thread
            thread.start()
        except BaseException:
            self._special.pop(wake_r.fileno(), None)
            self._epoll = self._wake_r = self._wake_w = None
            self._thread = None
            epoll.close()
            wake_r.close()
            wake_w.close()
            raise

    def _main(self) -> None:
        self._ident = threading.get_ident()
        _local.hub = self
        self.greenlet = greenlet.getcurrent()
        try:
            self._loop()
        finally:
            self._end_spares()
            _local.hub = None
            with self._lock:
                # After an error in the loop itself; a normal end tore down already.
                if self._thread is threading.current_thread():
                    self._teardown_locked()

    def _teardown_locked(self) -> None:
        assert self._epoll is not None
        assert self._wake_r is not None
        assert self._wake_w is not None
        self._special.pop(self._wake_r.fileno(), None)
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()
        self._epoll = self._wake_r = self._wake_w = None
        # close() still joins it: it may run a few more lines after this.
        self._ended_thread = self._thread
        self._thread = None
        self._ident = None
        self.greenlet = None

    def _idle(self) -> bool:
        return (
            self.active == 0
            and self._holds == 0
            and not self._ready
            and not self._calls
            and not any(t.active for _, _, t in self._timers)
        )

    def _run_calls(self) -> None:
        assert self._wake_r is not None
        drain(self._wake_r)
        calls = self._calls
        while calls:
            calls.popleft()()

    # -- greenlets (rule 4) ----------------------------------------------------------

    def spawn(self, fn: Callable[[Any, Any], None], first: Any, second: Any) -> None:
        """Run ``fn(first, second)`` in a greenlet now, until it first waits.

        From the hub's thread. ``fn`` should not raise: an exception it lets
        out ends the loop. (Two fixed arguments, not ``*args``: a call with
        ``*args`` runs through C, and every C frame on a greenlet's stack is
        copied out and back at each of its switches.)
        """
        spares = self._spares
        if spares:
            worker = spares.pop()
            # A new greenlet starts in an empty context; so does a reused one.
            worker.gr_context = None
            worker.switch(fn, first, second)
        else:
            greenlet.greenlet(_work, self.greenlet).switch(self, fn, first, second)

    def _end_spares(self) -> None:
        spares = self._spares
        while spares:
            # GreenletExit at the switch() in _work(): the greenlet ends.
            spares.pop().throw()

    # -- scheduling on the hub's thread ------------------------------------------------

    def register(self, fd: int, sock: HubSocket) -> None:
        """Watch ``sock`` from now on: registered with epoll once, for good (rule 2)."""
        assert self._epoll is not None
        self._epoll.register(fd, SOCKET_EVENTS)
        self.sockets[fd] = sock

    def forget(self, fd: int, sock: HubSocket) -> None:
        # No EPOLL_CTL_DEL: closing the descriptor removes it from the epoll set,
        # and the system call would be one more per connection.
        if self.sockets.get(fd) is sock:
            del self.sockets[fd]

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the hub while ``fd`` is readable (level-triggered)."""
        assert self._epoll is not None
        self._epoll.register(fd, select.EPOLLIN)
        self._special[fd] = callback

    def unwatch(self, fd: int, *, registered: bool = True) -> None:
        """Stop watching ``fd``; ``registered=False`` when it is already closed."""
        assert self._epoll is not None
        if self._special.pop(fd, None) is not None and registered:
            self._epoll.unregister(fd)

    def schedule(self, waiter: Waiter, value: Any = None) -> None:
        """Switch to ``waiter`` with ``value`` on the loop's next pass."""
        self._ready.append((waiter, value))

    def call_later(self, delay: float, callback: Callable[[Any], None], arg: Any) -> Timer:
        timer = Timer(self, callback, arg)
        deadline = time.monotonic() + delay
        heapq.heappush(self._timers, (deadline, next(self._sequence), timer))
        return timer

    def _fire_timers(self) -> None:
        timers = self._timers
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if timer.active:
                timer.active = False
                timer.callback(timer.arg)
            else:
                self._cancelled_timers -= 1
        if self._cancelled_timers > _COMPACT_AFTER and self._cancelled_timers * 2 > len(timers):
            self._timers = [entry for entry in timers if entry[2].active]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    def _next_timeout(self) -> float:
        if self._ready:
            return 0.0
        timers = self._timers
        while timers and not timers[0][2].active:
            heapq.heappop(timers)
            self._cancelled_timers -= 1
        if not timers:
            return -1.0
        return max(0.0, timers[0][0] - time.monotonic())

    def _loop(self) -> None:
        assert self._epoll is not None
        poll = self._epoll.poll
        sockets = self.sockets
        special = self._special
        ready = self._ready
        read_events = _READ_EVENTS
        write_events = _WRITE_EVENTS
        hangup_events = _HANGUP_EVENTS
        waiter: Waiter | None
        while True:
            if ready:
                for _ in range(len(ready)):
                    scheduled, value = ready.popleft()
                    scheduled.switch(value)
            if self._idle() or (self._closing and self.active == 0):
                # Spare greenlets belong to this thread: end them before a call
                # can start another thread that would find them (rule 4).
                self._end_spares()
                with self._lock:
                    if not self._calls:
                        # Torn down under the lock, so that a call from now on
                        # starts a fresh thread instead of queueing to this one.
                        self._teardown_locked()
                        return
            for fd, events in poll(self._next_timeout()):
                sock = sockets.get(fd)
                if sock is None:
                    callback = special.get(fd)
                    if callback is not None:
                        callback()
                    continue
                if events & read_events:
                    sock._readable = True
                    if events & hangup_events:
                        sock._hangup = True
                    waiter = sock._reader
                    if waiter is not None:
                        sock._reader = None
                        # Explicitly None: a bare switch() delivers ().
                        waiter.switch(None)
                if events & write_events:
                    waiter = sock._writer
                    if waiter is not None:
                        sock._writer = None
                        waiter.switch(None)
            if self._timers:
                self._fire_timers()

    # -- waiting, from a handler greenlet ------------------------------------------------

    def wait(self, sock: HubSocket, *, write: bool, timeout: float | None) -> Any:
        """Suspend the current greenlet until ``sock`` is ready or ``timeout`` passes.

        Returns None when ready, ``TIMEOUT`` when the time ran out, or what a
        closer passed.
        """
        current = greenlet.getcurrent()
        hub_greenlet = self.greenlet
        if current is hub_greenlet or hub_greenlet is None:
            raise RuntimeError(
                "a cooperative socket must be used from a handler greenlet on its hub"
            )
        if write:
            sock._writer = current
        else:
            sock._reader = current
        timer = None if timeout is None else self.call_later(timeout, self._expire, (sock, write))
        try:
            return hub_greenlet.switch()
        finally:
            if timer is not None:
                timer.cancel()
            if write:
                if sock._writer is current:
                    sock._writer = None
            elif sock._reader is current:
                sock._reader = None

    @staticmethod
    def _expire(arg: tuple[HubSocket, bool]) -> None:
        sock, write = arg
        waiter: Waiter | None = sock._writer if write else sock._reader
        if waiter is None:
            return
        if write:
            sock._writer = None
        else:
            sock._reader = None
        waiter.switch(TIMEOUT)

    def sleep(self, seconds: float) -> None:
        current = greenlet.getcurrent()
        assert self.greenlet is not None
        assert current is not self.greenlet
        if seconds <= 0:
            self.schedule(current)
        else:
            self.call_later(seconds, current.switch, None)
        self.greenlet.switch()


def _work(hub: Hub, fn: Callable[[Any, Any], None], first: Any, second: Any) -> None:
    """A handler greenlet's whole life: tasks from spawn(), spare in between.

    A function, not a method of the hub: greenlet calls a bound method through
    one more C frame (144 bytes), and a greenlet's C stack is copied out and
    back at each of its switches (measured with ``greenlet._stack_saved``: 2024
    bytes a waiting handler before, 1880 after).
    """
    spares = hub._spares
    current = greenlet.getcurrent()
    hub_greenlet = current.parent
    while True:
        fn(first, second)
        del first, second  # nothing of the last task stays alive while spare
        if len(spares) >= hub.max_spares or hub._closing:
            return
        spares.append(current)
        fn, first, second = hub_greenlet.switch()
