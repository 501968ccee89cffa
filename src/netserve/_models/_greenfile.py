"""The socket files of a GreenSocket: ``rfile`` and ``wfile`` on the hub's fast path.

``GreenReader`` is what ``makefile("rb")`` returns (so ``StreamRequestHandler.rfile``):
``io.BufferedReader``'s behaviour, written in Python. That is faster here, not
slower: a ``BufferedReader`` over a socket calls back into Python (the raw
file's ``readinto``) for every read, through a fresh memoryview and its lock,
and its C frames sit under the greenlet's wait, whose stack the greenlet copies
out and back at each switch (figures: docs/benchmarks.md).

Reading follows the readable hint of rule 2 in ``_hub``: an untimed stream
socket (``GreenSocket.untimed_stream``) waits for the hub's edge instead of
trying a read that would fail, the steps of the socket's one read path
(``_greensocket``), through the kernel's interface. Sockets with a timeout,
non-blocking ones and datagram sockets read through ``socket.SocketIO`` as the
stdlib's files do (``TimeoutError``, then "cannot read from timed out object";
``None`` when a non-blocking read would block).

Lines are bounded (issue 11) by ``GreenReader.max_line_size`` (0: no bound;
the server's ``max_line_size``, see ``_lines``): ``readline()`` without a size,
or with a larger one, reads at most that many bytes of a line and raises
``LineTooLong`` if no newline came among them. Those bytes are consumed, what
follows stays unread, and the reader never holds more than the bound plus one
receive, however long the line.
"""

from __future__ import annotations

import io
import operator
import socket
import sys
from typing import TYPE_CHECKING, Any

from netserve._core._errors import LineTooLong
from netserve._core._handlers import _SendallWriter

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from netserve._models._greensocket import GreenSocket

__all__ = ["GreenReader", "GreenSendallWriter", "GreenSocketIO"]

_recv = socket.socket.recv
_send = socket.socket.send


# What readline() asks of recv() while lines come short: recv(n) allocates n
# bytes and then shrinks them to what came, and up to this size (with the bytes
# object's header, 512 bytes) CPython's small-object allocator does both;
# recv(8192) goes to malloc() and realloc() every time (docs/benchmarks.md).
_SMALL_READ = 479


def _size_argument(size: Any) -> int:
    """A size as io.BufferedReader takes it: an integer or None (no limit, as negative)."""
    if size is None:
        return -1
    try:
        return operator.index(size)
    except TypeError:
        raise TypeError(
            f"argument should be integer or None, not '{type(size).__name__}'"
        ) from None


class GreenSocketIO(socket.SocketIO):
    """The raw file under a GreenSocket's makefile(): ``socket.SocketIO``, with the
    two attributes GreenReader reads on every read in slots."""

    __slots__ = ("_sock", "_timeout_occurred")
    _sock: GreenSocket | None
    _timeout_occurred: bool


