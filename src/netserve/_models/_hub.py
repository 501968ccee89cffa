"""The hub kernel: an epoll loop on its own thread, timers, spawn, waits (issue 3, part 2).

The layers above talk to it only through its interface (``Hub``'s public
names, and the four ``hub_*`` attributes of a registered socket, see
``HubSocket``): the cooperative socket (``_greensocket``), its files
(``_greenfile``) and the server mix-in (``_green``).

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
trying a recv that would fail (a failing recv and a re-registration per wait
cost more system calls than a callback server makes). With edge triggering,
any data that arrives after a read produces a new event, so no wake-up is lost.

Rule 3: the loop switches into a waiting greenlet as soon as its event is seen,
and the greenlet switches back when it next waits or ends; greenlets are
children of the hub's greenlet, so a finished one returns there too.

Rule 4: greenlets are reused. A greenlet whose work is done waits in a short
list of spares for the next ``spawn()``, instead of ending: on CPython 3.11 a
fresh greenlet maps a 16 KiB frame stack of its own (mmap, page faults,
munmap), which shows under connection churn. A reused greenlet starts each
task in an empty ``contextvars`` context, as a new one would. Spares belong to
the thread that made them and end with it; a thread started after it gets a
list of its own.

Rule 5: time is the hub's ``clock`` (``time.monotonic`` unless given): timers
and the deadlines of waits are times on it, and the loop's epoll timeout is the
clock's distance to the next timer, in seconds. A test may pass a clock it
advances itself, then wake the loop (any ``call_soon_threadsafe()``) so that
the timers now due fire.

Rule 6: the limits netserve enforces on a connection's waits (issue 11: the
first byte, idle reads, writes that make no progress, the connection's age)
cost no timer per wait. An untimed wait only notes when it began, as the
hub's ``tick``; a sweep, every ``sweep_period`` seconds while greenlets are
alive, counts one more tick and wakes every waiter whose wait (or socket) has
lasted its limit, with ``ConnectionTimeout``. A limit of L seconds is
``ceil(L / sweep_period) + 1`` ticks: since ticks are at least a period apart,
a wait never expires before its limit, and at most a period after it. A wait
with a deadline of its own (the socket's timeout, set by the user) is bounded
by that deadline and the age limit only. Limits belong to a socket
(``HubSocket.hub_limits``, made by ``limits()``), so one server's policy does
not leak into another's.

Rule 7: the loop counts its passes (``beat``: odd while it waits in epoll).
That count is all the stall watchdog (``_watchdog``) needs to notice a handler
that holds the thread; nothing is counted per switch.
"""

from __future__ import annotations

import collections
import contextvars
import errno
import heapq
import itertools
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import greenlet
from greenlet import getcurrent

from netserve._core._errors import ConnectionTimeout
from netserve._core._log import RateLimitedLog
from netserve._core._loop import drain, poke
from netserve._models._tothread import ThreadRunner
from netserve._models._watchdog import StallWatchdog

__all__ = ["Hub", "HubSocket", "Limits", "Timer", "Waiter", "current_hub"]

log = logging.getLogger("netserve.hub")

_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
# The peer has closed (or the connection failed): reads return at once from now
# on, and no further edge will say so, so "readable" becomes permanent.
_HANGUP_EVENTS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# Registered once per socket (rule 2).
SOCKET_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET

# What a waiting greenlet is switched back with, besides None (its edge came):
# its deadline passed, or its socket was closed under it (notify_closing()).
_TIMEOUT = object()
_CLOSED = object()
# Rebuild the timer heap once this many cancelled timers sit in it and they are
# the majority: a per-read timeout cancels a timer on every read.
_COMPACT_AFTER = 512
# The start of a wait that has a deadline of its own (rule 6): later than any
# tick, so that no wait limit counts it as overdue.
_TIMED = 1 << 62
# The sweep's period as a share of the smallest limit (rule 6): a limit is kept
# to within an eighth of itself; and its bounds. Below 5 ms the sweep would
# cost more than it saves; above 1 s a default limit would be kept loosely for
# nothing (a sweep over 10,000 sockets takes a few milliseconds).
_SWEEPS_PER_LIMIT = 8
_MIN_SWEEP_PERIOD = 0.005
_MAX_SWEEP_PERIOD = 1.0

_local = threading.local()
_get_ident = threading.get_ident


def current_hub() -> Hub | None:
    """The hub whose thread this is, or None."""
    hub: Hub | None = getattr(_local, "hub", None)
    return hub


