"""GreenMixIn: each request in a greenlet on a hub (the server layer).

Handler code stays blocking-style: ``self.request`` is a ``GreenSocket``
(``_greensocket``), a ``socket.socket`` whose waits (recv, send, ...) suspend
the handler's greenlet and let the hub (``_hub``) run the others, with the
stdlib's timeout semantics (``settimeout``/``gettimeout``, ``TimeoutError``).
``rfile``/``wfile`` of ``StreamRequestHandler`` sit on top of it unchanged.

What still stalls the hub (every other connection waits while it runs): any
blocking call that does not go through ``self.request``, such as
``time.sleep()`` (use ``netserve.green_sleep()``), a socket the handler opens
itself, a database driver, ``subprocess`` waits, DNS look-ups, file I/O on slow
disks, long CPU-bound work. netserve does not monkeypatch: run such calls
with ``netserve.to_thread()`` (a bounded set of worker threads, while the hub
serves the others), or use the thread-pool model. A handler that holds the
hub past ``hub_stall_warning`` is logged with its stack (``_watchdog``).

Limits (issue 11, docs/limits.md): the hub enforces the time-outs on its own
waits (rule 6 of ``_hub``; ``_greensocket``), bounds rfile's lines
(``_greenfile``), and stops watching its listener while ``max_connections``
are open. The per-client limit is the accept routine's, as in every model.

Hooks overridden: ``serve_forever`` (accepting happens on the hub's thread),
``process_request``, ``server_close``. Attributes read:
``park_until_readable``, the limits (``park_timeout``, ``idle_timeout``,
``write_timeout``, ``max_connection_age``, ``max_connections``: read as
``serve_forever()`` starts), ``daemon_threads`` (the hub thread's),
``block_on_close``, ``accept_batch``, ``spare_greenlets``,
``hub_stall_warning``, ``to_thread_workers``.
Accepting runs the one accept routine (``_accept``) on the hub's thread.
"""

from __future__ import annotations

import os
import select
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from netserve._core._connections import ServerStatistics
from netserve._core._errors import MissingExtraError
from netserve._core._log import get_logger
from netserve._core._loop import drain
from netserve._core._socket_servers import TCPServer, UDPServer
from netserve._core._stages import Connection, check_deadline, has_input
from netserve._models._greensocket import GreenSocket

try:
    import greenlet
    from greenlet import getcurrent

    from netserve._models._hub import Hub, current_hub
except ImportError as exc:  # the [green] extra is not installed
    if exc.name != "greenlet":
        raise
    greenlet = getcurrent = None
    Hub = current_hub = None  # type: ignore[assignment, misc]

if TYPE_CHECKING:
    from netserve._models._hub import Limits, Timer

    # Typed as a stream server so that mypy checks the hooks it calls; the
    # datagram servers derive from TCPServer too.
    _MixInBase = TCPServer
else:
    _MixInBase = object

__all__ = [
    "GreenMixIn",
    "GreenSocket",
    "GreenTCPServer",
    "HubStatistics",
    "GreenUDPServer",
    "green_sleep",
    "to_thread",
]

log = get_logger("hub")
limits_log = get_logger("limits")

_T = TypeVar("_T")
# What wakes a greenlet whose wait for a handshake slot ran out.
_SLOT_EXPIRED = object()


def green_sleep(seconds: float) -> None:
    """Sleep without stalling the hub; a plain ``time.sleep()`` anywhere else."""
    hub = None if current_hub is None else current_hub()
    if hub is None or greenlet.getcurrent() is hub.greenlet:
        time.sleep(seconds)
    else:
        hub.sleep(seconds)


