"""Connection stages: the steps a connection goes through before its handler.

A PROXY protocol header, then a TLS handshake, later others: each is a
``Stage``, and a server lists the ones its connections go through in
``_netserve_stages()`` (a mix-in adds its own to what ``super()`` returns, so
the MRO gives the order). Each stage may replace the request object and the
client address that the handler and ``handle_error()`` then see.

Theory of operation
-------------------
Rule 1: a stage never blocks. ``advance(conn)`` does what it can with the
non-blocking calls of ``Connection`` and returns ``READ`` or ``WRITE`` (call
me again once the socket is readable/writable) or ``DONE``. A *driver* does the
waiting, so one stage runs under every model (issue 10, design 3):

* threading, the forking child and sync: ``run_stages()`` on the connection's
  own thread, waiting in ``poll()``; sync is bounded by the stage deadline;
* the hub: ``run_stages()`` in the connection's greenlet, waiting on the hub;
* the pool: the serving loop advances the stages of a parked connection each
  time its socket is ready, and hands it to a worker only once they are done,
  so stalled handshakes cannot take the pool's workers.

Rule 2: a stage consumes what it reads. A waiting driver polls level-triggered
(threads) or edge-triggered (the hub); a stage that peeked at bytes and asked
to wait for more would spin under the first. Bytes a stage read beyond what it
needed go back with ``pushback()``: the handler then reads them first, through
``self.request.recv()`` and ``rfile`` alike.

Rule 2b: a stage that must wait for something other than its socket (a TLS
handshake over the cap) returns ``BUSY`` with ``conn.ticket`` set; the driver
stops watching the socket (its bytes stay in the kernel) until the ticket is
granted. A stage that holds something (a handshake's slot) sets
``conn.holder``: every driver calls ``holder.abandon(conn, exc)`` when the
connection fails or times out in its stages.

Rule 3: every stage of a connection shares one deadline (``stage_timeout``
from the connection's accept). Past it the connection is closed and counted
as a time-out; a stage that rejects its peer raises ``StageError``, and the
connection is closed and counted as a stage failure. Neither reaches
``handle_error()``: a bad or slow peer is not a bug in the server.
"""

from __future__ import annotations

import _socket
import io
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from netserve._core._errors import ConnectionTimeout, StageError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "BUSY",
    "DONE",
    "READ",
    "WRITE",
    "Connection",
    "PrefixedSocket",
    "Stage",
    "advance_stages",
    "check_deadline",
    "has_input",
    "run_stages",
]

#: What ``Stage.advance()`` returns. BUSY: wait for a slot (the TLS handshake
#: cap); the stage has set ``conn.ticket``, which the driver waits on.
DONE, READ, WRITE, BUSY = 0, 1, 2, 3

_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))
# The C methods, past any cooperative override (GreenSocket's would wait).
_recv = _socket.socket.recv
_send = _socket.socket.send


class Connection:
    """A connection on its way to the handler: what the stages work on."""

    __slots__ = ("client_address", "deadline", "holder", "request", "sock", "stage", "ticket")

    def __init__(self, sock: socket.socket, client_address: Any, deadline: float | None) -> None:
        #: The accepted socket. Stages read and write it only through recv(),
        #: send() and pushback() here, which never block.
        self.sock = sock
        #: What the handler will get as ``self.request`` (a stage may replace it).
        self.request: Any = sock
        #: What the handler will get as ``self.client_address``.
        self.client_address = client_address
        #: The clock time by which every stage must be done (None: no limit).
        self.deadline = deadline
        #: The index of the stage in progress (drivers keep it).
        self.stage = 0
        #: A stage holding something to give back if the connection fails
        #: (``abandon(conn, exc)``: a TLS handshake's slot), or None.
        self.holder: Any = None
        #: While a stage returned BUSY: the ``_tls.Ticket`` to wait on.
        self.ticket: Any = None

    def recv(self, size: int) -> bytes | None:
        """Up to ``size`` bytes; b"" once the peer has closed; None if none came yet."""
        try:
            data: bytes = _recv(self.sock, size, _DONTWAIT)
        except BlockingIOError:
            return None
        return data

    def peek(self, size: int) -> bytes | None:
        """Up to ``size`` bytes, left in the socket; b"" at its end; None if none came."""
        try:
            data: bytes = _recv(self.sock, size, _PEEK_NOW)
        except BlockingIOError:
            return None
        return data

    def send(self, data: ReadableBuffer) -> int | None:
        """Send what the socket takes now; None if it takes nothing."""
        try:
            sent: int = _send(self.sock, data, _DONTWAIT)
        except BlockingIOError:
            return None
        return sent

    def pushback(self, data: bytes) -> None:
        """Give back bytes read beyond the stage's need: the handler reads them first."""
        if not data:
            return
        if isinstance(self.request, PrefixedSocket):
            self.request._prefix = data + self.request._prefix
        else:
            self.request = PrefixedSocket(self.request, data)


