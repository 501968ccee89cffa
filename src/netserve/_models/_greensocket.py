"""GreenSocket: the cooperative socket of the hub.

A ``socket.socket`` whose waits (recv, send, ...) suspend the calling handler
greenlet and let the hub run the others, with the stdlib's timeout semantics
(``settimeout``/``gettimeout``, ``TimeoutError``). At the system level it is
always non-blocking. It talks to the kernel (``_hub``) only through the
kernel's interface: ``Hub.register``/``forget``/``notify_closing``, the one wait
(``Hub.wait_readable``/``wait_writable`` with a deadline on ``Hub.clock``), and
the four ``hub_*`` attributes of ``HubSocket``, which it carries.

Theory of operation: one wait path for reads
--------------------------------------------
Every read that may wait (recv, recv_into, a peek, rfile's reads in
``_greenfile``) takes the same steps: wait for the next read edge only if the
readable hint says so, read, and on a short read clear the hint (rule 2 of
``_hub``).

A peek (``MSG_PEEK``) consumes nothing, so a short peek cannot clear the hint:
the bytes are still there for the next read. Yet a handler that peeks until a
whole header has come asks again and again, and would get the same bytes at
once, forever: the hub would spin in that handler and serve no one else. So a
short peek leaves a mark in the hint, ``_PEEKED``: still true (a read takes
those bytes at once), but a peek that finds it waits for the next read edge,
since nothing new has come since the last peek. Any edge (new bytes) sets the
hint back to True; so does any read that consumes (a short one clears it).
Once the peer has hung up no edge will come: a peek then returns the same bytes
at once, as a plain socket's would, but yields to the hub first so that the
others are served meanwhile. The socket's timeout bounds the wait as it bounds
a read's.

Limits (issue 11)
-----------------
A socket made by a server carries the server's wait limits (``hub_limits``,
rule 6 of ``_hub``): while it has no timeout of its own, each untimed wait is
held to the first-byte limit (park_timeout) until the peer has sent something,
to the idle limit after that, and each write wait to the write limit; every
wait to the age limit. The hub's sweep enforces them: an expired wait raises
``netserve.ConnectionTimeout``. A timeout the user sets (``settimeout``,
``StreamRequestHandler.timeout``) replaces the read and write limits, with the
stdlib's plain ``TimeoutError``; the age limit still holds. Reads clear
``hub_fresh`` as they go (one store, no test), so that the first-byte limit
ends with the first byte.
"""

from __future__ import annotations

import _socket
import io
import socket
from typing import TYPE_CHECKING, Any

from netserve._models._greenfile import GreenReader, GreenSendallWriter, GreenSocketIO

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from netserve._models._hub import Hub, Limits, Waiter

__all__ = ["GreenSocket"]

# The readable hint after a short peek (see the module's docstring): true, so
# that a read tries at once, and not True, which every edge writes.
_PEEKED = 2

_recv = socket.socket.recv
_recv_into = socket.socket.recv_into
_recvfrom = socket.socket.recvfrom
_recvfrom_into = socket.socket.recvfrom_into
_send = socket.socket.send
_sendto = socket.socket.sendto
_fileno = socket.socket.fileno
_base_setblocking = socket.socket.setblocking
_base_close = _socket.socket.close
_socket_init = _socket.socket.__init__
_MSG_PEEK = socket.MSG_PEEK


