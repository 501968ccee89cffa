"""Time-outs on the connections of the thread models, and what a request's end means.

Theory of operation
-------------------
The thread models (sync, threading, forking, the pool) hand their handlers a
blocking socket. netserve's time-outs on it (issue 11: park before the first
byte, idle between reads, write without progress, the connection's age) are
the kernel's ``SO_RCVTIMEO`` and ``SO_SNDTIMEO``, so a blocking call costs no
extra system call: a ``settimeout()`` socket polls before every call. A wait
that runs out fails with EAGAIN, which ``TimedSocket`` turns into
``ConnectionTimeout`` where the handler waits. Both kernel time-outs restart
with each call: ``recv()`` waits at most the idle time for *some* bytes, and
a send returns what it could send once the write time-out has passed, so a
slow reader that keeps reading is never cut off; one that reads nothing is cut
off after two or three write time-outs (the call that fills the buffers waits
one out before it returns). The listener carries the time-outs, and TCP
connections inherit them (``TimedAccept``); ``rfile`` and ``wfile`` call the
socket's C methods directly (``_TimedRaw``, ``_TimedWriter``), so a handler's
reads and writes cost no Python call more than the stdlib's.

A time-out the handler sets itself (``settimeout()``, as
``StreamRequestHandler.timeout`` does) makes the socket the stdlib's again:
Python then waits with poll() and raises the stdlib's ``TimeoutError``, which
reaches ``handle_error()`` as it always did; the kernel's time-outs do not
apply to a non-blocking socket. The age limit is checked before every call
and bounds each wait (one ``setsockopt`` per call, only while it is set), the
handler's own time-out included (``AgedSocket``).

The hub's ``GreenSocket`` enforces the same settings on its own waits.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from netserve._core._connections import DISCONNECTED, FAILED, LINE_TOO_LONG, timed_out
from netserve._core._errors import ConnectionTimeout, LineTooLong
from netserve._core._handlers import _SendallWriter

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer as Buffer
    from _typeshed import WriteableBuffer

__all__ = ["AgedSocket", "TimedAccept", "TimedSocket", "Timeouts", "age_reached", "fault_of"]

#: (park, idle, write, age): a new connection's time-outs, in seconds or None.
Timeouts = tuple[float | None, float | None, float | None, float | None]

_T = TypeVar("_T")


def age_reached() -> ConnectionTimeout:
    """What a wait raises once ``max_connection_age`` has passed (thread models)."""
    return ConnectionTimeout("the connection reached its maximum age", "max_connection_age")


# struct timeval, as SO_RCVTIMEO and SO_SNDTIMEO take it (time_t, suseconds_t).
_TIMEVAL = struct.Struct("@ll")
_NO_TIMEOUT = _TIMEVAL.pack(0, 0)
_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))
# os.sendfile() takes at most this much per call (a bound, not a buffer).
_SENDFILE_CHUNK = 1 << 30

# What a peer that goes away raises in a handler (ConnectionRefusedError is
# a client's error, never a server's).
_DISCONNECTS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def _timeval(seconds: float | None) -> bytes:
    if seconds is None:
        return _NO_TIMEOUT
    whole = int(seconds)
    micros = int((seconds - whole) * 1_000_000)
    # A zero timeval means "never": the shortest real time-out is 1 us.
    return _TIMEVAL.pack(whole, max(micros, 1) if whole == 0 else micros)


def fault_of(exc: BaseException) -> int:
    """How an exception that ended a handler counts: TIMED_OUT (with its kind)
    for netserve's time-outs, DISCONNECTED or LINE_TOO_LONG for a client's fault (still a
    FAILED request when it is reported), FAILED for anything else."""
    if isinstance(exc, ConnectionTimeout):
        return timed_out(exc.setting)
    if isinstance(exc, _DISCONNECTS):
        return DISCONNECTED
    if isinstance(exc, LineTooLong):
        return LINE_TOO_LONG
    return FAILED


# struct linger {l_onoff = 1, l_linger = 0}: close() resets the connection.
_LINGER_RESET = struct.pack("ii", 1, 0)


def discard_unsent(sock: object) -> None:
    """Make the coming close of ``sock`` a reset that drops what the peer has
    not read (``SO_LINGER`` on, zero seconds). After a write time-out the
    reply is cut anyway: a plain close would leave the kernel sending the
    rest (megabytes) to a peer that does not read, and the peer would take
    the cut reply, ended by a normal end of stream, for a whole one."""
    # A socket, or the hub's TLS stream, which passes it to its socket.
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is not None:
        try:
            setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass  # closed already, or not a TCP socket: nothing is queued to drop


class TimedSocket(socket.socket):
    """A connected stream socket whose blocking calls time out as the server says.

    Made by ``accept_timed()``; everything else about it is ``socket.socket``.
    """

    __slots__ = ("_ns_clock", "_ns_deadline", "_ns_idle", "_ns_park", "_ns_quiet", "_ns_write")

    _ns_clock: Callable[[], float]
    _ns_deadline: float | None
    _ns_idle: float | None
    _ns_park: float | None
    # True until the first bytes arrive, while the park time-out differs from
    # the idle one (the receive time-out then changes once).
    _ns_quiet: bool
    _ns_write: float | None

    def _ns_arm(
        self,
        timeouts: Timeouts,
        clock: Callable[[], float],
        *,
        kernel: bool = True,
    ) -> None:
        """Take ``timeouts``; set the kernel's unless the socket has them already
        (``kernel=False``: inherited from its listener, see ``TimedAccept``)."""
        park, idle, write, age = timeouts
        self._ns_park = park
        self._ns_idle = idle
        self._ns_write = write
        self._ns_clock = clock
        self._ns_deadline = None if age is None else clock() + age
        self._ns_quiet = park != idle
        if kernel:
            first, write = _kernel_timeouts(timeouts)
            self.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(first))
            self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(write))

    def dup(self) -> TimedSocket:
        """A duplicate with the same time-outs (the kernel's are shared)."""
        sock = super().dup()
        timeouts = (self._ns_park, self._ns_idle, self._ns_write, None)
        sock._ns_arm(timeouts, self._ns_clock, kernel=False)
        sock._ns_deadline = self._ns_deadline
        return sock

    # -- the time-outs -------------------------------------------------------------------

    def _ns_bound(self, option: int, limit: float | None) -> None:
        """Bound the next wait by the age limit too (only while one is set; for a
        socket without a time-out of the handler's own, see ``AgedSocket``)."""
        deadline = self._ns_deadline
        if deadline is None:
            return
        remaining = deadline - self._ns_clock()
        if remaining <= 0:
            raise age_reached()
        bound = remaining if limit is None else min(limit, remaining)
        self.setsockopt(socket.SOL_SOCKET, option, _timeval(bound))

    def _ns_expired(self, writing: bool) -> ConnectionTimeout:
        deadline = self._ns_deadline
        if deadline is not None and self._ns_clock() >= deadline:
            return age_reached()
        if writing:
            return ConnectionTimeout(
                f"the peer read nothing for {self._ns_write} s", "write_timeout"
            )
        if self._ns_quiet:
            return ConnectionTimeout(
                f"the peer sent nothing in {self._ns_park} s after connecting", "park_timeout"
            )
        return ConnectionTimeout(f"the peer sent nothing for {self._ns_idle} s", "idle_timeout")

    def _ns_spoke(self) -> None:
        self._ns_quiet = False
        self.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self._ns_idle))

    def _ns_timed_out(self, flags: int) -> bool:
        # EAGAIN is a time-out only on a blocking socket asked to wait.
        return super().gettimeout() is None and not flags & _DONTWAIT

    # -- reading -------------------------------------------------------------------------
    # These run for every read and write of a handler: the base class's C methods
    # are called directly (no super() object), and the age limit is a subclass's.

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        try:
            data = _recv(self, bufsize, flags)
        except BlockingIOError:
            if self._ns_timed_out(flags):
                raise self._ns_expired(False) from None
            raise
        if self._ns_quiet and data:
            self._ns_spoke()
        return data

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0, /) -> int:
        try:
            count = _recv_into(self, buffer, nbytes, flags)
        except BlockingIOError:
            if self._ns_timed_out(flags):
                raise self._ns_expired(False) from None
            raise
        if self._ns_quiet and count:
            self._ns_spoke()
        return count

    # -- writing -------------------------------------------------------------------------

    def send(self, data: Buffer, flags: int = 0, /) -> int:
        try:
            return _send(self, data, flags)
        except BlockingIOError:
            if self._ns_timed_out(flags):
                raise self._ns_expired(True) from None
            raise

    def sendall(self, data: Buffer, flags: int = 0, /) -> None:
        try:
            _sendall(self, data, flags)
        except BlockingIOError:
            if self._ns_timed_out(flags):
                raise self._ns_expired(True) from None
            raise

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """As ``socket.sendfile()``, with the write time-out.

        The stdlib's waits for room without a limit once a blocking send has
        timed out: a peer that never reads would hold it forever. Here the
        kernel's copy (``os.sendfile``) runs until the time-out, then raises
        ``ConnectionTimeout``. With a time-out of the handler's own, the
        stdlib's rules apply.
        """
        if self.gettimeout() is not None or not hasattr(os, "sendfile"):
            return super().sendfile(file, offset, count)
        sent = 0
        try:
            source = file.fileno()
            while count is None or sent < count:
                if self._ns_deadline is not None:
                    self._ns_bound(socket.SO_SNDTIMEO, self._ns_write)
                chunk = _SENDFILE_CHUNK if count is None else min(_SENDFILE_CHUNK, count - sent)
                try:
                    done = os.sendfile(self.fileno(), source, offset + sent, chunk)
                except BlockingIOError:
                    raise self._ns_expired(True) from None
                if not done:
                    break  # the end of the file
                sent += done
        finally:
            if sent and hasattr(file, "seek"):
                file.seek(offset + sent)  # where a file read by send() would be
        return sent

    # The calls rfile and wfile make (TimedSocket's own: the C methods, with no
    # Python call in between; AgedSocket's bound the wait by the age first).
    _ns_recv_into = socket.socket.recv_into
    _ns_sendall = socket.socket.sendall

    def _netserve_raw_reader(self) -> _TimedRaw:
        return _TimedRaw(self)

    def _netserve_sendall_writer(self) -> _TimedWriter:
        return _TimedWriter(self)