class Stage:
    """One step before the handler; subclasses override ``advance()``.

    A fresh instance serves one connection, so it may keep that connection's
    state (a parser, a handshake) in its attributes.
    """

    def advance(self, conn: Connection) -> int:
        """Make progress without blocking; return ``READ``, ``WRITE`` or ``DONE``."""
        raise NotImplementedError


def advance_stages(conn: Connection, stages: Sequence[Stage]) -> int:
    """Run the stages from ``conn.stage`` on until one must wait: returns
    ``READ`` or ``WRITE`` (wait, then call again), or ``DONE`` (all done)."""
    while conn.stage < len(stages):
        want = stages[conn.stage].advance(conn)
        if want == DONE:
            conn.stage += 1
        elif want in (READ, WRITE, BUSY):
            return want
        else:
            raise StageError(f"{stages[conn.stage]!r}.advance() returned {want!r}")
    return DONE


def run_stages(
    conn: Connection,
    stages: Sequence[Stage],
    wait: Callable[[Connection, bool, float | None], None],
    wait_slot: Callable[[Connection, float | None], None],
) -> None:
    """Run every stage, waiting through ``wait(conn, write, deadline)`` for the
    socket and ``wait_slot(conn, deadline)`` for ``conn.ticket`` (both raise
    ``ConnectionTimeout`` when the deadline passes)."""
    while (want := advance_stages(conn, stages)) != DONE:
        if want == BUSY:
            wait_slot(conn, conn.deadline)
        else:
            wait(conn, want == WRITE, conn.deadline)


def check_deadline(remaining: float | None) -> None:
    if remaining is not None and remaining <= 0:
        raise ConnectionTimeout("the connection's stages did not finish in time", "stage_timeout")


class PrefixedSocket:
    """A connection whose first bytes were read ahead by a stage.

    Everything is the wrapped socket's, except that reads return ``prefix``
    first: ``recv``, ``recv_into`` and the files of ``makefile()`` (so
    ``rfile``). The handler sees the stream as the peer sent it.
    """

    def __init__(self, sock: Any, prefix: bytes) -> None:
        self._sock = sock
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def __repr__(self) -> str:
        return f"<PrefixedSocket {len(self._prefix)} bytes ahead of {self._sock!r}>"

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        prefix = self._prefix
        if not prefix:
            data: bytes = self._sock.recv(bufsize, flags)
            return data
        taken = prefix[:bufsize]
        if not flags & socket.MSG_PEEK:
            self._prefix = prefix[bufsize:]
        return taken

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        prefix = self._prefix
        if not prefix:
            count: int = self._sock.recv_into(buffer, nbytes, flags)
            return count
        with memoryview(buffer) as view:
            size = min(nbytes or view.nbytes, len(prefix))
            view[:size] = prefix[:size]
        if not flags & socket.MSG_PEEK:
            self._prefix = prefix[size:]
        return size

    def _netserve_raw_reader(self) -> Any:
        """``rfile``'s raw file (see ``_lines.open_reader``): it reads through
        ``recv_into`` here, so that ``max_line_size`` bounds the lines of the
        bytes read ahead and of those after them alike."""
        return self.makefile("rb", 0)

    def makefile(self, mode: str = "r", buffering: int | None = None, **text: Any) -> Any:
        """As ``socket.makefile()``; reads come through this object's ``recv_into``."""
        if "r" not in mode:
            return self._sock.makefile(mode, buffering, **text)
        raw = socket.SocketIO(self, "rw" if "w" in mode else "r")  # type: ignore[arg-type]
        # As socket.makefile() counts it: closing the socket waits for its files.
        self._sock._io_refs += 1
        if buffering == 0:
            return raw
        size = io.DEFAULT_BUFFER_SIZE if buffering is None or buffering < 0 else buffering
        buffered: Any = (
            io.BufferedRWPair(raw, raw, size) if "w" in mode else io.BufferedReader(raw, size)
        )
        if "b" in mode:
            return buffered
        return io.TextIOWrapper(buffered, **text)


# A plain integer, worked out once (combining the enum flags runs Python code).
_PEEK_NOW = int(socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0))


def has_input(sock: socket.socket) -> bool:
    """Whether the peer has already sent something (or closed), without waiting.

    The descriptor's own recv() is asked (a cooperative socket's would wait on
    its hub). Under connection churn the first bytes usually arrive with the
    connection; one peek then saves parking it.
    """
    try:
        socket.socket.recv(sock, 1, _PEEK_NOW)
    except BlockingIOError:
        return False
    except OSError:
        return True  # an error is for the handler to meet
    return True