def _woken_by(outcome: object) -> BaseException:
    """The error for a wait that did not end with its edge."""
    if type(outcome) is Expiry:
        return ConnectionTimeout(outcome.message, outcome.setting)
    if outcome is _TIMEOUT:
        return TimeoutError("timed out")
    if outcome is _CLOSED:
        return OSError(errno.EBADF, "the socket was closed while waiting on it")
    # switch() to the running greenlet itself returns (): the hub's own greenlet.
    return RuntimeError("a cooperative socket must be used from a handler greenlet on its hub")


class Waiter(Protocol):
    """What the loop switches to when a socket becomes ready: a greenlet, or a
    starter that creates one (a parked connection)."""

    def switch(self, *args: Any) -> Any: ...


class Expiry:
    """What the sweep wakes a waiter with when one of its limits ran out."""

    __slots__ = ("message", "setting")

    def __init__(self, message: str, setting: str) -> None:
        self.message = message
        self.setting = setting  # the server attribute that set the limit


class Limits:
    """A socket's wait limits (rule 6), in ticks of its hub's sweep (0: none).

    ``first``: a read wait before the peer's first byte (the park time-out);
    ``idle``: any later read wait; ``write``: a write wait (no progress);
    ``age``: every wait, counted from the socket's registration. Made by
    ``Hub.limits()``; one object is shared by every socket of a server.
    """

    __slots__ = (
        "age",
        "age_expiry",
        "first",
        "first_expiry",
        "idle",
        "idle_expiry",
        "write",
        "write_expiry",
    )

    def __init__(
        self,
        period: float,
        first: float | None,
        idle: float | None,
        write: float | None,
        age: float | None,
    ) -> None:
        self.first = _ticks(first, period)
        self.idle = _ticks(idle, period)
        self.write = _ticks(write, period)
        self.age = _ticks(age, period)
        self.first_expiry = Expiry(
            f"the peer sent nothing in {first} s after connecting", "park_timeout"
        )
        self.idle_expiry = Expiry(f"the peer sent nothing for {idle} s", "idle_timeout")
        self.write_expiry = Expiry(f"the peer read nothing for {write} s", "write_timeout")
        self.age_expiry = Expiry(
            f"the connection reached its maximum age ({age} s)", "max_connection_age"
        )


def _ticks(seconds: float | None, period: float) -> int:
    if seconds is None:
        return 0
    return math.ceil(seconds / period) + 1