class _TimedRaw(io.RawIOBase):
    """``rfile``'s raw file over a ``TimedSocket`` (see ``_lines.open_reader``).

    It does what the stdlib's socket file does for a blocking socket (read
    into the buffer, 0 at the end of the stream), through the socket's
    time-outs, in the one Python call the socket file makes anyway.
    """

    def __init__(self, sock: TimedSocket) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._sock.fileno()

    def readinto(self, buffer: WriteableBuffer, /) -> int | None:
        sock = self._sock
        try:
            count = sock._ns_recv_into(buffer)
        except BlockingIOError:
            if sock._ns_timed_out(0):
                raise sock._ns_expired(False) from None
            return None  # a non-blocking socket with nothing to read yet
        if sock._ns_quiet and count:
            sock._ns_spoke()
        return count


class AgedSocket(TimedSocket):
    """A ``TimedSocket`` whose every wait is also bounded by the connection's age.

    A time-out of the handler's own (``settimeout()``) replaces the idle and
    write time-outs, not the age limit: a wait that the age would end first
    runs with the age's remaining time, and raises ``ConnectionTimeout`` for it
    (``max_connection_age`` closes a connection "whatever it does", the
    slow-client rule's bound; docs/limits.md).
    """

    __slots__ = ()

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        limit = self._ns_park if self._ns_quiet else self._ns_idle
        return self._ns_aged(TimedSocket.recv, socket.SO_RCVTIMEO, limit, bufsize, flags)

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0, /) -> int:
        limit = self._ns_park if self._ns_quiet else self._ns_idle
        return self._ns_aged(
            TimedSocket.recv_into, socket.SO_RCVTIMEO, limit, buffer, nbytes, flags
        )

    def send(self, data: Buffer, flags: int = 0, /) -> int:
        return self._ns_aged(TimedSocket.send, socket.SO_SNDTIMEO, self._ns_write, data, flags)

    def sendall(self, data: Buffer, flags: int = 0, /) -> None:
        self._ns_aged(TimedSocket.sendall, socket.SO_SNDTIMEO, self._ns_write, data, flags)

    def _ns_aged(self, call: Callable[..., _T], option: int, limit: float | None, *args: Any) -> _T:
        """``call`` with its wait bounded by the age: the kernel's time-out
        ``option`` at most ``limit``; or, under a time-out of the handler's own,
        that time-out cut short by the age."""
        own = self.gettimeout()
        if own is None:
            self._ns_bound(option, limit)
            return call(self, *args)
        deadline = self._ns_deadline
        assert deadline is not None  # an AgedSocket has an age limit
        remaining = deadline - self._ns_clock()
        if remaining <= 0:
            raise age_reached()
        if own <= remaining:
            return call(self, *args)  # the handler's time-out comes first
        self.settimeout(remaining)
        try:
            return call(self, *args)
        except TimeoutError:
            raise age_reached() from None
        finally:
            self.settimeout(own)

    # rfile and wfile go through the age bound too.
    _ns_recv_into = recv_into  # type: ignore[assignment]
    _ns_sendall = sendall


