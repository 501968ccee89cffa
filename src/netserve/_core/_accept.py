"""The one accept routine, with its error policy, used by every model's loop.

Theory of operation
-------------------
``Acceptor.accept(batch)`` takes up to ``batch`` requests through the stdlib's
hooks, in order: ``get_request()``, ``verify_request()``, ``process_request()``
(errors: ``handle_error()`` then ``shutdown_request()``). Every loop calls it:
the selector loop of ``BaseServer.serve_forever()`` (sync, threading, forking,
pool), ``handle_request()``, and the hub's thread. A mix-in that overrides a
hook is therefore honoured by every model alike.

What an ``accept()`` failure means decides what the loop does next (issue 10,
"every model spins when descriptors run out"):

* Nothing to take (EAGAIN), or a client that left before we took it
  (ECONNABORTED, and the network errors that accept(2) says to treat like
  EAGAIN): skipped silently.
* The descriptor table is full (EMFILE, ENFILE): the listener stays readable,
  so retrying at once would spin. The loop stops watching it for a back-off
  (``BACKOFF_FIRST`` doubling to ``BACKOFF_MAX``) and logs one line, then a
  count every 10 s. Once the table has stayed full for ``SHED_AFTER``, the
  reserved descriptor is released to accept and close the connections waiting
  in the backlog, so that their clients see a prompt close instead of hanging
  until their own time-out; the reserve is taken again at once.
* The kernel is short of memory (ENOBUFS, ENOMEM): the same back-off, no
  shedding (closing connections frees no kernel memory worth having).
* Anything else is unexpected: logged at ERROR and backed off the same way,
  since a persistent error would otherwise spin just as well.

A success ends the episode: the back-off starts again from the beginning. The
log lines stay at one per 10 s (``RateLimitedLog``), however often the table
fills up again.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from netserve._core._connections import client_host
from netserve._core._log import RateLimitedLog, get_logger

if TYPE_CHECKING:
    from netserve._core._servers import BaseServer

__all__ = ["BACKOFF_FIRST", "BACKOFF_MAX", "SHED_AFTER", "Acceptor"]

log = get_logger("accept")
limits_log = get_logger("limits")

# The first pause after a failure, and its cap (issue 10's policy): short enough
# that a table freed a moment later costs clients little, long enough that a
# full table costs the server next to no CPU.
BACKOFF_FIRST = 0.01
BACKOFF_MAX = 1.0
# How long the table must stay full before waiting clients are turned away.
SHED_AFTER = 1.0
# Connections closed per shedding pass: bounded, so that a flood cannot hold
# the loop, and large enough to clear a default backlog in a few passes.
SHED_BATCH = 128

# accept(2), Linux notes: "Linux accept() passes already-pending network errors
# on the new socket as an error code from accept() ... treat them like EAGAIN
# by retrying": ENETDOWN, EPROTO, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH,
# EOPNOTSUPP, ENETUNREACH. EPERM: firewall rules forbid the connection.
_SKIPPED = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EINTR",
        "EPERM",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)
_TABLE_FULL = frozenset((errno.EMFILE, errno.ENFILE))
_NO_MEMORY = frozenset((errno.ENOBUFS, errno.ENOMEM))


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class Acceptor:
    """The accept side of one server: batches, the error policy, the reserve."""

    __slots__ = (
        "_delay",
        "_foreign_process",
        "_full_since",
        "_log_full",
        "_log_limited",
        "_log_memory",
        "_log_other",
        "_log_shed",
        "_reserve",
        "_server",
        "_serving",
        "_stream",
        "paused_until",
    )

    def __init__(self, server: BaseServer) -> None:
        self._server = server
        clock = server._netserve_table.clock
        self._log_full = RateLimitedLog(log, logging.WARNING, clock=clock)
        self._log_memory = RateLimitedLog(log, logging.WARNING, clock=clock)
        self._log_other = RateLimitedLog(log, logging.ERROR, clock=clock)
        self._log_shed = RateLimitedLog(log, logging.WARNING, clock=clock)
        self._log_limited = RateLimitedLog(limits_log, logging.INFO, clock=clock)
        sock = getattr(server, "socket", None)
        self._stream = sock is not None and sock.type == socket.SOCK_STREAM
        # A process_request() of the user's own may handle the request itself
        # (the stdlib's documented body: finish_request(), shutdown_request())
        # instead of calling netserve's, which counts it out: see _counted().
        process = getattr(type(server), "process_request", None)
        self._foreign_process = not getattr(process, "__module__", "").startswith("netserve.")
        self._delay = 0.0
        self._full_since: float | None = None
        self._reserve: int | None = None
        # The reserve is held only while a loop serves (open() to close()).
        self._serving = False
        #: While the clock is below this, the loop does not watch the listener.
        self.paused_until = 0.0

    # -- the reserve descriptor, held while a loop serves --------------------------------

    def open(self) -> None:
        """Take the reserve descriptor (a loop starts serving)."""
        self._serving = True
        if self._reserve is None:
            self._reserve = _open_reserve()
            if self._reserve is None:
                log.warning("no reserve descriptor: the descriptor table is already full")

    def close(self) -> None:
        """Give the reserve back (the loop stops); the back-off starts afresh."""
        self._serving = False
        reserve, self._reserve = self._reserve, None
        if reserve is not None:
            os.close(reserve)
        self._delay = 0.0
        self._full_since = None
        self.paused_until = 0.0

    # -- accepting ---------------------------------------------------------------------

    def accept(self, batch: int) -> float | None:
        """Take up to ``batch`` requests; return seconds to stop watching, or None."""
        server = self._server
        table = server._netserve_table
        # Datagram servers are exempt from the connection limits (issue 11).
        stream = self._stream
        limit = server.max_connections if stream else None
        per_client = server.max_connections_per_client if stream else None
        proxy = server._netserve_proxy
        # Behind the PROXY protocol a client is known only after its header: the
        # runner counts it then (the limit is per original client, issue 11),
        # except where requests run in forked children, whose counts the
        # server never sees: there the proxy's address is what is counted.
        if per_client is not None and proxy is not None and not server._netserve_forks_requests:
            per_client = None
        for _ in range(batch):
            if limit is not None and table.active >= limit:
                return None  # the loop stops watching (see _servers)
            try:
                request, client_address = server.get_request()
            except OSError as exc:
                code = exc.errno
                if code in _SKIPPED:
                    continue
                if code is None or code == errno.EAGAIN or isinstance(exc, BlockingIOError):
                    return None  # nothing left to take (or a timed-out listener)
                if server._netserve_stop.requested():
                    return None  # close() closed the listener under this batch
                return self._failed(exc)
            if self._delay:
                self._recovered()
            # The stdlib's chain, here and nowhere else (no call of our own in
            # between: this runs for every connection).
            table.accept(request)
            try:
                if per_client is not None and not self.admit(request, client_address, per_client):
                    server.shutdown_request(request)
                elif proxy is not None and not proxy.trusts(client_address):
                    # The PROXY protocol's trusted peers: checked in verify_request's
                    # place, so that an override of it cannot skip the check.
                    table.refuse(request)
                    server.shutdown_request(request)
                elif server.verify_request(request, client_address):
                    server.process_request(request, client_address)
                    if self._foreign_process:
                        self._counted(request)
                else:
                    table.refuse(request)
                    server.shutdown_request(request)
            except Exception:
                server.handle_error(request, client_address)
                table.finish_if_held(request, error=True)
                server.shutdown_request(request)
            except BaseException:
                # The request runner (sync) has counted and shut it down already.
                if table.finish_if_held(request, error=True):
                    server.shutdown_request(request)
                raise
        return None

    def _counted(self, request: Any) -> None:
        """After a process_request() of the user's own: a connection it closed
        without netserve's runner (which counts a request out before closing
        it) was handled there, and is counted out now, or ``active`` and
        ``wait_closed()`` would wait for it for ever."""
        if isinstance(request, socket.socket) and request.fileno() == -1:
            self._server._netserve_table.finish_if_held(request, error=False)

    def admit(self, request: Any, client_address: Any, per_client: int) -> bool:
        """Count a connection against its host's limit; False when it is over
        (the table has counted it out as refused). At accept, or after the
        PROXY header for the original client (``BaseServer``'s runner)."""
        host = client_host(client_address)
        if host is None or self._server._netserve_table.admit(request, host, per_client):
            return True
        self._log_limited.event(
            "refused a connection from %s: %d connections open from it "
            "(max_connections_per_client)",
            host,
            per_client,
        )
        return False

    # -- failures ----------------------------------------------------------------------

    def _failed(self, exc: OSError) -> float:
        server = self._server
        table = server._netserve_table
        table.accept_failed()
        now = table.clock()
        code = exc.errno
        name = errno.errorcode.get(code or 0, str(code))
        if code in _TABLE_FULL:
            self._log_full.event(
                "accept() failed with %s (%s): the descriptor table is full; "
                "pausing accepts and backing off",
                name,
                exc.strerror,
            )
            if self._full_since is None:
                self._full_since = now
            elif now - self._full_since >= SHED_AFTER:
                self._shed()
        elif code in _NO_MEMORY:
            self._log_memory.event(
                "accept() failed with %s (%s): the kernel is short of memory; backing off",
                name,
                exc.strerror,
            )
        else:
            self._log_other.event("accept() failed unexpectedly: %r; backing off", exc)
        if self._reserve is None and self._serving:
            self._reserve = _open_reserve()
        self._delay = min(BACKOFF_MAX, self._delay * 2) if self._delay else BACKOFF_FIRST
        self.paused_until = now + self._delay
        return self._delay

    def _recovered(self) -> None:
        self._delay = 0.0
        self._full_since = None
        self.paused_until = 0.0
        if self._reserve is None and self._serving:
            self._reserve = _open_reserve()

    def _shed(self) -> None:
        """Accept and close what waits in the backlog, on the reserve descriptor."""
        listener = getattr(self._server, "socket", None)
        reserve = self._reserve
        # Only a non-blocking listener: a blocking accept() on an empty backlog
        # would hang the loop (handle_request() keeps the stdlib's blocking one).
        if reserve is None or listener is None or listener.gettimeout() != 0.0:
            return
        os.close(reserve)
        self._reserve = None
        table = self._server._netserve_table
        shed = 0
        try:
            for _ in range(SHED_BATCH):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    break
                conn.close()
                shed += 1
        finally:
            self._reserve = _open_reserve() if self._serving else None
            if self._reserve is None and self._serving:
                log.warning(
                    "the reserve descriptor was lost to another use: clients cannot be "
                    "turned away promptly while the table stays full"
                )
        for _ in range(shed):
            table.shed()
        if shed:
            self._log_shed.event(
                "turned away %d waiting connection(s) while the descriptor table was full", shed
            )
