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

Parked connections sit in an epoll set of their own, nested in the loop's
selector. While the queue has room the loop watches that set, and takes from
it at most as many ready connections as there are free slots
(``epoll.poll(0, maxevents=room)``); while it has none, the loop watches
neither the set nor the listener, so a connection that spoke while every slot
was taken stays parked, its bytes in the kernel, rather than waiting in a list
of ours (issue 10: 1,000 such connections once queued 1,276 requests behind a
queue of 8). Workers wake the loop when they free a slot it is waiting for.

A connection with stages (``_stages``: a PROXY header, a TLS handshake) is
parked through them: each time its socket is ready the loop advances them
without blocking, and only once they are done does the connection go to the
queue, so stalled handshakes hold no worker.

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
import functools
import heapq
import itertools
import logging
import select
import selectors
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from netserve._core._connections import ServerStatistics
from netserve._core._errors import ConnectionTimeout, StageError
from netserve._core._limits import Timeouts
from netserve._core._log import RateLimitedLog, get_logger
from netserve._core._servers import BaseServer
from netserve._core._socket_servers import TCPServer, UDPServer
from netserve._core._stages import (
    BUSY,
    DONE,
    WRITE,
    Connection,
    Stage,
    advance_stages,
    check_deadline,
    has_input,
)

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

log = get_logger("pool")
limits_log = get_logger("limits")

# A request for a worker: the request, its client address, and the connection
# whose stages the loop ran (None when the worker is to run them, or none).
_Job = tuple[Any, Any, "Connection | None"]

# Mark the parked connections' epoll sets among the selector's keys.
_PARKED = "netserve-parked"
_STAGING = "netserve-staging"
# Connections whose stages are advanced per readiness of their set.
_STAGE_BATCH = 64
# Stale entries the deadline heap may hold beyond twice the parked connections.
_DEADLINE_SLACK = 64


@dataclass(frozen=True)
class PoolStatistics(ServerStatistics):
    """A snapshot of a thread pool's state, from ``statistics()``.

    The counters every server has (``ServerStatistics``), and the pool's own.
    """

    max_workers: int = 0
    #: Worker threads alive now (started on demand, up to max_workers).
    workers: int = 0
    #: Workers running a request.
    busy_workers: int = 0
    #: Requests waiting in the hand-off queue (at most queue_size).
    queued: int = 0
    #: Parked connections closed because they stayed silent past park_timeout.
    park_timeouts: int = 0


