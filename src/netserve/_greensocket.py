"""GreenSocket: the cooperative socket of the hub.

A ``socket.socket`` whose waits (recv, send, ...) suspend the calling handler
greenlet and let the hub run the others, with the stdlib's timeout semantics
(``settimeout``/``gettimeout``, ``TimeoutError``). At the system level it is
always non-blocking.
"""

from __future__ import annotations

import _socket
import io
import socket
import time
from typing import TYPE_CHECKING, Any

from netserve._handlers import _SendallWriter

try:
    import greenlet
    from greenlet import getcurrent

    from netserve._greenfile import (
        GreenReader,
        GreenSendallWriter,
        GreenSocketIO,
        closed_while_waiting,
    )
except ImportError as exc:  # the [green] extra is not installed
    if exc.name != "greenlet":
        raise
    greenlet = getcurrent = None
    GreenReader = GreenSendallWriter = GreenSocketIO = closed_while_waiting = None  # type: ignore[assignment, misc]

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from netserve._hub import Hub

__all__ = ["GreenSocket"]

# Passed to a waiting greenlet whose socket was closed under it.
_CLOSED = object()

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


class GreenSocket(socket.socket):
    """A socket whose blocking operations suspend the calling greenlet.

    It takes over the descriptor of an accepted socket. At the system level it
    is always non-blocking; ``settimeout()``/``setblocking()`` set what the
    caller sees, as on a plain socket.
    """

    # StreamRequestHandler's wfile when wbufsize == 0 (set below).
    _netserve_sendall_writer: type[_SendallWriter]

    __slots__ = (
        "_green_timeout",
        "_hangup",
        "_hub",
        "_readable",
        "_reader",
        "_stream",
        "_writer",
    )

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
        self._green_timeout = timeout
        self._hub = hub
        self._reader: Any = None
        self._writer: Any = None
        # Unknown at first, so the first read tries at once (rule 2 of _hub).
        self._readable = True
        self._hangup = False
        self._stream = kind == socket.SOCK_STREAM
        hub.register(fileno, self)

    # -- timeouts, as the caller sees them ---------------------------------------------

    def settimeout(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if value < 0:
                raise ValueError("Timeout value out of range")
        self._green_timeout = value

    def gettimeout(self) -> float | None:
        return self._green_timeout

    def setblocking(self, flag: bool) -> None:
        self._green_timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._green_timeout != 0.0

    @property
    def timeout(self) -> float | None:
        return self._green_timeout

    # -- waiting -----------------------------------------------------------------------

    def _deadline(self) -> float | None:
        timeout = self._green_timeout
        return None if timeout is None else time.monotonic() + timeout

    def _wait(self, write: bool, deadline: float | None) -> None:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        outcome = self._hub.wait(self, write=write, timeout=timeout)
        if outcome is None:
            return
        if outcome is _CLOSED:
            raise closed_while_waiting()
        raise TimeoutError("timed out")

    # -- reading -----------------------------------------------------------------------

    def _read(self, call: Any, size: int, flags: int, *args: Any) -> Any:
        """A stream-aware cooperative read (recv, recv_into), using the readable
        hint of rule 2 in _hub. (rfile's reads take the same steps inline, in
        GreenReader._receive.)"""
        if self._green_timeout == 0.0:
            return call(self, *args, flags)
        deadline = self._deadline()
        if not self._readable:
            self._wait_readable(deadline)
        while True:
            try:
                result = call(self, *args, flags)
            except BlockingIOError:
                self._readable = False
                self._wait_readable(deadline)
                continue
            count = result if type(result) is int else len(result)
            if 0 < count < size and self._stream and not flags:
                # A short read drained the queue (unless the peer hung up).
                self._readable = self._hangup
            return result

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        size = nbytes or len(buffer)  # type: ignore[arg-type]
        count: int = self._read(_recv_into, size, flags, buffer, nbytes)
        return count

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data: bytes = self._read(_recv, bufsize, flags, bufsize)
        return data

    def _wait_readable(self, deadline: float | None) -> None:
        if deadline is not None:
            self._wait(False, deadline)
            return
        # No timeout, the common case: switch to the hub directly. The hub
        # switches back (with None) on the next read edge. (GreenReader._receive
        # repeats these lines inline, on rfile's path: change both together.)
        self._reader = getcurrent()
        try:
            outcome = self._hub.greenlet.switch()  # type: ignore[union-attr]
        finally:
            self._reader = None
        if outcome is not None:
            raise closed_while_waiting()

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
                else:
                    self._wait(write, deadline)

    def _retry_later(self, attempt: int, deadline: float | None) -> None:
        # A datagram send fails with EAGAIN when the *receiver's* queue is full
        # (AF_UNIX: net.unix.max_dgram_qlen), and Linux sends no EPOLLOUT when
        # that queue drains for an unconnected socket: waiting for the edge
        # could wait forever. Retry after a short, growing pause instead.
        pause = min(0.05, 0.0005 * (2**attempt))
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            pause = min(pause, remaining)
        self._hub.sleep(pause)

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
                    self._wait(True, deadline)

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

    # -- closing -----------------------------------------------------------------------

    def _real_close(self, _ss: Any = socket.socket) -> None:
        fd = _fileno(self)
        if fd >= 0:
            self._hub.forget(fd, self)
        if self._reader is not None or self._writer is not None:
            self._wake_waiters()
        _base_close(self)

    def detach(self) -> int:
        fd = _fileno(self)
        if fd >= 0:
            self._hub.forget(fd, self)
        self._wake_waiters()
        return super().detach()

    def _wake_waiters(self) -> None:
        hub = self._hub
        for waiter in (self._reader, self._writer):
            # Not a parked connection's starter, which waits for an edge only.
            if waiter is not None and isinstance(waiter, greenlet.greenlet):
                if hub.on_hub_thread():
                    hub.schedule(waiter, _CLOSED)
                else:
                    hub.call_soon_threadsafe(lambda w=waiter: w.switch(_CLOSED))  # type: ignore[misc]
        self._reader = self._writer = None


if GreenSendallWriter is not None:
    GreenSocket._netserve_sendall_writer = GreenSendallWriter