class GreenSocket(socket.socket):
    """A socket whose blocking operations suspend the calling greenlet.

    It takes over the descriptor of an accepted socket. At the system level it
    is always non-blocking; ``settimeout()``/``setblocking()`` set what the
    caller sees, as on a plain socket.

    For the layers around it: ``hub`` is the kernel it is registered with;
    ``hub_readable``, ``hub_hangup``, ``hub_reader`` and ``hub_writer`` are the
    kernel's interface on a registered socket (``_hub.HubSocket``);
    ``untimed_stream`` tells its files that a read may take the fast path (a
    stream socket without a timeout: the hint, then an untimed wait).
    ``limits`` (the hub's ``Limits``, or None) are the server's time limits
    for the connection's waits.
    """

    # StreamRequestHandler's wfile when wbufsize == 0.
    _netserve_sendall_writer = GreenSendallWriter

    __slots__ = (
        "_green_timeout",
        "_stream",
        "hub",
        "hub_born",
        "hub_fresh",
        "hub_hangup",
        "hub_limits",
        "hub_read_since",
        "hub_readable",
        "hub_reader",
        "hub_write_since",
        "hub_writer",
        "untimed_stream",
    )

    hub_reader: Waiter | None
    hub_writer: Waiter | None

    def __init__(
        self,
        hub: Hub,
        sock: socket.socket | None = None,
        *,
        fileno: int = -1,
        family: int = -1,
        kind: int = -1,
        proto: int = 0,
        timeout: float | None = None,
        limits: Limits | None = None,
    ) -> None:
        if sock is not None:
            timeout = sock.gettimeout()
            family, kind, proto = sock.family, sock.type, sock.proto
            fileno = sock.detach()
        # socket.socket.__init__'s work, without its Python frame (this runs
        # once per connection): the C constructor, then its two attributes.
        _socket_init(self, family, kind, proto, fileno)
        self._io_refs = 0
        self._closed = False
        _base_setblocking(self, False)
        self.hub = hub
        self.hub_reader = None
        self.hub_writer = None
        # Unknown at first, so the first read tries at once (rule 2 of _hub).
        self.hub_readable: int = True
        self.hub_hangup = False
        # Rule 6 of _hub: the limits, and the ticks they count from.
        self.hub_limits = limits
        self.hub_born = self.hub_read_since = self.hub_write_since = hub.tick
        self.hub_fresh = True
        self._stream = kind == socket.SOCK_STREAM
        self._green_timeout = timeout
        self.untimed_stream = self._stream and timeout is None
        hub.register(fileno, self)

    # -- timeouts, as the caller sees them ---------------------------------------------

    def settimeout(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if value < 0:
                raise ValueError("Timeout value out of range")
        self._set_timeout(value)

    def _set_timeout(self, value: float | None) -> None:
        self._green_timeout = value
        self.untimed_stream = self._stream and value is None

    def gettimeout(self) -> float | None:
        return self._green_timeout

    def setblocking(self, flag: bool) -> None:
        self._set_timeout(None if flag else 0.0)

    def getblocking(self) -> bool:
        return self._green_timeout != 0.0

    @property
    def timeout(self) -> float | None:
        return self._green_timeout

    # -- waiting -----------------------------------------------------------------------

    def _deadline(self) -> float | None:
        timeout = self._green_timeout
        return None if timeout is None else self.hub.clock() + timeout

    # -- reading -----------------------------------------------------------------------

    def _read(self, call: Any, size: int, flags: int, *args: Any) -> Any:
        """The one cooperative read of a stream (recv, recv_into, and their
        peeks); rfile's reads take the same steps inline, in
        GreenReader._receive. See the module's docstring."""
        if self._green_timeout == 0.0:
            return call(self, *args, flags)
        deadline = self._deadline()
        hub = self.hub
        peek = flags & _MSG_PEEK and self._stream
        if not self.hub_readable:
            hub.wait_readable(self, deadline)
        elif peek and self.hub_readable == _PEEKED:
            # Nothing new since the last peek.
            if self.hub_hangup:
                hub.sleep(0)
            else:
                hub.wait_readable(self, deadline)
        while True:
            try:
                result = call(self, *args, flags)
            except BlockingIOError:
                self.hub_readable = False
                hub.wait_readable(self, deadline)
                continue
            if self._stream:
                self.hub_fresh = False  # the first-byte limit is spent
                count = result if type(result) is int else len(result)
                if peek:
                    if 0 < count < size:
                        self.hub_readable = _PEEKED
                elif not flags:
                    # A short read drained the queue (unless the peer hung up);
                    # any read spends a peek's mark.
                    self.hub_readable = self.hub_hangup if 0 < count < size else True
            return result

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        size = nbytes or len(buffer)  # type: ignore[arg-type]
        count: int = self._read(_recv_into, size, flags, buffer, nbytes)
        return count

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data: bytes = self._read(_recv, bufsize, flags, bufsize)
        return data

    def _retry(self, call: Any, write: bool, *args: Any) -> Any:
        """Call until it stops raising BlockingIOError, waiting cooperatively."""
        deadline = None
        attempt = 0
        while True:
            try:
                return call(self, *args)
            except BlockingIOError:
                if self._green_timeout == 0.0:
                    raise
                if deadline is None:
                    deadline = self._deadline()
                if write and not self._stream:
                    self._retry_later(attempt, deadline)
                    attempt += 1
                elif write:
                    self.hub.wait_writable(self, deadline)
                else:
                    self.hub.wait_readable(self, deadline)

    def _retry_later(self, attempt: int, deadline: float | None) -> None:
        # A datagram send fails with EAGAIN when the *receiver's* queue is full
        # (AF_UNIX: net.unix.max_dgram_qlen), and Linux sends no EPOLLOUT when
        # that queue drains for an unconnected socket: waiting for the edge
        # could wait forever. Retry after a short, growing pause instead.
        pause = min(0.05, 0.0005 * (2**attempt))
        if deadline is not None:
            remaining = deadline - self.hub.clock()
            if remaining <= 0:
                raise TimeoutError("timed out")
            pause = min(pause, remaining)
        self.hub.sleep(pause)

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        result: tuple[bytes, Any] = self._retry(_recvfrom, False, bufsize, flags)
        return result

    def recvfrom_into(
        self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0
    ) -> tuple[int, Any]:
        result: tuple[int, Any] = self._retry(_recvfrom_into, False, buffer, nbytes, flags)
        return result

    # -- writing -----------------------------------------------------------------------

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        sent: int = self._retry(_send, True, data, flags)
        return sent

    def sendto(self, data: ReadableBuffer, *args: Any) -> int:
        sent: int = self._retry(_sendto, True, data, *args)
        return sent

    def sendall(self, data: ReadableBuffer, flags: int = 0) -> None:
        # The hot path of wfile: one send() takes everything almost always.
        try:
            sent = _send(self, data, flags)
        except BlockingIOError:
            if self._green_timeout == 0.0:
                raise
            sent = 0
        kind = type(data)
        if (kind is bytes or kind is bytearray) and sent == len(data):  # type: ignore[arg-type]
            return
        with memoryview(data) as whole, whole.cast("B") as view:
            if sent == view.nbytes:
                return
            deadline = self._deadline()
            while sent < view.nbytes:
                try:
                    sent += _send(self, view[sent:], flags)
                except BlockingIOError:
                    if self._green_timeout == 0.0:
                        raise
                    self.hub.wait_writable(self, deadline)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        # os.sendfile() would wait for writability in a blocking select(); read
        # and send in chunks instead, cooperatively.
        if offset:
            file.seek(offset)
        total = 0
        while count is None or total < count:
            size = 65536 if count is None else min(65536, count - total)
            chunk = file.read(size)
            if not chunk:
                break
            self.sendall(chunk)
            total += len(chunk)
        return total

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """As ``socket.makefile``; a binary reader is a GreenReader (see _greenfile)."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        reading, writing, binary = "r" in mode, "w" in mode, "b" in mode
        if not (reading or writing):
            raise ValueError("a socket file must be readable, writable or both")
        rawmode: Any = ("r" if reading else "") + ("w" if writing else "")
        raw = GreenSocketIO(self, rawmode)
        self._io_refs += 1
        if buffering is None or buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if not binary:
                raise ValueError("an unbuffered socket file must be binary")
            return raw
        buffer: io.BufferedIOBase
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = GreenReader(raw, buffering) if binary else io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if binary:
            return buffer
        text = io.TextIOWrapper(buffer, encoding, errors, newline)  # type: ignore[type-var]
        text.mode = mode  # type: ignore[misc]
        return text

    def _netserve_line_reader(self, buffering: int, max_line_size: int) -> GreenReader:
        """``rfile`` with lines bounded by ``max_line_size`` (see ``_lines``):
        ``makefile("rb", buffering)``'s reader, made directly (once per
        connection). Unbuffered (0), it reads a byte at a time, as the
        stdlib's unbuffered rfile does."""
        raw = GreenSocketIO(self, "rb")
        self._io_refs += 1
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        return GreenReader(raw, buffering or 1, max_line_size)

    # -- closing -----------------------------------------------------------------------

    def _real_close(self, _ss: Any = socket.socket) -> None:
        fd = _fileno(self)
        if fd >= 0:
            self.hub.forget(fd, self)
        if self.hub_reader is not None or self.hub_writer is not None:
            self.hub.notify_closing(self)
        _base_close(self)

    def detach(self) -> int:
        fd = _fileno(self)
        if fd >= 0:
            self.hub.forget(fd, self)
        if self.hub_reader is not None or self.hub_writer is not None:
            self.hub.notify_closing(self)
        return super().detach()