class _Pool:
    """Worker threads and the bounded hand-off queue between them and the loop.

    ``idle`` counts the workers waiting for a job that no one has woken yet:
    whoever queues a job and wakes a worker takes that worker off the count at
    once. (Counting it until it ran again let two jobs queued in a row wake the
    same worker twice and start none, leaving the second job waiting for a
    worker that a long connection might never free.)
    """

    def __init__(self, server: ThreadPoolMixIn) -> None:
        self.server = server
        self.max_workers = max(1, server.max_workers)
        self.queue_size = max(1, server.queue_size)
        self.daemon = server.daemon_threads
        self.jobs: collections.deque[_Job] = collections.deque()
        self.lock = threading.Lock()
        self.work_ready = threading.Condition(self.lock)
        self.room_ready = threading.Condition(self.lock)
        self.threads: set[threading.Thread] = set()
        self.idle = 0
        self.busy = 0
        self.closing = False
        # Set by the loop when it stops accepting for want of room; the worker
        # that makes room then wakes it.
        self.loop_wants_room = False

    def room(self) -> int:
        """Free slots in the queue now (a worker may free more at any moment)."""
        return self.queue_size - len(self.jobs)

    def offer(self, job: _Job) -> bool:
        """Queue a job if there is room; never blocks."""
        with self.lock:
            if len(self.jobs) >= self.queue_size:
                return False
            self._enqueue(job)
            return True

    def put(self, job: _Job) -> None:
        """Queue a job, waiting for room."""
        with self.lock:
            while len(self.jobs) >= self.queue_size:
                self.room_ready.wait()
            self._enqueue(job)

    def put_past_bound(self, job: _Job) -> None:
        """Queue a job whatever the queue holds: only once the server stopped
        accepting, when the number of such jobs can no longer grow."""
        with self.lock:
            self._enqueue(job)

    def _enqueue(self, job: _Job) -> None:
        if self.closing:
            raise RuntimeError("the server's thread pool is closed")
        self.jobs.append(job)
        if self.idle:
            self.idle -= 1
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
                    if not self.jobs:
                        return  # closing, and nothing is left to do
                    request, client_address, staged = self.jobs.popleft()
                    self.busy += 1
                    self.room_ready.notify()
                    wake_loop = self.loop_wants_room
                    self.loop_wants_room = False
                if wake_loop:
                    server._netserve_stop.wake()
                try:
                    server._netserve_run_request(request, client_address, staged)
                except BaseException as exc:
                    # SystemExit (or another BaseException) from a handler: as a
                    # request thread would, but the worker carries on.
                    server._netserve_escaped(exc, log)
                finally:
                    with self.lock:
                        self.busy -= 1
                # An idle worker keeps nothing of its last request alive.
                request = client_address = staged = None
        finally:
            # Only an error in the pool itself ends a worker early. A job queued
            # while this thread still counted as a worker would find no one to
            # take it: start the replacement now.
            with self.lock:
                self.threads.discard(threading.current_thread())
                if self.jobs and not self.idle and not self.closing:
                    self._start_worker_locked()

    def close(self, *, wait: bool) -> None:
        """Let the workers finish what is queued, then end; join them if ``wait``."""
        with self.lock:
            self.closing = True
            self.idle = 0
            self.work_ready.notify_all()
        while wait:
            with self.lock:
                threads = list(self.threads)
            if not threads:
                break
            for thread in threads:
                thread.join()


class _Parked:
    """A connection in the parked set: waiting for its first byte, or in its stages."""

    __slots__ = ("client_address", "conn", "deadline", "request", "stages")

    def __init__(
        self,
        request: socket.socket,
        client_address: Any,
        deadline: float | None,
        stages: list[Stage],
    ) -> None:
        self.request = request
        self.client_address = client_address
        self.deadline = deadline
        self.stages = stages
        self.conn = Connection(request, client_address, deadline) if stages else None