class _TimedWriter(_SendallWriter):
    """``wfile`` (unbuffered) over a ``TimedSocket``: its sendall, its time-out."""

    def __init__(self, sock: TimedSocket) -> None:
        super().__init__(sock)
        self._sendall = sock._ns_sendall

    def _would_block(self) -> None:
        sock: Any = self._sock
        if sock._ns_timed_out(0):
            raise sock._ns_expired(True) from None


_recv = socket.socket.recv
_recv_into = socket.socket.recv_into
_send = socket.socket.send
_sendall = socket.socket.sendall


def _kernel_timeouts(timeouts: Timeouts) -> tuple[float | None, float | None]:
    """The receive and send time-outs a new connection's socket starts with."""
    park, idle, write, _ = timeouts
    return (park if park != idle else idle), write


class TimedAccept:
    """Accepts connections as ``TimedSocket``s, for one listener.

    Linux copies a TCP listener's ``SO_RCVTIMEO`` and ``SO_SNDTIMEO`` to each
    connection as the connection is set up (not a Unix socket's): set on the
    listener, they cost an accept no system call (each ``setsockopt`` costs
    about 2 us on the benchmarks' VM, a tenth of a short connection's time).
    Connections set up before the listener got its values do not have them:
    the server arms the listener before it listens (``arm()``), and after a
    later change the next ``backlog`` connections (all that can have been
    waiting) are checked one by one and given their values where they lack
    them. Elsewhere every connection gets its values itself. The listener's own
    time-outs matter only to a blocking ``accept()``, which the serving loop
    never makes (its listener is non-blocking while it serves).
    """

    __slots__ = ("_armed_for", "_kind", "_listener_has", "_unsure")

    def __init__(self) -> None:
        # The (receive, send) time-outs set on the listener, if any.
        self._listener_has: tuple[float | None, float | None] | None = None
        # The time-outs arm() last saw: an accept with the same skips it.
        self._armed_for: Timeouts | None = None
        # How many more connections may predate the listener's values.
        self._unsure = 0
        # The listener's (family, type, proto) as plain ints, read once: each
        # read of socket.family builds an enum member (three Python calls).
        self._kind: tuple[int, int, int] | None = None

    def arm(self, listener: socket.socket, timeouts: Timeouts, backlog: int) -> None:
        """Give the listener the time-outs its connections inherit; ``backlog``:
        how many connections may already be waiting (0 before ``listen()``)."""
        self._armed_for = timeouts
        if not _INHERITS or listener.family not in _INHERITING:
            return
        wanted = _kernel_timeouts(timeouts)
        if wanted != self._listener_has:
            receive, send = wanted
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(receive))
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send))
            self._listener_has = wanted
            self._unsure = backlog

    def __call__(
        self,
        listener: socket.socket,
        timeouts: Timeouts,
        clock: Callable[[], float],
        backlog: int,
    ) -> tuple[TimedSocket, Any]:
        """Accept one connection armed with ``timeouts`` (park, idle, write, age),
        blocking as ``socket.accept()`` leaves it."""
        if timeouts != self._armed_for:
            self.arm(listener, timeouts, backlog)
        kind = self._kind
        if kind is None:
            kind = self._kind = (int(listener.family), int(listener.type), listener.proto)
        fd, address = listener._accept()  # type: ignore[attr-defined]
        try:
            if timeouts[3] is None:
                sock = TimedSocket(*kind, fileno=fd)
            else:
                sock = AgedSocket(*kind, fileno=fd)
        except BaseException:
            socket.close(fd)
            raise
        try:
            # As socket.accept(): a listener with a time-out gives blocking sockets.
            if socket.getdefaulttimeout() is None and listener.gettimeout():
                sock.setblocking(True)
            # (_listener_has is set only where connections inherit.)
            inherited = self._listener_has is not None
            if inherited and self._unsure:
                self._unsure -= 1
                inherited = _same_timeouts(listener, sock)
            sock._ns_arm(timeouts, clock, kernel=not inherited)
        except BaseException:
            sock.close()
            raise
        return sock, address

    def disarm(self, listener: socket.socket) -> None:
        """Take the time-outs off the listener (no time-out is set any more)."""
        if self._listener_has is not None and listener.fileno() >= 0:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _NO_TIMEOUT)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _NO_TIMEOUT)
        self._listener_has = self._armed_for = None


# Where a listener's time-outs reach the connections it accepts.
_INHERITS = sys.platform == "linux"
_INHERITING = frozenset({socket.AF_INET, socket.AF_INET6})


def _same_timeouts(listener: socket.socket, sock: socket.socket) -> bool:
    return all(
        listener.getsockopt(socket.SOL_SOCKET, option, _TIMEVAL.size)
        == sock.getsockopt(socket.SOL_SOCKET, option, _TIMEVAL.size)
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO)
    )
