"""Request handlers: one instance per request, doing its work in ``__init__``.

The order is part of the contract: ``setup()``, then ``handle()``, then ``finish()``
even when ``handle()`` raises; when ``setup()`` raises, neither of the others runs.
"""

from __future__ import annotations

import io
import socket
from typing import TYPE_CHECKING, Any, ClassVar

from netserve._core._lines import open_reader

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from netserve._core._servers import BaseServer

__all__ = ["BaseRequestHandler", "DatagramRequestHandler", "StreamRequestHandler"]


class BaseRequestHandler:
    """Handle one request; override ``handle()`` (and maybe ``setup``/``finish``)."""

    # The three hooks, each a no-op here.

    def setup(self) -> None:
        """Prepare for ``handle()``."""

    def handle(self) -> None:
        """Service the request."""

    def finish(self) -> None:
        """Clean up after ``handle()``."""

    def __init__(self, request: Any, client_address: Any, server: BaseServer) -> None:
        self.request, self.client_address, self.server = request, client_address, server
        # All the work happens in the constructor (the documented contract).
        # A setup() that raises means no handle() and no finish().
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()


class _SendallWriter(io.BufferedIOBase):
    """``wfile`` when ``wbufsize == 0``: every write goes straight out with sendall().

    A plain unbuffered socket file would write only what one send() takes;
    sendall() writes everything, retrying after signals (PEP 475).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sendall = sock.sendall

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer, /) -> int:
        if self.closed:
            raise ValueError("write to closed file")
        try:
            # bytes, the common case, go out as they are: no memoryview to make.
            if type(data) is bytes:
                self._sendall(data)
                return len(data)
            with memoryview(data) as view:
                self._sendall(view)
                return view.nbytes
        except BlockingIOError:
            self._would_block()
            raise

    def _would_block(self) -> None:
        """A send failed with EAGAIN: a subclass may raise something clearer."""

    def fileno(self) -> int:
        return self._sock.fileno()


class StreamRequestHandler(BaseRequestHandler):
    """A handler for stream requests with file-like ``rfile`` and ``wfile``."""

    # Read buffering: -1 is the io module's default buffer size.
    rbufsize: ClassVar[int] = -1
    # Write buffering: 0 sends every write at once (see _SendallWriter).
    wbufsize: ClassVar[int] = 0
    # A socket timeout for the connection, in seconds; None leaves it blocking.
    timeout: ClassVar[float | None] = None
    # Set TCP_NODELAY on the connection.
    disable_nagle_algorithm: ClassVar[bool] = False

    connection: Any
    rfile: io.BufferedIOBase
    wfile: io.BufferedIOBase

    def setup(self) -> None:
        """Apply ``timeout`` and ``disable_nagle_algorithm``, then open the files."""
        conn = self.connection = self.request
        if self.timeout is not None:
            conn.settimeout(self.timeout)
        if self.disable_nagle_algorithm:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = open_reader(conn, self.rbufsize, getattr(self.server, "max_line_size", None))
        if self.wbufsize == 0:
            # The socket's class may name a faster writer of its own (GreenSocket).
            writer = getattr(type(conn), "_netserve_sendall_writer", _SendallWriter)
            self.wfile = writer(conn)
        else:
            self.wfile = conn.makefile("wb", self.wbufsize)

    def finish(self) -> None:
        """Flush what is left in ``wfile`` (a gone peer is not an error); close both."""
        try:
            if not self.wfile.closed:
                self.wfile.flush()
        except OSError:
            pass
        try:
            # A buffered writer flushes again on close(); it is closed even when
            # that raises, and the peer is gone, so that error says nothing new.
            self.wfile.close()
        except OSError:
            pass
        self.rfile.close()


class DatagramRequestHandler(BaseRequestHandler):
    """A handler for datagram requests: ``rfile`` reads the datagram, ``wfile`` is the reply."""

    packet: bytes
    socket: socket.socket
    rfile: io.BytesIO
    wfile: io.BytesIO

    def setup(self) -> None:
        """Unpack the request and open in-memory files over it."""
        self.packet, self.socket = self.request
        self.rfile = io.BytesIO(self.packet)
        self.wfile = io.BytesIO()

    def finish(self) -> None:
        """Send what was written to ``wfile`` back to the client (even nothing)."""
        self.socket.sendto(self.wfile.getvalue(), self.client_address)