class ThreadPoolMixIn(_MixInBase):
    """Handle requests on a bounded pool of reused worker threads."""

    _netserve_handles_inline = False
    _netserve_fast_interrupt = True
    # Unix sockets: a stale file left by a killed server is replaced, and the
    # file is removed on close (docs/deploying.md).
    unix_replace_stale = True
    unix_remove_on_close = True
    # An IPv6 server takes IPv6 only unless asked for both (docs/addresses.md).
    dualstack_ipv6: bool | None = False
    # A datagram longer than max_packet_size is dropped and counted, never
    # cut silently (docs/limits.md).
    oversized_datagrams = "drop"

    # At most this many worker threads, started as requests need them.
    max_workers: int = 32
    # At most this many requests wait for a worker; beyond that the server stops
    # accepting and connections wait in the kernel's backlog.
    queue_size: int = 8
    # A stream connection takes a worker only once it has sent something.
    park_until_readable: bool = True
    # The limits' safe defaults (docs/limits.md states each and its reason).
    park_timeout: float | None = 30.0
    idle_timeout: float | None = 120.0
    write_timeout: float | None = 60.0
    max_connections: int | None = 1000
    max_connections_per_client: int | None = 100
    max_line_size: int | None = 65536
    client_faults_are_errors: bool = False
    daemon_threads: bool = False
    # Excess connections wait in the kernel's backlog (see above): give it room.
    request_queue_size: int = socket.SOMAXCONN
    # server_close() waits for the workers to finish what was handed to them.
    block_on_close: bool = True
    # Connections taken per readiness of the listener, never more than the
    # queue has room for (_netserve_accept_room): a batch larger than the room
    # parked connections that had already spoken (epoll calls for nothing),
    # while one at a time paid a pass of the loop per connection.
    accept_batch: int = 16

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the server's own __init__: a failed bind calls server_close().
        self._netserve_pool_state = _Pool(self)
        self._netserve_parked: dict[int, _Parked] = {}
        # Deadlines of parked connections (park_timeout, or their stages'),
        # earliest first; entries of connections gone since are skipped.
        self._netserve_deadlines: list[tuple[float, int, _Parked]] = []
        self._netserve_sequence = itertools.count()
        # Two epoll sets nested in the loop's selector: connections waiting for
        # their first byte (watched only while the queue has room), and those
        # in their stages (always watched: a stage needs no worker).
        self._netserve_park_sets: tuple[select.epoll, select.epoll] | None = None
        # Polls the first set itself: whether some parked connection has spoken.
        self._netserve_spoken_probe: select.poll | None = None
        # Connections whose stages are done, waiting for room in the queue.
        self._netserve_staged: collections.deque[_Job] = collections.deque()
        # Requests that found the queue full after all (another thread queued
        # through handle_request() in between): at most one poll's worth.
        self._netserve_overflow: collections.deque[_Job] = collections.deque()
        self._netserve_park_timeouts = 0
        # Parked connections given a handshake slot, to advance (see _tls).
        self._netserve_granted: list[int] = []
        self._netserve_selector_now: selectors.BaseSelector | None = None
        self._netserve_park_watched = False
        super().__init__(*args, **kwargs)
        self._netserve_saturation_log = RateLimitedLog(
            log, logging.WARNING, clock=self._netserve_table.clock
        )

    def _netserve_timeouts(self) -> Timeouts:
        park, idle, write, age = super()._netserve_timeouts()
        # A parked connection's park time-out is the loop's (it reaches a
        # worker once it has spoken): its socket waits with the idle one only,
        # and the kernel's time-out never has to change.
        if self.park_until_readable:
            park = idle
        return (park, idle, write, age)

    def statistics(self) -> PoolStatistics:
        """An immutable snapshot of the pool's state."""
        pool = self._netserve_pool_state
        counters = self._netserve_table.counters()
        with pool.lock:
            return PoolStatistics(
                **counters,
                parked=len(self._netserve_parked),
                accepting=self._netserve_watching,
                at_limit=self._netserve_table.at_limit(),
                max_workers=pool.max_workers,
                workers=len(pool.threads),
                busy_workers=pool.busy,
                queued=len(pool.jobs) + len(self._netserve_overflow),
                park_timeouts=self._netserve_park_timeouts,
            )

    def process_request(self, request: Any, client_address: Any) -> None:
        """Park a stream connection until it speaks (and through its stages), or
        hand the request to a worker."""
        pool = self._netserve_pool_state
        if self._netserve_selector_now is None:
            # Not inside serve_forever() (handle_request()): nobody would watch a
            # parked connection, so hand it over, waiting for room (the worker
            # runs the stages, if any).
            pool.put((request, client_address, None))
            return
        stages = (
            self._netserve_stages() if self._netserve_has_stages and _is_stream(request) else []
        )
        if stages or (self.park_until_readable and _is_stream(request) and not has_input(request)):
            self._netserve_park(request, client_address, stages)
        elif self._netserve_spoken_waiting() or not pool.offer((request, client_address, None)):
            # Parked connections spoke before this one, or the queue filled
            # during this batch of accepts: the parked set hands it over in its
            # turn (epoll's ready list is in order of readiness), as there is room.
            self._netserve_park(request, client_address, stages)

    def _netserve_spoken_waiting(self) -> bool:
        """Whether a parked connection has spoken and waits for a worker.

        A connection accepted with its bytes already there must not overtake it:
        one accepted while the loop had room for both went first, and under
        steady load the parked ones could wait for as long as new ones came.
        Polling the set's own descriptor leaves its ready list in order (taking
        events from it would move each one taken to the back)."""
        probe = self._netserve_spoken_probe
        return bool(self._netserve_parked) and probe is not None and bool(probe.poll(0))

    def _netserve_park_sets_made(self) -> tuple[select.epoll, select.epoll]:
        sets = self._netserve_park_sets
        if sets is None:
            sets = self._netserve_park_sets = (select.epoll(), select.epoll())
            self._netserve_spoken_probe = select.poll()
            self._netserve_spoken_probe.register(sets[0], select.POLLIN)
        return sets

    def _netserve_park(
        self, request: socket.socket, client_address: Any, stages: list[Stage]
    ) -> None:
        sets = self._netserve_park_sets_made()
        if stages:
            deadline = self._netserve_stage_deadline()
        elif self.park_timeout is not None:
            deadline = self._netserve_table.clock() + self.park_timeout
        else:
            deadline = None
        parked = _Parked(request, client_address, deadline, stages)
        fd = request.fileno()
        sets[parked.conn is not None].register(fd, select.EPOLLIN)
        self._netserve_parked[fd] = parked
        if deadline is not None:
            deadlines = self._netserve_deadlines
            # A connection handed over or closed leaves its entry behind until
            # its deadline (30 s by default), holding the closed socket: under
            # churn, rate x park_timeout of them. Past twice the live ones (and
            # some slack), the stale ones go: amortised O(1) a connection.
            if len(deadlines) > 2 * len(self._netserve_parked) + _DEADLINE_SLACK:
                self._netserve_drop_stale_deadlines()
            heapq.heappush(deadlines, (deadline, next(self._netserve_sequence), parked))

    def _netserve_drop_stale_deadlines(self) -> None:
        live = self._netserve_parked
        deadlines = self._netserve_deadlines
        deadlines[:] = [
            entry for entry in deadlines if live.get(entry[2].request.fileno()) is entry[2]
        ]
        heapq.heapify(deadlines)

    def _netserve_unpark(self, fd: int) -> _Parked:
        parked = self._netserve_parked.pop(fd)
        assert self._netserve_park_sets is not None
        self._netserve_park_sets[parked.conn is not None].unregister(fd)
        return parked

    def _netserve_advance(self, fd: int, parked: _Parked) -> None:
        """Run a parked connection's stages as far as they go without blocking
        (the pool's stage driver, see _stages); done, it waits for a worker."""
        conn = parked.conn
        assert conn is not None
        try:
            check_deadline(
                None if conn.deadline is None else conn.deadline - self._netserve_table.clock()
            )
            want = advance_stages(conn, parked.stages)
        except (StageError, OSError) as exc:
            self._netserve_unpark(fd)
            self._netserve_stage_failed(conn, exc)
            return
        except Exception:
            self._netserve_unpark(fd)
            self._netserve_stage_bug(conn)
            return
        if want == DONE:
            self._netserve_unpark(fd)
            self._netserve_staged.append((conn.request, conn.client_address, conn))
        elif want == BUSY:
            # Waiting for a handshake slot: unwatched (its bytes stay in the
            # kernel) until the ticket is granted, on this thread (see _tls).
            assert self._netserve_park_sets is not None
            self._netserve_park_sets[1].modify(fd, 0)
            conn.ticket.wake = functools.partial(self._netserve_granted.append, fd)
        else:
            assert self._netserve_park_sets is not None
            events = select.EPOLLOUT if want == WRITE else select.EPOLLIN
            self._netserve_park_sets[1].modify(fd, events)

    def _netserve_parked_count(self) -> int:
        return len(self._netserve_parked) + len(self._netserve_staged)

    # -- the serving loop's hooks ------------------------------------------------------

    def _netserve_selector(self) -> selectors.BaseSelector:
        # The loop watches few descriptors, but epoll nests the parked sets.
        return selectors.DefaultSelector()

    def _netserve_loop_started(self, selector: selectors.BaseSelector) -> None:
        self._netserve_selector_now = selector
        self._netserve_park_watched = False
        # Stages go on whether or not a worker is free: always watched.
        selector.register(self._netserve_park_sets_made()[1], selectors.EVENT_READ, _STAGING)

    def _netserve_loop_stopped(self, selector: selectors.BaseSelector) -> None:
        # Parked connections stay parked; the next loop watches them again.
        sets = self._netserve_park_sets
        assert sets is not None
        selector.unregister(sets[1])
        if self._netserve_park_watched:
            selector.unregister(sets[0])
            self._netserve_park_watched = False
        self._netserve_selector_now = None

    def _netserve_ready(self, key: selectors.SelectorKey) -> None:
        sets = self._netserve_park_sets
        assert sets is not None
        if key.data is _STAGING:
            for fd, _ in sets[1].poll(0, _STAGE_BATCH):
                self._netserve_advance(fd, self._netserve_parked[fd])
            return
        # Parked connections spoke (or closed): as many as there is room for
        # are taken; the others stay ready in the set, their bytes in the kernel.
        pool = self._netserve_pool_state
        room = pool.room()
        if room <= 0:
            return
        for fd, _ in sets[0].poll(0, room):
            parked = self._netserve_unpark(fd)
            job = (parked.request, parked.client_address, None)
            if not pool.offer(job):
                self._netserve_overflow.append(job)

    def _netserve_accept_room(self, batch: int) -> int:
        # The loop watches the listener only while the queue has room (below).
        return max(1, min(batch, self._netserve_pool_state.room()))

    def _netserve_accept_allowed(self) -> bool:
        # Called by the loop before each wait, after _netserve_before_wait().
        if self._netserve_waiting() or self._netserve_pool_state.room() <= 0:
            return False
        return super()._netserve_accept_allowed()

    def _netserve_waiting(self) -> bool:
        return bool(self._netserve_overflow or self._netserve_staged)

    def _netserve_before_wait(
        self, selector: selectors.BaseSelector, poll_interval: float | None
    ) -> float | None:
        self._netserve_advance_granted()
        pool = self._netserve_pool_state
        # Requests that found the queue full go first, then connections whose
        # stages are done (both already accepted, both waiting for a worker).
        for waiting in (self._netserve_overflow, self._netserve_staged):
            while waiting and pool.offer(waiting[0]):
                waiting.popleft()
        room = not self._netserve_waiting() and pool.room() > 0
        if not room:
            with pool.lock:
                pool.loop_wants_room = True
            # Look again now that the flag is set: a worker may have made room in
            # between, and it would not have woken us.
            room = not self._netserve_waiting() and pool.room() > 0
            if not room:
                self._netserve_saturated()
        if room != self._netserve_park_watched:
            assert self._netserve_park_sets is not None
            if room:
                selector.register(self._netserve_park_sets[0], selectors.EVENT_READ, _PARKED)
            else:
                selector.unregister(self._netserve_park_sets[0])
            self._netserve_park_watched = room
        wait = self._netserve_expire_parked(poll_interval)
        if self._netserve_granted:  # slots freed by expiries: go on at once
            self._netserve_advance_granted()
            return 0.0
        return wait

    def _netserve_advance_granted(self) -> None:
        granted = self._netserve_granted
        while granted:
            fd = granted.pop(0)
            parked = self._netserve_parked.get(fd)
            if parked is not None and parked.conn is not None:
                self._netserve_advance(fd, parked)

    def _netserve_saturated(self) -> None:
        """Every worker is busy and the queue is full: new connections wait in the
        kernel's backlog, and a user should hear of it (issue 11)."""
        pool = self._netserve_pool_state
        if pool.busy < pool.max_workers:
            return  # a worker woken for the queue's head has not taken it yet
        self._netserve_saturation_log.event(
            "pool saturated: %d of %d workers busy, %d queued (queue_size %d), %d parked; "
            "new connections wait in the backlog",
            pool.busy,
            pool.max_workers,
            len(pool.jobs),
            pool.queue_size,
            len(self._netserve_parked),
        )

    def _netserve_expire_parked(self, poll_interval: float | None) -> float | None:
        deadlines = self._netserve_deadlines
        table = self._netserve_table
        now = table.clock()
        while deadlines and deadlines[0][0] <= now:
            parked = heapq.heappop(deadlines)[2]
            fd = parked.request.fileno()
            if self._netserve_parked.get(fd) is not parked:
                continue  # handed over or closed since
            if parked.conn is not None:
                self._netserve_unpark(fd)
                timed_out = ConnectionTimeout(
                    "the connection's stages did not finish in time", "stage_timeout"
                )
                self._netserve_stage_failed(parked.conn, timed_out)
            elif not has_input(parked.request):
                # Silent past park_timeout. (One that spoke while every worker
                # was busy is not silent: it waits for a worker, no deadline.)
                self._netserve_unpark(fd)
                self._netserve_park_timeouts += 1
                limits_log.debug(
                    "connection from %s closed: it sent nothing in time (park_timeout)",
                    parked.client_address,
                )
                table.time_out(parked.request)
                self.shutdown_request(parked.request)
        if not deadlines:
            return poll_interval
        until_next = max(0.0, deadlines[0][0] - now)
        return until_next if poll_interval is None else min(poll_interval, until_next)

    def server_close(self) -> None:
        """Close the listener and parked connections; let the workers finish.

        Requests already handed to the pool are handled; with ``block_on_close``
        this waits for them.
        """
        super().server_close()
        self._netserve_close_parked()
        self._netserve_pool_state.close(wait=self.block_on_close)

    def _netserve_close_parked(self) -> None:
        """Close the connections that sent nothing, or are still in their stages;
        hand to the workers those that spoke, or finished their stages, while
        every worker was busy (they are requests, not idle connections)."""
        table = self._netserve_table
        pool = self._netserve_pool_state
        for fd, parked in list(self._netserve_parked.items()):
            self._netserve_unpark(fd)
            if parked.conn is None and has_input(parked.request):
                self._netserve_overflow.append((parked.request, parked.client_address, None))
                continue
            table.refuse(parked.request)
            if parked.conn is not None and parked.conn.holder is not None:
                parked.conn.holder.abandon(parked.conn, None)
            self.shutdown_request(parked.request)
            if parked.conn is not None and parked.conn.request is not parked.request:
                self.shutdown_request(parked.conn.request)
        self._netserve_deadlines.clear()
        # Past accepting, the queue may take them all: nothing can add more.
        for waiting in (self._netserve_overflow, self._netserve_staged):
            while waiting:
                pool.put_past_bound(waiting.popleft())
        if self._netserve_park_sets is not None:
            for park_set in self._netserve_park_sets:
                park_set.close()
            self._netserve_park_sets = None
            self._netserve_spoken_probe = None

    def abort_connections(self) -> None:
        """Close the requests still queued, and shut down those in progress."""
        pool = self._netserve_pool_state
        with pool.lock:
            queued = list(pool.jobs)
            pool.jobs.clear()
            pool.room_ready.notify_all()
            wake_loop = pool.loop_wants_room
            pool.loop_wants_room = False
        if wake_loop:
            # The loop stopped accepting for want of room: there is room now.
            self._netserve_stop.wake()
        for request, _, staged in queued:
            self._netserve_table.refuse(request if staged is None else staged.sock)
            self.shutdown_request(request)
            if staged is not None and staged.sock is not request:
                self.shutdown_request(staged.sock)
        super().abort_connections()


# Plain integers, worked out once: socket's flags and kinds are enums, and
# combining or converting them runs Python code (an enum call, about a
# microsecond) on every connection.
_STREAM = int(socket.SOCK_STREAM)
_kind_of = _socket.socket.type.__get__  # socket.type, without the enum


def _is_stream(request: Any) -> bool:
    return isinstance(request, socket.socket) and _kind_of(request) == _STREAM


class ThreadPoolTCPServer(ThreadPoolMixIn, TCPServer):
    """A TCP server on a bounded thread pool."""


class ThreadPoolUDPServer(ThreadPoolMixIn, UDPServer):
    """A UDP server on a bounded thread pool."""


if hasattr(socket, "AF_UNIX"):
    from netserve._core._socket_servers import UnixDatagramServer, UnixStreamServer

    __all__ += ["ThreadPoolUnixDatagramServer", "ThreadPoolUnixStreamServer"]

    class ThreadPoolUnixStreamServer(ThreadPoolMixIn, UnixStreamServer):
        """A Unix stream server on a bounded thread pool."""

    class ThreadPoolUnixDatagramServer(ThreadPoolMixIn, UnixDatagramServer):
        """A Unix datagram server on a bounded thread pool."""
