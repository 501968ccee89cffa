"""The connection table every model shares: its counters, its clock, its statistics.

Words (docs/architecture.md): a *request* is one handler call, that is one
stream connection or one datagram. A connection is *parked* when it was
accepted and no handler runs yet, and *active* from its accept until it is
closed (parked, in a stage, or in a handler).

Theory of operation
-------------------
The accepting side (the serving loop, or the hub's thread) and the handling
side (request threads, pool workers, greenlets, the forking reaper) both
count here. A connection is *active* while it is in the live set (keyed by
the identity of the request object it was accepted as) or held by a forked
child, and it leaves through exactly one exit, each counted: handled,
refused (closed without a handler, the server's close included), timed out,
or failed in a stage. So neither ``active`` nor ``accepted`` is kept: both
are counted from the set and the exits (``accepted`` is the exits plus the
active). An accept is then a single insert into the set, atomic on its own,
and the accept path, which runs for every connection, takes no lock. Every
exit takes the table's lock (a plain ``+=`` on an attribute is not atomic
across threads, and several handling threads count at once): the lock
itself, not the condition built on it, whose ``with`` runs two Python-level
calls more.

A request counted out under another object than it was accepted as would
stay in the set, and so show as active, never linger unseen; a model that
goes on with a request as another object says so with ``replace()``.

The clock is an attribute so that tests can replace it: everything in netserve
that measures time for its policies (back-offs, deadlines) asks this clock.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DISCONNECTED",
    "FAILED",
    "HANDLED",
    "LINE_TOO_LONG",
    "REFUSED",
    "STAGE_FAILED",
    "TIMED_OUT",
    "TIMEOUT_KINDS",
    "COUNTER_NAMES",
    "ConnectionTable",
    "ServerStatistics",
    "client_host",
    "outcome_base",
    "timed_out",
]

# How a request ended, as the request runner reports it (and a forking child's
# exit status carries it to the parent: 0 and 1 are the stdlib's). The first
# five are exits; the flags below are added to HANDLED or FAILED.
HANDLED, FAILED, STAGE_FAILED, TIMED_OUT = 0, 1, 2, 3
# Refused after its stages, by the server's verify_client().
REFUSED = 4
# The handler ended because the peer went away (a reset, a broken pipe).
DISCONNECTED = 8
# The handler ended on a line longer than the server's max_line_size.
LINE_TOO_LONG = 16


# A time-out's kind rides in its outcome's high bits (TIMED_OUT | index << 5),
# so that it reaches the counters from every model, a forked child's exit
# status (at most 255) included: the setting that ran out, by index; "" when
# not known. They are counted apart in ``ServerStatistics.timeouts_by_kind``.
TIMEOUT_KINDS = (
    "",
    "stage_timeout",
    "park_timeout",
    "idle_timeout",
    "write_timeout",
    "max_connection_age",
)
_KIND_SHIFT = 5
_BASE = 7


def timed_out(setting: str | None) -> int:
    """The outcome of a connection ended by the time-out ``setting`` (the
    attribute's name, as ``ConnectionTimeout.setting`` gives it)."""
    try:
        kind = TIMEOUT_KINDS.index(setting or "")
    except ValueError:
        kind = 0
    return TIMED_OUT | kind << _KIND_SHIFT


_STAGE_TIMED_OUT = timed_out("stage_timeout")
_PARK_TIMED_OUT = timed_out("park_timeout")


def outcome_base(outcome: int) -> int:
    """HANDLED, FAILED, STAGE_FAILED or TIMED_OUT, without flags or kind."""
    return outcome & _BASE


# The exit statuses a forked child's runner reports.
_CHILD_OUTCOMES = frozenset(
    {HANDLED, FAILED, STAGE_FAILED, REFUSED}
    | {TIMED_OUT | kind << _KIND_SHIFT for kind in range(len(TIMEOUT_KINDS))}
    | {base | flag for base in (HANDLED, FAILED) for flag in (DISCONNECTED, LINE_TOO_LONG)}
)


def client_host(client_address: Any) -> str | None:
    """The source host a per-client limit counts, or None (a Unix socket's peer)."""
    if type(client_address) is not tuple or not client_address:
        return None
    host = client_address[0]
    if not isinstance(host, str):
        return None
    # An IPv4 client on a dual-stack listener is the same client as on IPv4.
    return host[7:] if host.startswith("::ffff:") and "." in host else host


#: The fields of ``ServerStatistics`` that only grow (what a supervisor sums
#: over its workers, and keeps past them: ``_figures``).
COUNTER_NAMES = (
    "accepted",
    "refused",
    "handled",
    "errors",
    "timeouts",
    "stage_failures",
    "accept_errors",
    "disconnects",
    "lines_too_long",
    "limited",
)


@dataclass(frozen=True)
class ServerStatistics:
    """A snapshot of a server's counters, from ``statistics()``.

    Counters only grow; ``active``, ``parked`` and ``accepting`` describe now.
    """

    #: Connections (or datagrams) taken off the listener, refused ones included.
    accepted: int = 0
    #: Of those, closed without a handler: ``verify_request()`` or
    #: ``verify_client()`` said no, the server shed them while its descriptor
    #: table was full, or it closed them as it closed (parked, or still queued
    #: at ``abort_connections()``).
    refused: int = 0
    #: Requests whose handler finished, with or without an error.
    handled: int = 0
    #: Requests whose handler raised (reported through ``handle_error()``, or
    #: ``threading.excepthook`` for a ``SystemExit`` in the pool or the hub).
    errors: int = 0
    #: Connections closed by one of netserve's own time-outs (park, idle, write,
    #: age, stage), in a handler or before one.
    timeouts: int = 0
    #: Connections closed because a stage rejected the peer (a bad header, a
    #: failed handshake, a peer gone mid-stage).
    stage_failures: int = 0
    #: ``accept()`` failures other than "nothing to accept" and aborted clients.
    accept_errors: int = 0
    #: Of ``handled``, requests that ended because the peer went away (a reset,
    #: a broken pipe).
    disconnects: int = 0
    #: Of ``handled``, requests that ended on a line past ``max_line_size``.
    lines_too_long: int = 0
    #: Of ``refused``, connections closed at once by ``max_connections_per_client``.
    limited: int = 0
    #: Connections accepted and not yet closed (parked, in a stage, in a handler).
    active: int = 0
    #: Of those, accepted and waiting for their first byte, with no handler yet.
    parked: int = 0
    #: Whether the serving loop watches its listener now.
    accepting: bool = False
    #: Whether accepting is paused now because ``max_connections`` are open.
    at_limit: bool = False
    #: ``timeouts`` by the setting that ran out (``"idle_timeout"`` ...; ``""``
    #: when not known): only the kinds seen so far.
    timeouts_by_kind: Mapping[str, int] = field(default_factory=dict)


class ConnectionTable:
    """Counters shared by the accepting and the handling side of one server, and
    the stream connections it holds open (what ``abort_connections()`` ends)."""

    __slots__ = (
        "_changed",
        "_detached",
        "_host_of",
        "_hosts",
        "_limit_wake",
        "_live",
        "_lock",
        "_paused_at",
        "accept_errors",
        "clock",
        "disconnects",
        "errors",
        "handled",
        "limited",
        "lines_too_long",
        "refused",
        "stage_failures",
        "timeouts",
        "timeouts_by_kind",
    )

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        # Signalled (under _lock) when the last active connection leaves.
        self._changed = threading.Condition(self._lock)
        # Every request in progress, by identity (a datagram request is a tuple,
        # and two identical datagrams are two requests).
        self._live: dict[int, Any] = {}
        self.clock = clock
        self.refused = 0
        self.handled = 0
        self.errors = 0
        self.timeouts = 0
        self.timeouts_by_kind = [0] * len(TIMEOUT_KINDS)
        self.stage_failures = 0
        self.accept_errors = 0
        self.disconnects = 0
        self.lines_too_long = 0
        self.limited = 0
        # Connections handed to forked children, not yet reaped.
        self._detached = 0
        # Per-client counting, used only while a per-client limit is set: live
        # connections per source host, and the host of each counted request.
        self._hosts: dict[str, int] = {}
        self._host_of: dict[int, str] = {}
        # max_connections: the count below which _limit_wake is called, once.
        self._paused_at = 0
        self._limit_wake: Callable[[], None] | None = None

    # -- a connection's life: accept, then exactly one way out ---------------------------

    def accept(self, request: Any) -> None:
        """A connection or datagram was taken off the listener."""
        # One insert, atomic on its own: no lock (see the theory above).
        self._live[id(request)] = request

    def admit(self, request: Any, host: str, limit: int) -> bool:
        """Count an accepted connection against its host's ``limit``; False (and
        counted out as refused) when the host already holds that many."""
        with self._lock:
            held = self._hosts.get(host, 0)
            if held >= limit:
                self.refused += 1
                self.limited += 1
                wake = self._leave_locked(request)
            else:
                self._hosts[host] = held + 1
                self._host_of[id(request)] = host
                return True
        if wake is not None:
            wake()
        return False

    def finish(self, request: Any, outcome: int = HANDLED) -> None:
        """A request's handler is done (its connection is being shut down).

        Once per request: one counted out already is not counted again."""
        with self._lock:
            # _leave_locked(), without its two calls: this runs for every request.
            key = id(request)
            if self._live.pop(key, None) is None:
                return
            if outcome:
                self._count_locked(outcome)
            else:
                self.handled += 1
            if self._host_of:
                self._forget_host_locked(key)
            active = len(self._live) + self._detached
            if not active:
                self._changed.notify_all()
            wake = self._limit_wake
            if wake is None or active >= self._paused_at:
                return
            self._limit_wake = None
        wake()

    def refuse(self, request: Any) -> None:
        """An accepted connection was closed without a handler (refused by
        ``verify_request()``, or closed as the server closed or aborted)."""
        with self._lock:
            self.refused += 1
            wake = self._leave_locked(request)
        if wake is not None:
            wake()

    def stage_failed(self, request: Any, *, timed_out: bool) -> None:
        """A connection's stages failed (or ran out of time) before its handler."""
        self.finish(request, _STAGE_TIMED_OUT if timed_out else STAGE_FAILED)

    def finish_if_held(self, request: Any, *, error: bool) -> bool:
        """``finish()`` unless the request was already counted out; says which."""
        with self._lock:
            if id(request) not in self._live:
                return False
            self._count_locked(FAILED if error else HANDLED)
            wake = self._leave_locked(request)
        if wake is not None:
            wake()
        return True

    def time_out(self, request: Any) -> None:
        """A parked connection, with no handler yet, was closed by ``park_timeout``."""
        self.finish(request, _PARK_TIMED_OUT)

    def _count_locked(self, outcome: int) -> None:
        base = outcome & _BASE
        if base == TIMED_OUT:
            self.timeouts += 1
            self.timeouts_by_kind[outcome >> _KIND_SHIFT] += 1
        elif base == STAGE_FAILED:
            self.stage_failures += 1
        elif outcome == REFUSED:
            self.refused += 1
        else:
            self.handled += 1
            if outcome & FAILED:
                self.errors += 1
            if outcome & DISCONNECTED:
                self.disconnects += 1
            if outcome & LINE_TOO_LONG:
                self.lines_too_long += 1

    def _leave_locked(self, request: Any) -> Callable[[], None] | None:
        """Take a request out of the live set; returns the max_connections wake-up
        to call (after the lock) when this made room."""
        key = id(request)
        self._live.pop(key, None)
        if self._host_of:
            self._forget_host_locked(key)
        return self._left_locked()

    def _left_locked(self) -> Callable[[], None] | None:
        active = len(self._live) + self._detached
        if not active:
            self._changed.notify_all()
        if self._limit_wake is not None and active < self._paused_at:
            wake, self._limit_wake = self._limit_wake, None
            return wake
        return None

    def _forget_host_locked(self, key: int) -> None:
        host = self._host_of.pop(key, None)
        if host is not None:
            held = self._hosts[host] - 1
            if held:
                self._hosts[host] = held
            else:
                del self._hosts[host]

    # -- max_connections -----------------------------------------------------------------

    def pause_at_limit(self, limit: int, wake: Callable[[], None]) -> bool:
        """True when ``limit`` connections are active: ``wake`` is then called once,
        from whichever thread counts one out below the limit. False (and nothing
        armed) below it. Checked and armed under the lock: no exit is missed."""
        with self._lock:
            if len(self._live) + self._detached < limit:
                self._limit_wake = None
                return False
            self._paused_at = limit
            self._limit_wake = wake
            return True

    def counts_hosts(self) -> bool:
        """Whether some live connection is counted against its host."""
        return bool(self._host_of)

    def at_limit(self) -> bool:
        """Whether a ``pause_at_limit()`` is armed now."""
        return self._limit_wake is not None

    def replace(self, request: Any, new: Any) -> None:
        """The model goes on with an accepted request as another object (the hub's
        cooperative view of a socket): ``new`` is the one that will be counted out."""
        with self._lock:
            if self._live.pop(id(request), None) is not None:
                self._live[id(new)] = new
                host = self._host_of.pop(id(request), None)
                if host is not None:
                    self._host_of[id(new)] = host

    # -- forking: the child holds the connection, the parent counts it -----------------

    def detach(self, request: Any) -> None:
        """The connection is now a child process's; it stays active until reaped."""
        with self._lock:
            # Still a connection of its host's while the child holds it: the
            # host is forgotten when the child is reaped (by pid, see below).
            self._live.pop(id(request), None)
            self._detached += 1

    def finish_detached(self, outcome: int, request_key: int | None = None) -> None:
        """A child process that handled a detached connection was reaped; its
        exit status is the runner's outcome (any other status is a failure)."""
        with self._lock:
            if outcome not in _CHILD_OUTCOMES:
                outcome = FAILED
            self._count_locked(outcome)
            self._detached -= 1
            if request_key is not None and self._host_of:
                self._forget_host_locked(request_key)
            wake = self._left_locked()
        if wake is not None:
            wake()

    # -- counted apart from a connection -------------------------------------------------

    def shed(self) -> None:
        """A request was taken off the listener only to be dropped (a connection
        while the descriptor table was full, a datagram too long to hand over)."""
        with self._lock:
            self.refused += 1

    def error(self) -> None:
        """A handler's exception was reported after ``finish()`` counted the request."""
        with self._lock:
            self.errors += 1

    def accept_failed(self) -> None:
        with self._lock:
            self.accept_errors += 1

    # -- reading -------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Connections accepted and not yet gone (read it under the lock)."""
        return len(self._live) + self._detached

    @property
    def accepted(self) -> int:
        """Connections and datagrams taken off the listener (read it under the lock)."""
        return self._ended() + self.active

    def _ended(self) -> int:
        return self.handled + self.refused + self.timeouts + self.stage_failures

    def counters(self) -> dict[str, Any]:
        """The counters, read together (``ServerStatistics``' names)."""
        with self._lock:
            # An accept adds to the live set without the lock: read it once.
            active = self.active
            by_kind = zip(TIMEOUT_KINDS, self.timeouts_by_kind, strict=True)
            return {
                "timeouts_by_kind": {kind: count for kind, count in by_kind if count},
                "accepted": self._ended() + active,
                "refused": self.refused,
                "handled": self.handled,
                "errors": self.errors,
                "timeouts": self.timeouts,
                "stage_failures": self.stage_failures,
                "accept_errors": self.accept_errors,
                "disconnects": self.disconnects,
                "lines_too_long": self.lines_too_long,
                "limited": self.limited,
                "active": active,
            }

    def live(self) -> list[socket.socket]:
        """The stream connections this process holds open now."""
        with self._lock:
            # Copied in one call: an accept may add to the set meanwhile.
            requests = list(self._live.values())
        return [r for r in requests if isinstance(r, socket.socket)]

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no connection is active; False if ``timeout`` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self.active <= 0, timeout)
