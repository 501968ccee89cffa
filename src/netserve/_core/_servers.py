"""The template-method core: BaseServer (the servers for each socket family
are ``_socket_servers``'s).

Theory of operation
-------------------
The public contract is the stdlib's chain of hooks, and user code overrides any
link of it, so every step below goes through ``self.<hook>``:

    handle_request / serve_forever
      -> get_request -> verify_request -> process_request    (_accept: the one
                                                             accept routine)
           -> the stages, verify_client, then finish_request (RequestHandlerClass(...))
           -> shutdown_request -> close_request              (the one runner,
                                                 _netserve_run_request)
      errors: Exception -> handle_error, then shutdown_request;
              any other BaseException -> shutdown_request, then re-raised

Each concurrency mix-in changes only where ``process_request`` sends the
request: the runner then runs on a thread, in a child, on a pool worker or in
a greenlet (docs/architecture.md). The connection table (``_connections``)
counts every request for ``statistics()`` and knows which are still open, for
``close()``, ``wait_closed()`` and ``abort_connections()``.

Where netserve differs on purpose (each listed in the README):

* ``serve_forever()`` also watches a wake-up socketpair (see ``_loop``), so
  ``shutdown()`` returns at once and never deadlocks on the serving thread.
* ``verify_request()`` runs inside the same error guard as ``process_request()``:
  an exception there reaches ``handle_error()`` and the request is still shut
  down, where the stdlib would let it escape ``serve_forever()`` and leak the
  request's socket.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import selectors
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Self

from netserve._core._accept import Acceptor
from netserve._core._access import run_logged
from netserve._core._connections import (
    FAILED,
    HANDLED,
    REFUSED,
    STAGE_FAILED,
    TIMED_OUT,
    ConnectionTable,
    ServerStatistics,
    outcome_base,
)
from netserve._core._connections import timed_out as timeout_outcome
from netserve._core._errors import ConfigurationError, ConnectionTimeout, StageError
from netserve._core._limits import Timeouts, discard_unsent, fault_of
from netserve._core._log import RateLimitedLog, get_logger
from netserve._core._loop import StopControl, drain
from netserve._core._stages import Connection, Stage, check_deadline, run_stages
from netserve._edges._proxy import ProxyPolicy, proxy_policy
from netserve._edges._tls import TLSPolicy, tls_policy

if TYPE_CHECKING:
    from netserve._core._handlers import BaseRequestHandler

__all__ = ["BaseServer"]

# One readiness wait on one or two fds: poll(2) needs no kernel object per call,
# which epoll would (a handle_request() call creates its selector afresh).
_Selector: type[selectors.BaseSelector] = getattr(
    selectors, "PollSelector", selectors.SelectSelector
)

# Typeshed spells a request as a connected socket (streams) or a
# (data, server socket) pair (datagrams); addresses depend on the family.
_Request = Any
_Address = Any
_HandlerFactory = Callable[[Any, Any, Any], "BaseRequestHandler"]

_stage_log = get_logger("stages")
_limits_log = get_logger("limits")
# What the runner returns for a connection whose stages ran out of time.
_STAGE_TIMED_OUT = timeout_outcome("stage_timeout")
_drain_log = get_logger("drain")
# After drain() ended what was left, how long it waits for it to be gone.
_ABORT_WAIT = 5.0

_RULE = "-" * 40
# Marks the wake-up socket among the selector's keys.
_WAKER = "netserve-waker"


class BaseServer:
    """The family-independent server: the request loop and its hooks.

    Subclasses provide ``fileno()``, ``get_request()`` and, usually,
    ``server_bind()``/``server_activate()``/``server_close()``.
    """

    timeout: float | None = None
    # Connections accepted per readiness of a stream listener (datagram servers
    # take one). One keeps the stdlib's pace for the one-at-a-time server.
    accept_batch: int = 1
    # How long all the stages of one connection (a PROXY header, a TLS
    # handshake) may take together, from its accept (None: no limit). Ten
    # seconds: a handshake over a slow mobile link takes a few; a client that
    # needs longer is more likely stalling than slow.
    stage_timeout: float | None = 10.0
    # Limits and time-outs (docs/limits.md). None everywhere in the stdlib's
    # classes, whose behaviour they keep; the new models set safe defaults.
    # A stream connection that has sent nothing yet is closed after this long.
    park_timeout: float | None = None
    # The longest wait for more bytes once a connection has spoken (per read).
    idle_timeout: float | None = None
    # The longest a send may make no progress (a peer that does not read).
    write_timeout: float | None = None
    # A connection is closed this long after its accept, whatever it does.
    max_connection_age: float | None = None
    # Stream connections open at once (parked, in a stage, in a handler): at the
    # limit the server stops accepting, and the kernel's backlog holds the rest.
    max_connections: int | None = None
    # Stream connections open at once from one source host; beyond, a new one
    # is closed at once (counted in refused and limited).
    max_connections_per_client: int | None = None
    # rfile.readline() without a size raises LineTooLong past this many bytes.
    max_line_size: int | None = None
    # Whether a client's fault that ends a handler (a reset or broken pipe,
    # LineTooLong) goes to handle_error(), as any exception does in the stdlib.
    client_faults_are_errors: bool = True
    # One INFO line per request on netserve.access as it ends: peer, the real
    # client behind a PROXY header, duration, bytes in and out, outcome (_access).
    access_log: bool = False
    # The PROXY protocol header expected first on each connection (datagram): None
    # (off), "v1", "v2" or "any"; and the peers that send it (addresses,
    # networks, "unix"), which it requires. Others are refused (docs in _proxy).
    proxy_protocol: str | None = None
    proxy_trusted: Any = None
    # TLS (docs/tls.md), on stream servers: an ssl.SSLContext of your own, or
    # a certificate (and key) file from which one is built (TLS 1.2 at least);
    # with the built one, client certificates checked against tls_ca_certs as
    # tls_cert_reqs says ("none", "optional", "required"), the ALPN protocols
    # offered, and a certificate per SNI name ({name: certfile or (cert, key)}).
    tls_context: ssl.SSLContext | None = None
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    tls_ca_certs: str | None = None
    tls_cert_reqs: Any = "none"
    tls_alpn: list[str] | None = None
    tls_sni: dict[str, Any] | None = None
    # Handshake steps computing at once (issue 13: a flood of handshakes is
    # CPU); over it a connection waits, parked, within stage_timeout. A slot is
    # held only while the server works on the peer's message, never while it
    # waits for the peer: a client that stalls mid-handshake holds none. Two
    # per core: the CPU stays shared with the connections already served.
    tls_max_handshakes: int = 2 * (os.cpu_count() or 1)
    # Whether the handshake runs on an SSLObject over the cooperative socket
    # (the hub) rather than an SSLSocket.
    _netserve_tls_cooperative: bool = False
    # Whether leaving a ``with`` block on KeyboardInterrupt ends the open
    # connections at once (the pool and the hub) instead of waiting for them.
    _netserve_fast_interrupt: bool = False
    # Whether the serving loop runs the handlers itself (the one-at-a-time
    # server); every concurrency mix-in sets it False.
    _netserve_handles_inline: bool = True
    # Whether requests run in forked children (whose counts reach the server
    # only through their exit status).
    _netserve_forks_requests: bool = False
    # Whether this class overrides _netserve_stages(): worked out once per class,
    # so that a server without stages asks for none on every connection.
    _netserve_has_stages: ClassVar[bool] = False
    # Whether this class overrides verify_client(): the default says yes to
    # everyone, so a server that keeps it makes no call for it per request.
    _netserve_verifies_client: ClassVar[bool] = False
    # The PROXY protocol policy, from the two attributes above (None: off).
    _netserve_proxy: ProxyPolicy | None = None
    # The TLS policy, from the tls_* attributes (None: no TLS).
    _netserve_tls: TLSPolicy | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        has_stages = cls._netserve_stages is not BaseServer._netserve_stages
        if has_stages != cls._netserve_has_stages:  # set only where it changes
            cls._netserve_has_stages = has_stages
        verifies = cls.verify_client is not BaseServer.verify_client
        if verifies != cls._netserve_verifies_client:
            cls._netserve_verifies_client = verifies

    def __init__(self, server_address: _Address, RequestHandlerClass: _HandlerFactory) -> None:
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self._netserve_stop = StopControl()
        self._netserve_table = ConnectionTable()
        self._netserve_watching = False
        self._netserve_close_pending = False
        proxy = proxy_policy(self)  # ConfigurationError if the attributes contradict
        if proxy is not None:
            self._netserve_proxy = proxy
            vars(self)["_netserve_has_stages"] = True  # its stage, whatever the class
        tls = tls_policy(self, cooperative=self._netserve_tls_cooperative)
        if tls is not None:
            self._netserve_tls = tls
            vars(self)["_netserve_has_stages"] = True
        # Set by drain(): read by the loop (a plain bool, every pass) and
        # waited on by handlers (the event).
        self._netserve_is_draining = False
        self._netserve_drain_event = threading.Event()
        # Set by the serving loop once it has stopped accepting for a drain.
        self._netserve_drain_seen = threading.Event()

    # -- hooks a concrete server supplies -------------------------------------------

    def fileno(self) -> int:
        """The file descriptor the request loop waits on."""
        raise NotImplementedError(f"{type(self).__name__} must define fileno()")

    def server_activate(self) -> None:
        """Called by the constructor to activate the server; does nothing here."""

    def server_close(self) -> None:
        """Clean up the server; does nothing here."""

    def get_request(self) -> tuple[_Request, _Address]:
        """Take the next request off the socket: (request, client_address)."""
        raise NotImplementedError(f"{type(self).__name__} must define get_request()")

    def service_actions(self) -> None:
        """Called on every pass of ``serve_forever()``; a hook for mix-ins."""

    # -- serving -------------------------------------------------------------------

    def serve_forever(self, poll_interval: float | None = 0.5) -> None:
        """Handle requests until ``shutdown()`` is called.

        ``poll_interval`` only sets how often ``service_actions()`` runs while idle:
        a shutdown wakes the loop at once.
        """
        stop = self._netserve_stop
        waker = stop.enter_loop()
        try:
            with self._netserve_selector() as selector, self._netserve_accepting() as acceptor:
                selector.register(waker, selectors.EVENT_READ, _WAKER)
                batch = self._netserve_batch()
                clock = self._netserve_table.clock
                self._netserve_loop_started(selector)
                try:
                    while not stop.requested():
                        wait = self._netserve_before_wait(selector, poll_interval)
                        wait = self._netserve_watch_listener(selector, acceptor, clock(), wait)
                        ready = selector.select(wait)
                        # A request that became ready together with the stop is
                        # left in the backlog: the stop was asked for first.
                        if stop.requested():
                            break
                        for key, _ in ready:
                            if key.data is None:
                                if not self._netserve_is_draining:
                                    acceptor.accept(self._netserve_accept_room(batch))
                            elif key.data is _WAKER:
                                drain(waker)
                            else:
                                self._netserve_ready(key)
                        self.service_actions()
                finally:
                    if self._netserve_watching:
                        selector.unregister(self)
                        self._netserve_watching = False
                    self._netserve_loop_stopped(selector)
                    if self._netserve_close_pending:
                        self._netserve_close_pending = False
                        self._netserve_close_parked()
        finally:
            stop.leave_loop(waker)

    def _netserve_watch_listener(
        self,
        selector: selectors.BaseSelector,
        acceptor: Acceptor,
        now: float,
        wait: float | None,
    ) -> float | None:
        """Watch the listener exactly while accepting is wanted; returns the wait."""
        paused = acceptor.paused_until > now
        want = not paused and self._netserve_accept_allowed()
        if want != self._netserve_watching:
            if want:
                selector.register(self, selectors.EVENT_READ)
            else:
                selector.unregister(self)
            self._netserve_watching = want
        if self._netserve_is_draining:
            self._netserve_drain_seen.set()  # this loop accepts no more
        if paused:
            # Wake when the back-off ends, even with poll_interval None.
            until = acceptor.paused_until - now
            return until if wait is None else min(wait, until)
        return wait

    @contextlib.contextmanager
    def _netserve_accepting(self) -> Iterator[Acceptor]:
        """The acceptor, its reserve descriptor held, for as long as a loop serves.

        A stream listener is non-blocking meanwhile: the loop accepts in
        batches until the backlog is empty, and a connection another process
        took first (a shared listener) must not block the loop.
        """
        acceptor = self._netserve_acceptor()
        sock: socket.socket | None = getattr(self, "socket", None)
        stream = sock is not None and sock.type == socket.SOCK_STREAM
        saved = sock.gettimeout() if stream and sock is not None else None
        acceptor.open()
        try:
            if stream and sock is not None:
                sock.setblocking(False)
            yield acceptor
        finally:
            acceptor.close()
            if stream and sock is not None:
                self._netserve_give_back_listener(sock, saved)

    def _netserve_give_back_listener(self, sock: socket.socket, saved: float | None) -> None:
        """As a serving loop stops: the listener's time-out as the loop found it,
        except that a listener this server did not create stays non-blocking.

        ``O_NONBLOCK`` belongs to the open file description, which every
        process (and every descriptor) holding the socket shares: a
        supervisor's workers, a socket systemd passed, a server that forked
        after binding. Clearing it here would leave the others' loops blocked
        in ``accept()`` whenever another took the connection first; there is
        no per-call non-blocking accept to use instead. ``handle_request()``
        still waits as the saved time-out says.
        """
        if sock.fileno() < 0:
            return
        if saved is None and not self._netserve_created(sock):
            self._netserve_left_nonblocking = sock
            return
        sock.settimeout(saved)

    def _netserve_created(self, sock: socket.socket) -> bool:
        """Whether this server made ``sock`` itself, in this process."""
        made = vars(self).get("_netserve_made_socket")
        return made is not None and made[0] is sock and made[1] == os.getpid()

    def _netserve_acceptor(self) -> Acceptor:
        acceptor: Acceptor | None = vars(self).get("_netserve_acceptor_now")
        if acceptor is None:
            acceptor = self._netserve_acceptor_now = Acceptor(self)
        return acceptor

    def _netserve_batch(self) -> int:
        """Requests taken per readiness of the listener: one for a datagram server,
        whose ``get_request()`` may block (the stdlib's does)."""
        sock: socket.socket | None = getattr(self, "socket", None)
        if sock is None or sock.type != socket.SOCK_STREAM:
            return 1
        return max(1, self.accept_batch)

    def _netserve_accept_room(self, batch: int) -> int:
        """How many of ``batch`` to take at this readiness of the listener (the
        loop asks each time; a model with a bounded hand-off says how much room
        it has)."""
        return batch

    def statistics(self) -> ServerStatistics:
        """An immutable snapshot of the server's counters (``ServerStatistics``)."""
        return ServerStatistics(
            **self._netserve_table.counters(),
            parked=self._netserve_parked_count(),
            accepting=self._netserve_watching,
            at_limit=self._netserve_table.at_limit(),
        )

    def _netserve_parked_count(self) -> int:
        return 0

    # -- netserve's private extension points for its own mix-ins --------------------
    # The listener is registered with data None; a mix-in registers its own file
    # objects with other data and receives their readiness in _netserve_ready().

    def _netserve_selector(self) -> selectors.BaseSelector:
        return _Selector()

    def _netserve_loop_started(self, selector: selectors.BaseSelector) -> None:
        pass

    def _netserve_loop_stopped(self, selector: selectors.BaseSelector) -> None:
        pass

    def _netserve_before_wait(
        self, selector: selectors.BaseSelector, poll_interval: float | None
    ) -> float | None:
        return poll_interval

    def _netserve_ready(self, key: selectors.SelectorKey) -> None:
        raise AssertionError(f"no handler for readiness of {key.fileobj!r}")

    def _netserve_accept_allowed(self) -> bool:
        """Whether the loop should accept now: below ``max_connections`` (a mix-in
        also says no while it has no room). At the limit, the first connection
        to close wakes the loop."""
        if self._netserve_is_draining:
            return False
        limit = self.max_connections
        table = self._netserve_table
        # Read without the lock first: only this loop adds connections.
        if limit is None or table.active < limit or not self._netserve_stream():
            return True
        if not table.pause_at_limit(limit, self._netserve_stop.wake):
            return True
        self._netserve_paused_at_limit(limit)
        return False

    def _netserve_paused_at_limit(self, limit: int) -> None:
        """Say that accepting paused at ``max_connections`` (every model)."""
        self._netserve_rate_limited("limit", _limits_log, logging.INFO).event(
            "accepting paused: %d connections open (max_connections)", limit
        )

    def _netserve_rate_limited(
        self, kind: str, logger: logging.Logger, level: int
    ) -> RateLimitedLog:
        """This server's rate-limited log of one kind of event, made on first use."""
        logs: dict[str, RateLimitedLog] = vars(self).setdefault("_netserve_logs", {})
        logged = logs.get(kind)
        if logged is None:
            logged = logs[kind] = RateLimitedLog(logger, level, clock=self._netserve_table.clock)
        return logged

    def _netserve_timeouts(self) -> Timeouts:
        """(park, idle, write, age) for a new connection's socket (see _limits)."""
        return (self.park_timeout, self.idle_timeout, self.write_timeout, self.max_connection_age)

    def _netserve_stream(self) -> bool:
        sock: socket.socket | None = getattr(self, "socket", None)
        return sock is not None and sock.type == socket.SOCK_STREAM

    def _netserve_serving_here(self) -> bool:
        """Whether this thread runs the server's requests in a way that a waiting
        ``shutdown()`` would deadlock (the hub's thread, say)."""
        return False

    def _netserve_call_in_loop(self, fn: Callable[[], None]) -> None:
        """From ``service_actions()``: run ``fn`` on the thread whose passes show
        the server is alive (the supervisor's liveness check). Here that is the
        serving loop's own thread, which calls ``service_actions()``: at once."""
        fn()

    def shutdown(self) -> None:
        """Stop ``serve_forever()``.

        From another thread, this waits until the loop has left. From the serving
        thread (inside a handler), or when no loop is running, it only asks: the
        running loop leaves after the current request, and a loop started later
        returns at once.
        """
        self._netserve_stop.request_stop(wait=not self._netserve_serving_here())

    # -- closing: now, then wait, then force -------------------------------------------

    def close(self) -> None:
        """Stop accepting now: stop the serving loop and close the listener.

        Connections still waiting for their first byte (parked, in the pool and
        the hub) are closed too. Requests in progress carry on; this never waits
        for them (``wait_closed()`` does). ``server_close()`` keeps the stdlib's
        meaning on top: close, then wait if ``block_on_close``.
        """
        # The loop owns the listener and the parked connections: let it leave
        # first. It leaves at once unless it runs a handler itself (the sync
        # model), which may take any time: that loop is not waited for, and
        # leaves after the handler.
        inline = self._netserve_handles_inline
        wait = not inline and not self._netserve_serving_here()
        stopped = self._netserve_stop.request_stop(wait=wait)
        self._netserve_close_listener()
        if stopped:
            self._netserve_close_parked()
        else:
            # Called on the loop's own thread (a handler, a signal handler) or
            # not waited for: the loop closes them as it leaves.
            self._netserve_close_pending = True

    def drain(self, timeout: float | None = 30.0) -> bool:
        """Stop accepting; let every accepted connection finish; end the rest
        at the deadline. Returns True when all finished within ``timeout``.

        Accepting stops at once (a shared listener's queue is left to the other
        processes that accept from it). What was accepted is served: a parked
        connection gets its handler when its first byte comes, or is closed by
        ``park_timeout``; handlers run to their end. A handler can see the
        drain (``draining``, ``wait_for_drain()``) and end at its own
        protocol's boundary; one waiting for the next request ends by
        ``idle_timeout``. netserve never closes an accepted connection early
        on its own: it cannot know where a request ends on a stream. At the
        deadline what is left is ended as ``abort_connections()`` ends it;
        then the server is closed (``close()``) either way.
        """
        clock = self._netserve_table.clock
        started = clock()
        deadline = None if timeout is None else started + timeout
        self._netserve_is_draining = True
        self._netserve_drain_event.set()
        self._netserve_stop_watching(timeout)
        _drain_log.info(
            "drain: accepting stopped; %d connections open", self._netserve_table.active
        )
        finished = self.wait_closed(None if deadline is None else max(0.0, deadline - clock()))
        if not finished:
            _drain_log.info(
                "drain: %d connections still open after %s s; ending them",
                self._netserve_table.active,
                timeout,
            )
            self.abort_connections()
            self.wait_closed(_ABORT_WAIT)
        else:
            _drain_log.info("drain: every connection finished, in %.1f s", clock() - started)
        self.close()
        return finished

    @property
    def serving(self) -> bool:
        """Whether ``serve_forever()`` runs now (on any thread)."""
        return self._netserve_stop.loop_running()

    @property
    def draining(self) -> bool:
        """Whether ``drain()`` has been called: a handler ends at its next boundary."""
        return self._netserve_is_draining

    def wait_for_drain(self, timeout: float | None = None) -> bool:
        """Block until ``drain()`` is called (``timeout`` seconds at most); says
        whether it was. On the hub, call it through ``netserve.to_thread()``."""
        return self._netserve_drain_event.wait(timeout)

    def _netserve_stop_watching(self, timeout: float | None) -> None:
        """Stop accepting, keep serving what was accepted; return once the loop
        accepts no more (or ``timeout`` passed: the sync model's loop looks
        only after the request it is running)."""
        stop = self._netserve_stop
        stop.wake()  # the loop looks at the drain flag again
        if stop.loop_running_elsewhere():
            self._netserve_drain_seen.wait(timeout)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until every accepted connection is gone (``timeout`` seconds at most).

        Returns True when none is left, False when the time ran out first.
        """
        return self._netserve_table.wait_idle(timeout)

    def abort_connections(self) -> None:
        """End the connections still open, the model's way, and return at once.

        Threads, pool workers and the sync model: each connection is shut down
        for both directions, so that a handler blocked on it returns (a read
        sees the end of the stream, a write fails), and its ``finally`` blocks
        and ``finish()`` run. The hub ends its handlers' greenlets with
        ``GreenletExit`` (``finally`` and ``finish()`` run too). The forking
        model sends its children SIGTERM, which ends a child at once unless it
        handles the signal, then SIGKILL to those still running
        ``abort_grace`` later (so this call takes up to that long there).
        Follow it with ``wait_closed()``.
        """
        for sock in self._netserve_table.live():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed, or the peer is gone already

    def _netserve_close_listener(self) -> None:
        pass

    def _netserve_close_parked(self) -> None:
        pass

    def handle_request(self) -> None:
        """Wait for and handle one request, honouring ``timeout``.

        The wait is the smaller of the socket's timeout and ``self.timeout`` (None
        for either means no limit); ``handle_timeout()`` runs when it expires.
        """
        limit = self._request_wait_limit()
        deadline = None if limit is None else time.monotonic() + limit
        with _Selector() as selector:
            selector.register(self, selectors.EVENT_READ)
            while not selector.select(limit):
                # select() can return early (a signal); wait out the remainder.
                if deadline is not None:
                    limit = deadline - time.monotonic()
                    if limit < 0:
                        self.handle_timeout()
                        return
        self._handle_request_noblock()

    def _request_wait_limit(self) -> float | None:
        sock: socket.socket | None = getattr(self, "socket", None)
        socket_limit = None if sock is None else sock.gettimeout()
        if socket_limit == 0.0 and vars(self).get("_netserve_left_nonblocking") is sock:
            socket_limit = None  # blocking, as the caller left it (_netserve_give_back_listener)
        limits = [t for t in (socket_limit, self.timeout) if t is not None]
        return min(limits) if limits else None

    def _handle_request_noblock(self) -> None:
        """Handle one request whose socket is known to be ready (see ``_accept``)."""
        self._netserve_acceptor().accept(1)

    def handle_timeout(self) -> None:
        """Called when ``handle_request()`` times out; does nothing here."""

    def verify_request(self, request: _Request, client_address: _Address) -> bool:
        """Return False to refuse the request (it is then shut down unhandled)."""
        return True

    def verify_client(self, request: _Request, client_address: _Address) -> bool:
        """Return False to refuse the request once its stages are done.

        Where ``verify_request()`` runs on the accept path with the peer's
        address (behind a proxy, the proxy's), this runs just before the
        handler, wherever the model runs it, with what the handler would get:
        ``client_address`` is the original client a PROXY protocol header
        named (for allow-lists), or the peer's own without one. A refused
        request is shut down unhandled and counted in ``refused``; an
        exception here is ``handle_error()``'s, as a handler's would be.
        """
        return True

    def process_request(self, request: _Request, client_address: _Address) -> None:
        """Run the handler for one request, then shut the request down."""
        self._netserve_run_request(request, client_address)

    # -- the one request runner ---------------------------------------------------------

    def _netserve_run_request(
        self, request: _Request, client_address: _Address, staged: Connection | None = None
    ) -> int:
        """Run one request (``_netserve_serve_request()``), and log it when the
        server keeps an access log (``_access``)."""
        if self.access_log:
            return run_logged(
                self._netserve_serve_request,
                self._netserve_table.clock,
                request,
                client_address,
                staged,
            )
        return self._netserve_serve_request(request, client_address, staged)

    def _netserve_serve_request(
        self, request: _Request, client_address: _Address, staged: Connection | None
    ) -> int:
        """Run one request: its stages, the handler, and the stdlib's error chain.

        Every model runs this where it handles a request (the serving thread for
        sync, a request thread, the forking child, a pool worker, a greenlet):
        the stages (unless the pool already ran them: ``staged``), the handler,
        ``handle_error()`` for an ``Exception``, and ``shutdown_request()``
        whatever happens. ``verify_client()`` runs between the stages and the
        handler (in the error guard), when the class overrides it. Returns the
        outcome (``_connections.HANDLED`` ...); any other BaseException
        propagates (the model decides what it means; a ``SystemExit`` is
        counted here as an error, another with ``table.error()`` if the model
        reports it).
        """
        # Counted out as what it was accepted as (a stage may replace it).
        original = request if staged is None else staged.sock
        if staged is None and self._netserve_has_stages and isinstance(request, socket.socket):
            stages = self._netserve_stages()
            if stages:
                staged = Connection(request, client_address, self._netserve_stage_deadline())
                try:
                    run_stages(
                        staged, stages, self._netserve_stage_wait, self._netserve_stage_wait_slot
                    )
                except (StageError, OSError) as exc:  # ConnectionTimeout is an OSError
                    return self._netserve_stage_failed(staged, exc)
                except Exception:
                    return self._netserve_stage_bug(staged)
                except BaseException:
                    # Ended from outside (the hub's abort_connections(), an
                    # interrupt): a failed stage, then on its way.
                    self._netserve_drop_staged(staged, None)
                    raise
        elif staged is None and self._netserve_proxy is not None:
            # A datagram behind a proxy: its own header first (see _proxy).
            try:
                request, client_address = self._netserve_proxy.datagram(request, client_address)
            except StageError as exc:
                self._netserve_table.stage_failed(original, timed_out=False)
                _stage_log.debug("datagram from %s dropped: %r", client_address, exc)
                return STAGE_FAILED
        if staged is not None:
            request, client_address = staged.request, staged.client_address
        outcome = HANDLED
        try:
            if (
                self._netserve_proxy is not None
                and staged is not None
                and not self._netserve_admit_proxied(original, client_address)
            ):
                outcome = REFUSED  # counted as refused and limited by the table
            elif self._netserve_verifies_client and not self.verify_client(request, client_address):
                outcome = REFUSED
                _stage_log.debug("request from %s refused by verify_client()", client_address)
            else:
                self.finish_request(request, client_address)
        except Exception as exc:
            outcome = self._netserve_ended_by(exc, request, client_address)
        except SystemExit:
            # An error in every model's counts; where it goes from here is the
            # model's (the stdlib's way for sync, threading and forking).
            outcome = FAILED
            raise
        finally:
            # Counted before the peer can see the close: whoever it tells then
            # finds the request counted.
            self._netserve_table.finish(original, outcome)
            self.shutdown_request(request)
            if staged is not None and staged.sock is not request:
                # A stage's socket over the accepted one (TLS) has its own descriptor.
                staged.sock.close()
        return outcome

    def _netserve_admit_proxied(self, accepted: Any, client_address: _Address) -> bool:
        """``max_connections_per_client`` for a connection behind the PROXY
        protocol, counted by its original client once the header is read."""
        limit = self.max_connections_per_client
        if limit is None or self._netserve_forks_requests:
            return True  # no limit, or counted at accept (see _accept)
        return self._netserve_acceptor().admit(accepted, client_address, limit)

    def _netserve_ended_by(
        self, exc: Exception, request: _Request, client_address: _Address
    ) -> int:
        """Report an exception that ended a handler; returns the outcome to count.

        netserve's own time-outs and (unless ``client_faults_are_errors``) a
        client's fault are counted and logged at DEBUG: a slow or misbehaving
        peer is not a bug in the server. Everything else is ``handle_error()``'s.
        """
        outcome = fault_of(exc)
        if isinstance(exc, ConnectionTimeout) and exc.setting == "write_timeout":
            discard_unsent(request)
        if outcome_base(outcome) != TIMED_OUT and (
            outcome == FAILED or self.client_faults_are_errors
        ):
            self.handle_error(request, client_address)
            return outcome | FAILED
        _limits_log.debug("request from %s ended: %r", client_address, exc)
        return outcome

    # -- connection stages (see _stages) -------------------------------------------------

    def _netserve_stages(self) -> list[Stage]:
        """Fresh stages for one new stream connection, in order; a mix-in adds its
        own to what ``super()`` returns. Called only in classes that override it,
        or that speak the PROXY protocol (whose stage comes first)."""
        proxy, tls = self._netserve_proxy, self._netserve_tls
        stages: list[Stage] = [] if proxy is None else [proxy.stage()]
        if tls is not None:
            stages.append(tls.stage())
        return stages

    def reload_certificates(self, context: ssl.SSLContext | None = None) -> None:
        """Load the TLS certificates afresh from their files (or take ``context``):
        new handshakes use them, open connections keep their session."""
        tls = self._netserve_tls
        if tls is None:
            raise ConfigurationError("this server does not speak TLS")
        tls.reload(context)

    def _netserve_stage_deadline(self) -> float | None:
        limit = self.stage_timeout
        return None if limit is None else self._netserve_table.clock() + limit

    def _netserve_stage_wait(self, conn: Connection, write: bool, deadline: float | None) -> None:
        """Wait, blocking this thread, until ``conn.sock`` is ready (see _stages)."""
        clock = self._netserve_table.clock
        remaining = None if deadline is None else deadline - clock()
        check_deadline(remaining)
        poller = select.poll()
        poller.register(conn.sock, select.POLLOUT if write else select.POLLIN)
        poller.poll(None if remaining is None else math.ceil(remaining * 1000))

    def _netserve_stage_wait_slot(self, conn: Connection, deadline: float | None) -> None:
        """Wait, blocking this thread, until ``conn.ticket`` is granted (a slot)."""
        remaining = None if deadline is None else deadline - self._netserve_table.clock()
        check_deadline(remaining)
        conn.ticket.event.wait(remaining)

    def _netserve_stage_failed(self, conn: Connection, exc: BaseException) -> int:
        """A connection's stages failed: counted, logged quietly, closed; never
        ``handle_error()`` (a bad or slow peer is not a bug in the server)."""
        timed_out = isinstance(exc, TimeoutError)
        _stage_log.debug(
            "connection from %s closed in stage %d: %r", conn.client_address, conn.stage, exc
        )
        self._netserve_drop_staged(conn, exc, timed_out=timed_out)
        return _STAGE_TIMED_OUT if timed_out else STAGE_FAILED

    def _netserve_stage_bug(self, conn: Connection) -> int:
        """A stage raised something other than a failure: a bug in the server,
        reported through ``handle_error()`` as a handler's would be."""
        self.handle_error(conn.request, conn.client_address)
        self._netserve_table.error()
        self._netserve_drop_staged(conn, None)
        return STAGE_FAILED

    def _netserve_drop_staged(
        self, conn: Connection, exc: BaseException | None, *, timed_out: bool = False
    ) -> None:
        """A connection that leaves in its stages: its stage's slot given back
        (``exc``: what its stage should report, None for nothing), counted as
        a failed stage, then closed."""
        if conn.holder is not None:
            conn.holder.abandon(conn, exc)
        self._netserve_table.stage_failed(conn.sock, timed_out=timed_out)
        self.shutdown_request(conn.request)
        if conn.request is not conn.sock:
            self.shutdown_request(conn.sock)

    def _netserve_escaped(self, exc: BaseException, logger: logging.Logger) -> None:
        """A ``SystemExit`` (or another BaseException) that a handler let out, in a
        model whose thread carries on (pool, hub): reported as a request thread
        reports it, through ``threading.excepthook``, counted, and logged."""
        if not isinstance(exc, SystemExit):  # the runner counted that one
            self._netserve_table.error()
        self._netserve_rate_limited("escaped", logger, logging.WARNING).event(
            "a handler raised %s; reported through threading.excepthook, serving goes on",
            type(exc).__name__,
        )
        threading.excepthook(
            threading.ExceptHookArgs(
                (type(exc), exc, exc.__traceback__, threading.current_thread())
            )
        )

    def finish_request(self, request: _Request, client_address: _Address) -> None:
        """Instantiate ``RequestHandlerClass``, which handles the request."""
        handler_class: Any = self.RequestHandlerClass
        metaclass: Any = type(handler_class)
        if metaclass is not type or handler_class.__new__ is not object.__new__:
            handler_class(request, client_address, self)
            return
        # What calling the class does, in two steps that stay inside the
        # interpreter: a call through type() nests a C frame under the whole
        # request, and the greenlet hub copies a handler's C stack out and back
        # at every wait.
        handler: Any = object.__new__(handler_class)
        result = handler.__init__(request, client_address, self)
        if result is not None:
            raise TypeError(f"__init__() should return None, not '{type(result).__name__}'")

    def shutdown_request(self, request: _Request) -> None:
        """End one request; by default only closes it."""
        self.close_request(request)

    def close_request(self, request: _Request) -> None:
        """Release one request's resources; does nothing here."""

    def handle_error(self, request: _Request, client_address: _Address) -> None:
        """Report an exception raised while processing a request.

        The default output is the stdlib's: a rule, the client's address, the
        traceback of the exception being handled, and a rule, on stderr.
        """
        err = sys.stderr
        err.write(_RULE + "\n")
        err.write(f"Exception occurred during processing of request from {client_address}\n")
        traceback.print_exc(file=err)
        err.write(f"{_RULE}\n")

    # -- context manager -----------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *args: object) -> None:
        exc_type = args[0] if args else None
        if (
            isinstance(exc_type, type)
            and issubclass(exc_type, KeyboardInterrupt)
            and self._netserve_fast_interrupt
        ):
            # Ctrl-C out of ``with server: server.serve_forever()``: a fast,
            # bounded stop (issue 12), not a wait for every client to leave.
            self.close()
            self.abort_connections()
            if not self.wait_closed(_ABORT_WAIT):
                self.block_on_close = False
        self.server_close()