def to_thread(fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """Call ``fn(*args, **kwargs)`` without stalling the hub; its result or exception.

    In a handler on the hub, the handler's greenlet waits while one of the
    server's worker threads (at most ``to_thread_workers`` at once, the rest
    queued) runs the call, in a copy of the handler's context; the hub serves
    the other connections meanwhile. Anywhere else, a plain call.
    """
    hub = None if current_hub is None else current_hub()
    if hub is None or getcurrent() is hub.greenlet:
        return fn(*args, **kwargs)
    result: _T = hub.run_in_thread(fn, args, kwargs)
    return result


class _Starter:
    """A parked connection: it sits where the socket's reader would, and the
    socket's first event starts the handler's greenlet. The park time-out is
    the hub's sweep's (its first-byte limit, rule 6 of ``_hub``), which
    switches here with an ``Expiry``."""

    __slots__ = ("address", "server", "sock")

    def __init__(self, server: GreenMixIn, sock: GreenSocket, address: Any) -> None:
        # Parks the socket as it is made (once per connection, so one call).
        self.server = server
        self.sock = sock
        self.address = address
        sock.hub_reader = self
        server._green_parked.add(sock)

    def switch(self, expired: Any = None) -> None:
        server = self.server
        if expired is not None:
            server._green_park_expired(self)
            return
        server._green_parked.discard(self.sock)
        server._green_hub.spawn(server._green_run, self.sock, self.address)


@dataclass(frozen=True)
class HubStatistics(ServerStatistics):
    """A snapshot of a hub server's state, from ``statistics()``: the counters
    every server has (``ServerStatistics``), and the hub's own."""

    #: Handler greenlets running now (each holds one request).
    greenlets: int = 0


class GreenMixIn(_MixInBase):
    """Handle each request in a greenlet on a hub owned by the server."""

    _netserve_handles_inline = False
    _netserve_fast_interrupt = True
    # TLS on an SSLObject over the cooperative socket (a GreenTLSSocket, see _tls).
    _netserve_tls_cooperative = True
    # Unix sockets: a stale file left by a killed server is replaced, and the
    # file is removed on close (docs/deploying.md).
    unix_replace_stale = True
    unix_remove_on_close = True
    # An IPv6 server takes IPv6 only unless asked for both (docs/addresses.md).
    dualstack_ipv6: bool | None = False
    # A datagram longer than max_packet_size is dropped and counted, never
    # cut silently (docs/limits.md).
    oversized_datagrams = "drop"

    # A stream connection gets its greenlet (and handler) only once it has sent
    # something: an idle connection costs a socket, not a handler. Set False for
    # protocols where the server speaks first.
    park_until_readable: bool = True
    # The limits' safe defaults (issue 11; docs/limits.md states each and its
    # reason). A greenlet per slow client is cheap, so the hub's connection
    # bounds are ten times the pool's; the time-outs are the same.
    # Close a connection that sent nothing for this long after its accept.
    park_timeout: float | None = 30.0
    # The longest wait for more bytes once a connection has spoken (per read).
    idle_timeout: float | None = 120.0
    # The longest a send may make no progress (a peer that does not read).
    write_timeout: float | None = 60.0
    # A connection is closed this long after its accept (None: never).
    max_connection_age: float | None = None
    # Stream connections open at once (parked or in a handler); at the limit
    # the hub stops watching its listener, and the kernel's backlog holds the rest.
    max_connections: int | None = 10000
    # Stream connections open at once from one source host.
    max_connections_per_client: int | None = 1000
    # rfile.readline() without a size raises LineTooLong past this many bytes.
    max_line_size: int | None = 65536
    # A client's reset, broken pipe or too long a line is counted, not reported.
    client_faults_are_errors: bool = False
    # Log a handler that holds the hub's thread this long, with its stack
    # (None: no watchdog). A tenth of a second is a long time for every other
    # connection to wait, and far beyond any handler that only waits on its
    # socket.
    hub_stall_warning: float | None = 0.1
    # Worker threads for netserve.to_thread(); calls beyond them queue.
    to_thread_workers: int = 16
    # The hub thread is a daemon thread (the interpreter does not wait for it).
    daemon_threads: bool = False
    # server_close() waits for the running handlers to finish; otherwise it
    # ends them (GreenletExit: their finally blocks and finish() still run).
    block_on_close: bool = True
    # Connections accepted per readiness event of the listener.
    accept_batch: int = 64
    # Finished handler greenlets kept for reuse (each about 20 KiB); reusing one
    # is cheaper than making one (rule 4 in _hub).
    spare_greenlets: int = 128
    # A new model need not keep the stdlib's backlog of 5, which overflows as
    # soon as connections arrive faster than one scheduling slice (each overflow
    # costs the client a SYN retransmission, a second or more).
    request_queue_size: int = socket.SOMAXCONN

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if Hub is None:
            raise MissingExtraError(type(self).__name__, "green", "greenlet")
        self._green_hub = Hub(
            daemon=self.daemon_threads,
            max_spares=self.spare_greenlets,
            stall_warning=self.hub_stall_warning,
            thread_workers=self.to_thread_workers,
        )
        # The hub's wait limits for the connections of one serve_forever() (and
        # of handle_request(), until then), read from the attributes as it starts.
        self._green_limits: Limits | None = None
        self._green_limits_read = False
        # max_connections, while the hub accepts (None for datagram servers).
        self._green_max_connections: int | None = None
        self._green_accepting = False
        self._green_greenlets: set[Any] = set()
        self._green_parked: set[GreenSocket] = set()
        self._green_dgram: GreenSocket | None = None
        self._green_saved_timeout: float | None = None
        self._green_listener_fd = -1
        self._green_resume: Timer | None = None
        self._green_park_timeouts = 0
        super().__init__(*args, **kwargs)

    # -- serving -----------------------------------------------------------------------

    def serve_forever(self, poll_interval: float | None = 0.5) -> None:
        """Accept on the hub until ``shutdown()``; handlers run on the hub's thread.

        This thread only waits: it runs ``service_actions()`` every
        ``poll_interval`` seconds, and leaves at once when ``shutdown()`` is called.
        """
        stop = self._netserve_stop
        # Every descriptor this loop needs is taken before the hub accepts
        # anything (the wake-up pair here, the hub's own when its thread
        # starts, the acceptor's reserve): taken after, a full descriptor table
        # could fail the loop once clients hold them (issue 10). poll() needs none.
        waker = stop.enter_loop()
        hub = self._green_hub
        hub.stall_warning = self.hub_stall_warning
        try:
            wait = select.poll()
            wait.register(waker.fileno(), select.POLLIN)
            timeout_ms = None if poll_interval is None else int(poll_interval * 1000)
            hub.run_sync(self._green_start_accepting)
            try:
                while not stop.requested():
                    wait.poll(timeout_ms)
                    if stop.requested():
                        break
                    drain(waker)
                    self.service_actions()
            finally:
                try:
                    hub.run_sync(self._green_stop_accepting)
                except RuntimeError:
                    # server_close() closed the hub under this loop (before any
                    # shutdown()): its thread is gone, and its watches with it.
                    self._netserve_acceptor().close()
                if self._netserve_close_pending:
                    self._netserve_close_pending = False
                    self._netserve_close_parked()
        finally:
            stop.leave_loop(waker)

    def _netserve_serving_here(self) -> bool:
        # A handler's shutdown() must not wait: the loop needs this thread to stop.
        return self._green_hub.on_hub_thread()

    def _netserve_call_in_loop(self, fn: Callable[[], None]) -> None:
        # service_actions() runs on the thread that only waits; the hub's thread
        # accepts, so it is the one that must show it completes its passes.
        try:
            self._green_hub.call_soon_threadsafe(fn)
        except (RuntimeError, OSError):
            pass  # the hub is closed or cannot start: no pass, no heartbeat

    def _green_start_accepting(self) -> None:
        hub = self._green_hub
        acceptor = self._netserve_acceptor()
        acceptor.open()
        self._green_saved_timeout = self.socket.gettimeout()
        self.socket.setblocking(False)
        # Remembered: if server_close() runs while serving, fileno() is -1 by
        # the time the loop stops, and the hub must still forget this one.
        self._green_listener_fd = self.socket.fileno()
        self._green_read_limits()
        stream = self.socket_type == socket.SOCK_STREAM
        self._green_max_connections = self.max_connections if stream else None
        self._green_accepting = True
        hub.hold()
        self._green_watch_listener(None)

    def _green_read_limits(self) -> Limits | None:
        """The wait limits of the connections accepted from now on (rule 6 of _hub)."""
        self._green_limits = self._green_hub.limits(
            first=self.park_timeout,
            idle=self.idle_timeout,
            write=self.write_timeout,
            age=self.max_connection_age,
        )
        self._green_limits_read = True
        return self._green_limits

    def _green_watch_listener(self, _: object) -> None:
        self._green_resume = None
        if not self._green_accepting:
            return  # drained (or stopped) since this was scheduled
        hub = self._green_hub
        hub.watch(self._green_listener_fd, self._green_accept)
        self._netserve_watching = True

    def _netserve_stop_watching(self, timeout: float | None) -> None:
        # drain(): stop accepting on the hub's thread (accepts run there, so
        # none comes after this returns); the hub serves on.
        if not self._green_accepting:
            return  # not serving: nothing is watched

        def stop() -> None:
            self._green_accepting = False
            if self._green_resume is not None:
                self._green_resume.cancel()
                self._green_resume = None
            if self._netserve_watching:
                self._netserve_watching = False
                self._green_hub.unwatch(self._green_listener_fd)

        try:
            self._green_hub.run_sync(stop)
        except RuntimeError:
            pass  # the hub closed meanwhile: nothing is watched

    def _green_stop_accepting(self) -> None:
        hub = self._green_hub
        self._green_accepting = False
        hub.release()
        if self._green_resume is not None:
            self._green_resume.cancel()
            self._green_resume = None
        if self._netserve_watching:
            self._netserve_watching = False
            # A closed descriptor has already left the epoll set with its close.
            hub.unwatch(self._green_listener_fd, registered=self.socket.fileno() >= 0)
        self._netserve_give_back_listener(self.socket, self._green_saved_timeout)
        self._netserve_acceptor().close()

    def _green_accept(self) -> None:
        # The one accept routine, in batches (the listener is non-blocking while
        # serving; an empty backlog ends the batch, and so does max_connections).
        pause = self._netserve_acceptor().accept(self._netserve_batch())
        if not self._netserve_watching:
            return
        if pause is not None:
            # The accept routine asks for a back-off: stop watching the listener
            # (it stays readable, and a level-triggered watch would spin).
            self._netserve_watching = False
            hub = self._green_hub
            hub.unwatch(self._green_listener_fd)
            self._green_resume = hub.call_later(pause, self._green_watch_listener, None)
            return
        limit = self._green_max_connections
        if (
            limit is not None
            and self._netserve_table.active >= limit
            and self._netserve_table.pause_at_limit(limit, self._green_below_limit)
        ):
            # Full: stop watching (the listener stays readable) until the table
            # counts a connection out below the limit.
            self._netserve_watching = False
            self._green_hub.unwatch(self._green_listener_fd)
            self._netserve_paused_at_limit(limit)

    def _green_below_limit(self) -> None:
        # Called once by the table, from the thread that counted a connection
        # out: a greenlet's, on the hub (or handle_request()'s caller).
        hub = self._green_hub
        if hub.on_hub_thread():
            self._green_resume_accepting()
        else:
            try:
                hub.call_soon_threadsafe(self._green_resume_accepting)
            except (RuntimeError, OSError):
                pass  # the hub is closed (or cannot start): nothing to resume

    def _green_resume_accepting(self) -> None:
        if self._green_accepting and not self._netserve_watching and self._green_resume is None:
            self._green_watch_listener(None)

    def _netserve_batch(self) -> int:
        # Datagrams too: on the hub the socket is non-blocking while serving.
        return max(1, self.accept_batch)

    def get_request(self) -> tuple[Any, Any]:
        """Accept a connection; on the hub, straight into a GreenSocket.

        Taking the descriptor from the listener saves building a plain socket
        only to take it apart again.
        Elsewhere (handle_request() on another thread), the usual accept().
        """
        if self.socket_type != socket.SOCK_STREAM or not self._green_hub.on_hub_thread():
            return super().get_request()
        fd, client_address = self.socket._accept()  # type: ignore[attr-defined]
        try:
            sock = GreenSocket(
                self._green_hub,
                fileno=fd,
                family=self.address_family,
                kind=socket.SOCK_STREAM,
                timeout=socket.getdefaulttimeout(),
                limits=self._green_limits,
            )
        except BaseException:
            os.close(fd)
            raise
        return sock, client_address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the request's greenlet on the hub (from any thread)."""
        hub = self._green_hub
        if hub.on_hub_thread():
            self._green_start(request, client_address)
        else:
            # handle_request() on another thread: the hub takes it from here.
            hub.call_soon_threadsafe(lambda: self._green_start_guarded(request, client_address))

    def _green_start_guarded(self, request: Any, client_address: Any) -> None:
        try:
            self._green_start(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self._netserve_table.finish_if_held(request, error=True)
            self.shutdown_request(request)

    def _green_start(self, request: Any, client_address: Any) -> None:
        hub = self._green_hub
        # Counted once here, uncounted when its greenlet ends or it is unparked:
        # the hub's thread lives while this is above zero.
        hub.active += 1
        try:
            # What get_request() gives on the hub: a GreenSocket (checked first,
            # with no call, as this runs for every connection).
            if type(request) is not GreenSocket:
                accepted = request
                if isinstance(request, socket.socket):
                    if not isinstance(request, GreenSocket):
                        limits = (
                            self._green_limits
                            if self._green_limits_read
                            else self._green_read_limits()
                        )
                        if request.type != socket.SOCK_STREAM:
                            limits = None
                        request = GreenSocket(hub, request, limits=limits)
                elif isinstance(request, tuple) and request[1] is self.socket:
                    request = (request[0], self._green_datagram_socket())
                if request is not accepted:
                    self._netserve_table.replace(accepted, request)
                if not isinstance(request, socket.socket):
                    hub.spawn(self._green_run, request, client_address)
                    return
            if self.park_until_readable and self.socket_type == socket.SOCK_STREAM:
                _Starter(self, request, client_address)
                return
            hub.spawn(self._green_run, request, client_address)
        except BaseException:
            hub.active -= 1  # no greenlet will uncount it
            raise

    def _green_park_expired(self, starter: _Starter) -> None:
        if starter.sock in self._green_parked:
            self._green_park_timeouts += 1
            limits_log.debug(
                "connection from %s closed: it sent nothing in time (park_timeout)",
                starter.address,
            )
            self._netserve_table.time_out(starter.sock)
            self._green_unpark(starter.sock)

    def _green_unpark(self, sock: GreenSocket) -> None:
        """Close a parked connection that never got a handler (the caller counts it)."""
        self._green_parked.discard(sock)
        sock.hub_reader = None
        self._green_hub.active -= 1
        self.shutdown_request(sock)

    def _green_datagram_socket(self) -> GreenSocket:
        # Replies go out through the server's socket: a cooperative view of it,
        # on a duplicate descriptor (which shares its non-blocking mode).
        if self._green_dgram is None:
            self._green_dgram = GreenSocket(
                self._green_hub, socket.socket(fileno=os.dup(self.socket.fileno()))
            )
        return self._green_dgram

    def _green_run(self, request: Any, client_address: Any) -> None:
        current = getcurrent()
        self._green_greenlets.add(current)
        try:
            self._netserve_run_request(request, client_address)
        except greenlet.GreenletExit:
            pass  # ended by server_close(); the request is shut down
        except BaseException as exc:
            # As for a request thread, but the hub carries on serving.
            self._netserve_escaped(exc, log)
        finally:
            self._green_greenlets.discard(current)
            self._green_hub.active -= 1

    def _netserve_parked_count(self) -> int:
        return len(self._green_parked)

    def statistics(self) -> HubStatistics:
        """An immutable snapshot of the server's counters, and its greenlets."""
        base = super().statistics()
        return HubStatistics(**vars(base), greenlets=len(self._green_greenlets))

    def _netserve_stage_wait_slot(self, conn: Connection, deadline: float | None) -> None:
        """Wait in the connection's greenlet until ``conn.ticket`` is granted
        (a TLS handshake slot: see _tls); grants come on the hub's thread."""
        remaining = None if deadline is None else deadline - self._netserve_table.clock()
        check_deadline(remaining)
        hub = self._green_hub
        current = getcurrent()
        waiting = [True]

        def wake() -> None:
            if waiting[0]:
                waiting[0] = False
                hub.schedule(current)

        def expire(_: Any) -> None:
            if waiting[0]:
                waiting[0] = False
                current.switch(_SLOT_EXPIRED)

        conn.ticket.wake = wake
        timer = None if remaining is None else hub.call_at(hub.clock() + remaining, expire, None)
        try:
            assert hub.greenlet is not None
            outcome = hub.greenlet.switch()
        finally:
            waiting[0] = False
            if timer is not None:
                timer.cancel()
        if outcome is _SLOT_EXPIRED:
            check_deadline(0.0)

    def _netserve_stage_wait(self, conn: Connection, write: bool, deadline: float | None) -> None:
        """Wait in the connection's greenlet until its socket is ready (see _stages)."""
        remaining = None if deadline is None else deadline - self._netserve_table.clock()
        check_deadline(remaining)
        sock = conn.sock
        assert isinstance(sock, GreenSocket)  # every stream connection on the hub is one
        hub = self._green_hub
        until = None if remaining is None else hub.clock() + remaining
        try:
            if write:
                hub.wait_writable(sock, until)
            else:
                hub.wait_readable(sock, until)
        except TimeoutError:
            check_deadline(0.0)  # the stages' deadline: ConnectionTimeout

    def green_statistics(self) -> dict[str, int]:
        """Deprecated: use ``statistics()``, a ``ServerStatistics`` snapshot."""
        warnings.warn(
            "green_statistics() is deprecated; use statistics()", DeprecationWarning, stacklevel=2
        )
        stats = self.statistics()
        return {
            "handlers": stats.active - stats.parked,
            "parked": stats.parked,
            "park_timeouts": self._green_park_timeouts,
        }

    # -- closing -----------------------------------------------------------------------

    def server_close(self) -> None:
        """Close the listener; wait for the handlers (``block_on_close``) or end them."""
        super().server_close()
        self._netserve_close_parked()
        if not self.block_on_close:
            self.abort_connections()
        self._green_hub.close()  # returns once the last handler has finished
        if self._green_dgram is not None:
            self._green_dgram.close()
            self._green_dgram = None

    def _netserve_close_parked(self) -> None:
        if self._green_hub.thread is not None:
            self._green_hub.run_sync(self._green_close_parked_on_hub)

    def _green_close_parked_on_hub(self) -> None:
        # Close the connections that sent nothing; start the handlers of those
        # whose first bytes came before the hub saw them (a request, not an
        # idle connection: the pool hands these to its workers alike).
        for sock in list(self._green_parked):
            starter = sock.hub_reader
            if isinstance(starter, _Starter) and has_input(sock):
                sock.hub_reader = None
                starter.switch()
            else:
                self._green_refuse_parked(sock)

    def _green_refuse_parked(self, sock: GreenSocket) -> None:
        self._netserve_table.refuse(sock)
        self._green_unpark(sock)

    def abort_connections(self) -> None:
        """End every handler's greenlet with ``GreenletExit`` (their ``finally``
        blocks and ``finish()`` run; the requests are shut down), and close the
        parked connections (counted as refused)."""
        if self._green_hub.thread is not None:
            self._green_hub.run_sync(self._green_abort_on_hub)

    def _green_abort_on_hub(self) -> None:
        for sock in list(self._green_parked):
            self._green_refuse_parked(sock)
        current = getcurrent()
        for child in list(self._green_greenlets):
            if child is not current:
                child.throw()


class GreenTCPServer(GreenMixIn, TCPServer):
    """A TCP server whose handlers run in greenlets on a hub."""


class GreenUDPServer(GreenMixIn, UDPServer):
    """A UDP server whose handlers run in greenlets on a hub."""


if hasattr(socket, "AF_UNIX"):
    from netserve._core._socket_servers import UnixDatagramServer, UnixStreamServer

    __all__ += ["GreenUnixDatagramServer", "GreenUnixStreamServer"]

    class GreenUnixStreamServer(GreenMixIn, UnixStreamServer):
        """A Unix stream server whose handlers run in greenlets on a hub."""

    class GreenUnixDatagramServer(GreenMixIn, UnixDatagramServer):
        """A Unix datagram server whose handlers run in greenlets on a hub."""