class HubSocket(Protocol):
    """A registered socket as the loop sees it: the interface between the kernel
    and the cooperative socket (and its files).

    These attributes carry no leading underscore because they are that
    interface; handler code has no business with them.

    ``hub_readable``: the readable hint of rule 2. The loop sets it to True on
    every read edge; a reader clears it (False) after a short read and then
    waits for the next edge. Any true value means "try the read first" (the
    socket keeps a value of its own there for a peek, see ``_greensocket``).
    ``hub_hangup``: set by the loop once the peer has hung up (or the
    connection failed); from then on no edge will come.
    ``hub_reader``, ``hub_writer``: what to switch to (with None) on the next
    read or write edge; the loop clears the field before it switches.

    The wait limits (rule 6): ``hub_limits`` (None: no limits), ``hub_born``
    (the tick of its accept), ``hub_read_since``/``hub_write_since`` (the tick
    at which the current wait began; written by the waits), ``hub_fresh``
    (True until the peer's first byte: the socket clears it as it reads).
    A waiter that is not a greenlet (a parked connection's starter) is held to
    the first-byte and age limits, and switched with the ``Expiry``.
    """

    hub_readable: int
    hub_hangup: bool
    hub_reader: Waiter | None
    hub_writer: Waiter | None
    hub_limits: Limits | None
    hub_born: int
    hub_read_since: int
    hub_write_since: int
    hub_fresh: bool


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
    """An epoll loop on its own thread, switching between handler greenlets.

    The interface, by use. Life cycle, from any thread: ``call_soon_threadsafe``,
    ``run_sync``, ``close``, ``thread``, ``on_hub_thread``. On the hub's thread:
    ``spawn``, ``schedule``, ``call_at``/``call_later`` (``Timer``), ``sleep``,
    ``hold``/``release`` and ``active`` (what keeps the thread alive),
    ``watch``/``unwatch`` (level-triggered callbacks: a listener); sockets:
    ``register``, ``forget``, ``notify_closing`` (any thread), and the one wait,
    ``wait_readable``/``wait_writable`` with a deadline on ``clock``, within
    the socket's ``limits()`` (rule 6); ``run_in_thread`` (a blocking call on
    one of at most ``thread_workers`` threads). ``stall_warning``: the
    watchdog's threshold in seconds (None: no watchdog; rule 7).
    ``greenlet`` is the loop's greenlet while the thread runs (None otherwise):
    a waiting greenlet switches to it.
    """

    def __init__(
        self,
        name: str = "netserve-hub",
        *,
        daemon: bool = False,
        max_spares: int = 128,
        clock: Callable[[], float] = time.monotonic,
        stall_warning: float | None = None,
        thread_workers: int = 16,
    ) -> None:
        self.name = name
        self.daemon = daemon
        # Rule 5: timers and deadlines are times on this clock, in seconds.
        self.clock = clock
        # Rule 6: the sweep (set by the first limits(); None: no sweep).
        self.tick = 0
        self.sweep_period: float | None = None
        self._sweep_at = 0.0
        self._now = 0.0  # the clock as the last pass (while sweeping) began
        # Rule 7: the loop's passes, and the watchdog of the running thread.
        self.beat = 0
        self.stall_warning = stall_warning
        self.watchdog_asleep = False
        self._watchdog: StallWatchdog | None = None
        self._watchdogs: list[threading.Thread] = []
        self._stall_log = RateLimitedLog(log, logging.WARNING)
        # Blocking calls (run_in_thread), made on first use.
        self.thread_workers = thread_workers
        self._runner: ThreadRunner | None = None
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
        # Finished greenlets waiting for the next spawn(): the running thread's
        # (rule 4); each thread gets a fresh list.
        self.max_spares = max_spares
        self._spares: list[greenlet.greenlet] = []

    # -- life cycle ------------------------------------------------------------------

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def on_hub_thread(self) -> bool:
        return self._ident == _get_ident()

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the hub's thread, starting the thread if needed.

        A call is never lost: one made while the thread is ending either
        reaches it before it decides to end (it then carries on), or finds it
        gone and starts another. Raises ``OSError`` (a full descriptor table,
        say) if the thread has to start and cannot; ``fn`` is then not queued.
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
        """Refuse new work and wait for the thread to end (on its own, once idle),
        then for the threads of ``run_in_thread`` and the watchdog."""
        with self._lock:
            self._closing = True
            threads = [t for t in (self._thread, self._ended_thread) if t is not None]
            if self._thread is not None and self._wake_w is not None:
                poke(self._wake_w)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()
        if self._runner is not None:
            self._runner.close()
        with self._lock:
            watchdogs, self._watchdogs = self._watchdogs, []
        for thread in watchdogs:
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
            self._spares = []
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
        if self.stall_warning is not None:
            self._start_watchdog(self._ident)
        # This thread's spares: once the loop has torn down, the next thread
        # (started by a call meanwhile) may already fill self._spares with its own.
        spares = self._spares
        try:
            self._loop()
        finally:
            _local.hub = None
            if self._thread is threading.current_thread():
                # The loop itself failed: a normal end tore down already (and
                # ended the spares first).
                _end_spares(spares)
                with self._lock:
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
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def _start_watchdog(self, ident: int) -> None:
        watchdog = StallWatchdog(self, ident, self._stall_log)
        with self._lock:
            # Those of ended runs are joined here or by close().
            self._watchdogs = [t for t in self._watchdogs if t.is_alive()]
            self._watchdogs.append(watchdog.thread)
        try:
            watchdog.start()
        except RuntimeError:  # no thread to be had: serve without a watchdog
            with self._lock:
                self._watchdogs.remove(watchdog.thread)
            log.warning("the hub's stall watchdog could not start", exc_info=True)
            return
        self._watchdog = watchdog

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

    # -- scheduling on the hub's thread ------------------------------------------------

    def register(self, fd: int, sock: HubSocket) -> None:
        """Watch ``sock`` from now on: registered with epoll once, for good (rule 2)."""
        assert self._epoll is not None
        self._epoll.register(fd, SOCKET_EVENTS)
        self.sockets[fd] = sock

    def forget(self, fd: int, sock: HubSocket) -> None:
        """Stop delivering ``fd``'s events to ``sock`` (it is closing, or detached)."""
        # No EPOLL_CTL_DEL: closing the descriptor removes it from the epoll set,
        # and the system call would be one more per connection.
        if self.sockets.get(fd) is sock:
            del self.sockets[fd]

    def notify_closing(self, sock: HubSocket) -> None:
        """Wake whatever waits on ``sock``, which is closing: from any thread.

        A closed descriptor has left the epoll set, so no edge would ever wake
        its waiters: a greenlet's wait raises ``OSError(EBADF)`` instead. A
        waiter that is not a greenlet (a parked connection's starter) is
        dropped. Off the hub's thread this happens on the hub, soon.
        """
        if self.on_hub_thread():
            self._wake_closed(sock)
        else:
            self.call_soon_threadsafe(lambda: self._wake_closed(sock))

    def _wake_closed(self, sock: HubSocket) -> None:
        reader, writer = sock.hub_reader, sock.hub_writer
        sock.hub_reader = sock.hub_writer = None
        for waiter in (reader, writer):
            if isinstance(waiter, greenlet.greenlet):
                self.schedule(waiter, _CLOSED)

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
        """Switch to ``waiter`` with ``value`` on the loop's next pass (in order)."""
        self._ready.append((waiter, value))

    def call_at(self, deadline: float, callback: Callable[[Any], None], arg: Any) -> Timer:
        """Call ``callback(arg)`` on the loop once ``clock()`` reaches ``deadline``.

        Timers fire in deadline order, those with the same deadline in the
        order they were made.
        """
        timer = Timer(self, callback, arg)
        heapq.heappush(self._timers, (deadline, next(self._sequence), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[Any], None], arg: Any) -> Timer:
        """``call_at(clock() + delay, ...)``."""
        return self.call_at(self.clock() + delay, callback, arg)

    def _fire_timers(self) -> None:
        timers = self._timers
        now = self.clock()
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
        sweeping = self.active and self.sweep_period is not None
        if timers:
            due = timers[0][0]
            if sweeping and self._sweep_at < due:
                due = self._sweep_at
            timeout = due - self.clock()
        elif sweeping:
            # From the time the last pass began, without asking the clock: the
            # sweep may come late by a pass, never early (rule 6).
            timeout = self._sweep_at - self._now
        else:
            return -1.0
        return timeout if timeout > 0.0 else 0.0

    # -- wait limits (rule 6) ------------------------------------------------------------

    def limits(
        self,
        *,
        first: float | None = None,
        idle: float | None = None,
        write: float | None = None,
        age: float | None = None,
    ) -> Limits | None:
        """The wait limits for a socket to carry (``hub_limits``), in seconds
        (None: no such limit); None if there are none at all.

        The first call sets the sweep's period from its smallest limit; later
        ones keep it (a smaller one lowers it only while no greenlet is alive,
        since the sockets alive carry limits counted in the old period).
        """
        given = [t for t in (first, idle, write, age) if t is not None]
        if not given:
            return None
        wanted = min(_MAX_SWEEP_PERIOD, max(_MIN_SWEEP_PERIOD, min(given) / _SWEEPS_PER_LIMIT))
        if self.sweep_period is None or (wanted < self.sweep_period and not self.active):
            self.sweep_period = wanted
        return Limits(self.sweep_period, first, idle, write, age)

    def _sweep(self, now: float) -> None:
        """Wake, with its Expiry, every waiter whose limit ran out (rule 6)."""
        assert self.sweep_period is not None
        self.tick = tick = self.tick + 1
        self._sweep_at = now + self.sweep_period
        # Scheduled, not switched to: a greenlet switched to here could close a
        # socket, and the loop below walks the sockets.
        schedule = self._ready.append
        outcome: Expiry | None
        for sock in self.sockets.values():
            limits = sock.hub_limits
            if limits is None:
                continue
            over_age = limits.age and tick - sock.hub_born >= limits.age
            waiter = sock.hub_reader
            if waiter is not None:
                waited = tick - sock.hub_read_since
                outcome = None
                if over_age:
                    outcome = limits.age_expiry
                elif sock.hub_fresh or not isinstance(waiter, greenlet.greenlet):
                    if limits.first and waited >= limits.first:
                        outcome = limits.first_expiry
                elif limits.idle and waited >= limits.idle:
                    outcome = limits.idle_expiry
                if outcome is not None:
                    sock.hub_reader = None
                    schedule((waiter, outcome))
            waiter = sock.hub_writer
            if waiter is not None:
                if over_age:
                    outcome = limits.age_expiry
                elif limits.write and tick - sock.hub_write_since >= limits.write:
                    outcome = limits.write_expiry
                else:
                    continue
                sock.hub_writer = None
                schedule((waiter, outcome))

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
                # can start another thread (rule 4).
                _end_spares(self._spares)
                with self._lock:
                    if not self._calls:
                        # Torn down under the lock, so that a call from now on
                        # starts a fresh thread instead of queueing to this one.
                        self._teardown_locked()
                        return
            self.beat += 1  # odd: in the poll (rule 7)
            polled = poll(self._next_timeout())
            self.beat += 1
            if self.watchdog_asleep:
                self.watchdog_asleep = False
                self._wake_watchdog()
            for fd, events in polled:
                sock = sockets.get(fd)
                if sock is None:
                    callback = special.get(fd)
                    if callback is not None:
                        callback()
                    continue
                if events & read_events:
                    sock.hub_readable = True
                    if events & hangup_events:
                        sock.hub_hangup = True
                    waiter = sock.hub_reader
                    if waiter is not None:
                        sock.hub_reader = None
                        # Explicitly None: a bare switch() delivers ().
                        waiter.switch(None)
                if events & write_events:
                    waiter = sock.hub_writer
                    if waiter is not None:
                        sock.hub_writer = None
                        waiter.switch(None)
            if self._timers:
                self._fire_timers()
            if self.active and self.sweep_period is not None:
                now = self._now = self.clock()
                if now >= self._sweep_at:
                    self._sweep(now)

    def _wake_watchdog(self) -> None:
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.wake()

    # -- waiting, from a handler greenlet ------------------------------------------------

    def wait_readable(self, sock: HubSocket, deadline: float | None = None) -> None:
        """Suspend the calling greenlet until the next read edge on ``sock``.

        The kernel's one wait (with ``wait_writable``): from a handler greenlet
        on the hub's thread, for a registered socket. ``deadline`` is a time on
        ``clock`` (None: no limit). Returns when the edge comes; raises
        ``TimeoutError`` once the deadline has passed, ``OSError(EBADF)`` if the
        socket is closed meanwhile (``notify_closing``). It waits for an edge
        even if data is queued: the caller looks at ``hub_readable`` first.
        """
        current = getcurrent()
        hub_greenlet = self.greenlet
        if deadline is None and hub_greenlet is not None:
            # The common case (an untimed read, rfile's), without a timer; its
            # limits are the sweep's (rule 6).
            sock.hub_reader = current
            sock.hub_read_since = self.tick
            try:
                outcome = hub_greenlet.switch()
            finally:
                sock.hub_reader = None
        else:
            outcome = self._wait_until(sock, False, current, deadline)
        if outcome is not None:
            # (From the hub's own greenlet, switch() returns (): RuntimeError.)
            raise _woken_by(outcome)

    def wait_writable(self, sock: HubSocket, deadline: float | None = None) -> None:
        """As ``wait_readable``, for the next write edge."""
        current = getcurrent()
        hub_greenlet = self.greenlet
        if deadline is None and hub_greenlet is not None:
            sock.hub_writer = current
            sock.hub_write_since = self.tick
            try:
                outcome = hub_greenlet.switch()
            finally:
                sock.hub_writer = None
        else:
            outcome = self._wait_until(sock, True, current, deadline)
        if outcome is not None:
            raise _woken_by(outcome)

    def _wait_until(
        self, sock: HubSocket, write: bool, current: greenlet.greenlet, deadline: float | None
    ) -> Any:
        hub_greenlet = self.greenlet
        if hub_greenlet is None:
            raise RuntimeError(
                "a cooperative socket must be used from a handler greenlet on its hub"
            )
        # Held to its own deadline and the age limit only (rule 6).
        if write:
            sock.hub_writer = current
            sock.hub_write_since = _TIMED
        else:
            sock.hub_reader = current
            sock.hub_read_since = _TIMED
        timer = None if deadline is None else self.call_at(deadline, self._expire, (sock, write))
        try:
            return hub_greenlet.switch()
        finally:
            if timer is not None:
                timer.cancel()
            if write:
                if sock.hub_writer is current:
                    sock.hub_writer = None
            elif sock.hub_reader is current:
                sock.hub_reader = None

    @staticmethod
    def _expire(arg: tuple[HubSocket, bool]) -> None:
        sock, write = arg
        waiter: Waiter | None = sock.hub_writer if write else sock.hub_reader
        if waiter is None:
            return
        if write:
            sock.hub_writer = None
        else:
            sock.hub_reader = None
        waiter.switch(_TIMEOUT)

    def sleep(self, seconds: float) -> None:
        """Suspend the calling handler greenlet for ``seconds`` on ``clock``
        (0 or less: until the loop's next pass, after what is ready now)."""
        current = greenlet.getcurrent()
        assert self.greenlet is not None
        assert current is not self.greenlet
        # A timer even for 0 (it fires on the next pass), so that a greenlet
        # ended while it sleeps (GreenletExit) leaves no wake-up behind.
        timer = self.call_at(self.clock() + max(0.0, seconds), current.switch, None)
        try:
            self.greenlet.switch()
        finally:
            timer.cancel()

    # -- blocking calls, from a handler greenlet -------------------------------------------

    def run_in_thread(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on a worker thread, in a copy of the calling
        greenlet's context, while the hub serves the others; return its result
        or raise its exception. From a handler greenlet on the hub's thread.

        At most ``thread_workers`` calls run at once; more wait their turn. The
        greenlet counts as active meanwhile, so the hub's thread (and
        ``close()``) waits for it. A greenlet ended while it waits (GreenletExit)
        leaves the call to finish on its own; its outcome is dropped.
        """
        current = getcurrent()
        hub_greenlet = self.greenlet
        if hub_greenlet is None or current is hub_greenlet:
            raise RuntimeError("run_in_thread() must be called from a greenlet on the hub")
        runner = self._runner
        if runner is None:
            runner = self._runner = ThreadRunner(self.thread_workers, f"{self.name}-to-thread")
        call = _ThreadCall(self, current, fn, args, kwargs)
        runner.submit(call.run)
        self.active += 1
        try:
            # Only the call's completion switches back with the call itself.
            while hub_greenlet.switch() is not call:
                pass
        finally:
            self.active -= 1
            call.waiter = None
        return call.outcome()

    def _post(self, fn: Callable[[], None]) -> None:
        """``call_soon_threadsafe`` for the kernel's own threads: accepted while
        the thread runs, closing or not; dropped if it has ended (a greenlet
        waiting for it would have kept it alive, so nobody waits)."""
        with self._lock:
            if self._thread is None or self._wake_w is None:
                return
            self._calls.append(fn)
            poke(self._wake_w)


class _ThreadCall:
    """One ``run_in_thread()`` call: run on a worker, completed on the hub."""

    __slots__ = ("args", "context", "error", "fn", "hub", "kwargs", "result", "waiter")

    def __init__(
        self, hub: Hub, waiter: greenlet.greenlet, fn: Callable[..., Any], args: Any, kwargs: Any
    ) -> None:
        self.hub = hub
        self.waiter: greenlet.greenlet | None = waiter
        self.context = contextvars.copy_context()  # the greenlet's, as it calls
        self.fn: Callable[..., Any] | None = fn
        self.args = args
        self.kwargs = kwargs
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        """On a worker thread."""
        if self.waiter is not None:  # not abandoned while it was queued
            assert self.fn is not None
            try:
                self.result = self.context.run(self.fn, *self.args, **self.kwargs)
            except BaseException as exc:  # re-raised in the greenlet
                self.error = exc
        self.fn = self.args = self.kwargs = None
        self.hub._post(self._complete)

    def _complete(self) -> None:
        """On the hub's thread."""
        waiter = self.waiter
        if waiter is not None:
            self.hub.schedule(waiter, self)

    def outcome(self) -> Any:
        error = self.error
        if error is not None:
            self.error = None  # no cycle through the traceback
            try:
                raise error
            finally:
                del error
        result = self.result
        self.result = None
        return result


def _end_spares(spares: list[greenlet.greenlet]) -> None:
    """End a thread's spare greenlets, from that thread."""
    while spares:
        # GreenletExit at the switch() in _work(): the greenlet ends.
        spares.pop().throw()


def _work(hub: Hub, fn: Callable[[Any, Any], None], first: Any, second: Any) -> None:
    """A handler greenlet's whole life: tasks from spawn(), spare in between.

    A function, not a method of the hub: greenlet calls a bound method through
    one more C frame, and a greenlet's C stack is copied out and back at each
    of its switches.
    """
    # This thread's list (rule 4): the greenlet is made on the hub's thread.
    spares = hub._spares
    current = greenlet.getcurrent()
    hub_greenlet = current.parent
    while True:
        fn(first, second)
        del first, second  # nothing of the last task stays alive while spare
        if len(spares) >= hub.max_spares or hub._closing:
            return
        spares.append(current)
        task = hub_greenlet.switch()
        # Only spawn() passes a task. A wake-up meant for the task that just
        # ended (queued before it was ended from outside) is not one: wait on.
        while type(task) is not tuple:
            task = hub_greenlet.switch()
        fn, first, second = task