class GreenReader(io.BufferedIOBase):
    """A buffered binary reader over a GreenSocket's ``SocketIO``.

    What it holds: ``_buffer[_pos:]``, bytes received and not yet read. Bytes
    come in as one ``recv`` each, kept as they came; a read that wants exactly
    what one ``recv`` brought (a request line, most of the time) returns that
    very object.
    """

    # Slots, not the instance dict: read on every read, and with thousands of
    # connections each dict lookup is likely a cache miss.
    __slots__ = ("_buffer", "_line_cap", "_line_size", "_max_line", "_pos", "_size", "raw")
    raw: GreenSocketIO | None  # None once detached

    def __init__(
        self, raw: GreenSocketIO, buffer_size: int = io.DEFAULT_BUFFER_SIZE, max_line_size: int = 0
    ) -> None:
        if buffer_size <= 0:
            raise ValueError("buffer size must be strictly positive")
        self.raw = raw
        self._buffer = b""
        self._pos = 0
        self._size = buffer_size
        self._line_size = min(buffer_size, _SMALL_READ)
        self._max_line = max_line_size
        # The longest line readline()'s fast path may hand over as it came.
        self._line_cap = max_line_size or sys.maxsize

    @property
    def max_line_size(self) -> int:
        """The bound on a line read without a size (0: none; see the module)."""
        return self._max_line

    @max_line_size.setter
    def max_line_size(self, limit: int) -> None:
        self._max_line = limit
        self._line_cap = limit or sys.maxsize

    # -- receiving ---------------------------------------------------------------------

    def _receive(self, size: int, what: str | None) -> bytes | None:
        """One read of at most ``size`` bytes: b"" at end of stream, None when a
        non-blocking socket has nothing. On a closed file, io.BufferedReader's
        error: "<what> of closed file" if the method found nothing buffered, the
        raw file's otherwise (``what`` None)."""
        raw = self.raw
        if raw is None:
            raise ValueError("raw stream has been detached")
        sock = raw._sock
        if sock is None:
            raise ValueError(f"{what} of closed file" if what else "I/O operation on closed file.")
        if not sock.untimed_stream or raw._timeout_occurred:
            data: bytes | None = raw.read(size)
            return data
        while True:
            if not sock.hub_readable:
                sock.hub.wait_readable(sock)
            try:
                data = _recv(sock, size)
            except BlockingIOError:
                sock.hub_readable = False
                continue
            if len(data) < size:
                # A short read drained the queue (unless the peer hung up).
                sock.hub_readable = sock.hub_hangup
            else:
                sock.hub_readable = True  # a read spends a peek's mark
            sock.hub_fresh = False  # the first-byte limit is spent (_greensocket)
            return data

    def _take(self, count: int) -> bytes:
        """Up to ``count`` buffered bytes (all of them if negative), consumed.

        A buffer read to its end becomes b"": the buffer is either empty or
        holds bytes from ``_pos`` on, so that ``not self._buffer`` tells."""
        buffer, pos = self._buffer, self._pos
        end = len(buffer) if count < 0 else min(len(buffer), pos + count)
        if end == len(buffer):
            self._buffer, self._pos = b"", 0
            return buffer if pos == 0 else buffer[pos:]
        self._pos = end
        return buffer[pos:end]

    def _keep(self, data: bytes, used: int) -> bytes:
        """Buffer what follows ``data[:used]``, and return that part."""
        if used >= len(data):
            return data
        self._buffer, self._pos = data, used
        return data[:used]

    def _nothing(self, what: str) -> bytes:
        """What a read of 0 bytes returns: b"", or ValueError on a closed file."""
        if self.closed:
            raise ValueError(f"{what} of closed file")
        return b""

    # -- reading -----------------------------------------------------------------------

    def readline(self, size: Any = -1, /) -> bytes:
        if type(size) is not int:
            size = _size_argument(size)
        if not self._buffer:
            # Nothing buffered (then it is b"", see _take): the usual case
            # between requests.
            if size == 0:
                return self._nothing("readline")
            data = self._receive(self._line_size, "readline")
            if not data:
                return b""
            end = data.find(b"\n") + 1
            count = len(data)
            # Short lines: small reads (see _SMALL_READ); one that fills a small
            # read says the peer sends more at a time: full-size reads again.
            self._line_size = _SMALL_READ if count < _SMALL_READ <= self._size else self._size
            if end == count and end <= self._line_cap and (size < 0 or end <= size):
                return data  # exactly one line came: hand it over as it is
            self._buffer, self._pos = data, 0
        limit = self._max_line
        if limit and (size < 0 or size > limit):
            line = self._readline_buffered(limit)
            if len(line) == limit and line[-1] != 10:  # no b"\n" within the bound
                raise LineTooLong(f"a line went past max_line_size ({limit} bytes)")
            return line
        return self._readline_buffered(size)

    def _readline_buffered(self, size: int) -> bytes:
        chunks = []
        wanted = size
        while wanted != 0:
            buffer, pos = self._buffer, self._pos
            end = buffer.find(b"\n", pos) + 1
            if end:
                chunks.append(self._take(end - pos if wanted < 0 else min(end - pos, wanted)))
                break
            chunk = self._take(wanted)
            chunks.append(chunk)
            if wanted > 0:
                wanted -= len(chunk)
                if wanted == 0:
                    break
            data = self._receive(self._size, None)
            if not data:
                break
            self._buffer, self._pos = data, 0
        return b"".join(chunks)

    # None (as io.BufferedReader returns) when a non-blocking socket has nothing.
    def read(self, size: Any = -1, /) -> bytes | None:  # type: ignore[override]
        return self._read(size, "read")

    def _read(self, size: Any, what: str) -> bytes | None:
        if type(size) is not int:
            size = _size_argument(size)
        if size < 0:
            return self._read_all(what)
        if size == 0:
            return self._nothing(what)
        chunks = [self._take(size)]
        wanted = size - len(chunks[0])
        label = None if chunks[0] else what
        while wanted > 0:
            data = self._receive(max(wanted, self._size), label)
            label = None
            if not data:
                if data is None and not chunks[0] and len(chunks) == 1:
                    return None  # non-blocking, and nothing at all
                break
            chunks.append(self._keep(data, wanted))
            wanted -= len(chunks[-1])
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _read_all(self, what: str) -> bytes | None:
        chunks = [self._take(-1)]
        label = None if chunks[0] else what
        while True:
            data = self._receive(self._size, label)
            label = None
            if not data:
                if data is None and len(chunks) == 1 and not chunks[0]:
                    return None
                return b"".join(chunks)
            chunks.append(data)

    def read1(self, size: Any = -1, /) -> bytes:
        return self._read1(size, "read")

    def _read1(self, size: Any, what: str) -> bytes:
        if type(size) is not int:
            size = _size_argument(size)
        if size == 0:
            return self._nothing(what)
        if self._buffer:
            return self._take(size)
        data = self._receive(max(size, self._size), what)
        if not data:
            return b""
        return self._keep(data, len(data) if size < 0 else size)

    def peek(self, size: Any = 0, /) -> bytes:
        operator.index(size)  # unused (as in io.BufferedReader), but an integer
        if not self._buffer:
            data = self._receive(self._size, "peek")
            if not data:
                return b""
            self._buffer, self._pos = data, 0
        return self._buffer[self._pos :]

    def readinto(self, buffer: WriteableBuffer, /) -> int | None:  # type: ignore[override]
        return self._readinto(buffer, self._read)

    def readinto1(self, buffer: WriteableBuffer, /) -> int | None:  # type: ignore[override]
        return self._readinto(buffer, self._read1)

    @staticmethod
    def _readinto(buffer: WriteableBuffer, read: Any) -> int | None:
        with memoryview(buffer) as view, view.cast("B") as target:
            data = read(target.nbytes, "readinto")
            if data is None:
                return None
            target[: len(data)] = data
            return len(data)

    # -- the file ----------------------------------------------------------------------

    def _raw(self) -> GreenSocketIO:
        if self.raw is None:
            raise ValueError("raw stream has been detached")
        return self.raw

    @property
    def closed(self) -> bool:
        return bool(self._raw().closed)

    @property
    def name(self) -> Any:
        return self._raw().name

    @property
    def mode(self) -> str:
        return str(self._raw().mode)

    def close(self) -> None:
        raw = self._raw()
        self._buffer, self._pos = b"", 0
        raw.close()

    def detach(self) -> Any:
        raw = self._raw()
        self._buffer, self._pos = b"", 0
        self.raw = None
        return raw

    def fileno(self) -> int:
        return int(self._raw().fileno())

    def readable(self) -> bool:
        return bool(self._raw().readable())

    def seekable(self) -> bool:
        return bool(self._raw().seekable())

    def tell(self) -> int:
        return int(self._raw().tell())

    def seek(self, offset: int, whence: int = 0, /) -> int:
        raise io.UnsupportedOperation("File or stream is not seekable.")

    def __repr__(self) -> str:
        try:
            return f"<{type(self).__name__} name={self.name!r}>"
        except ValueError:
            return f"<{type(self).__name__}>"


class GreenSendallWriter(_SendallWriter):
    """``wfile`` (``wbufsize == 0``) over a GreenSocket.

    Bytes go to the system call directly, as GreenSocket.sendall() would send
    them, one Python call fewer for every reply; the rest goes through sendall().
    """

    __slots__ = ("_sock",)  # as GreenReader's

    def write(self, data: ReadableBuffer, /) -> int:
        if type(data) is not bytes or self.closed:
            return super().write(data)
        sock: GreenSocket = self._sock  # type: ignore[assignment]
        try:
            sent = _send(sock, data)
        except BlockingIOError:
            if sock.gettimeout() == 0.0:
                raise
            sent = 0
        size = len(data)
        if sent < size:
            with memoryview(data) as view:
                sock.sendall(view[sent:])
        return size
