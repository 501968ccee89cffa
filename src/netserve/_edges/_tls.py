"""TLS on stream servers, in every model: the settings, the handshake stage, the socket.

Theory of operation
-------------------
A server speaks TLS when it has a context: ``tls_context`` (an
``ssl.SSLContext`` of the user's), or ``tls_certfile`` (and ``tls_keyfile``)
from which one is built with netserve's defaults (``tls_policy``, at
construction: a bad setting is a ``ConfigurationError`` there, never at the
first client). The handshake is a connection stage (``_stages``), after the
PROXY protocol's: never on the accept path, bounded by ``stage_timeout``, and
held to ``tls_max_handshakes`` at once.

Two stages, one policy:

* The thread models (sync, threading, forking, the pool) hand the handler an
  ``ssl.SSLSocket`` (``TLSSocket``). The stage wraps a duplicate of the
  accepted descriptor, non-blocking, and maps ``SSLWantReadError`` and
  ``SSLWantWriteError`` to ``READ`` and ``WRITE``. The accepted socket object
  stays what the server counts and what ``abort_connections()`` shuts down
  (the duplicate shares its connection); both are closed at the end.
* The hub hands the handler a ``GreenTLSSocket``: an ``ssl.SSLObject`` over
  two ``MemoryBIO``s and the connection's cooperative socket, so that a TLS
  read waits on the hub as any read there does.

Time-outs after the handshake (issue 11). The thread models' time-outs are the
kernel's ``SO_RCVTIMEO``/``SO_SNDTIMEO`` on a blocking socket; under TLS that
does not work: when the kernel's time-out fires, OpenSSL reports "want read",
and CPython's blocking ``SSLSocket`` simply reads again, so the read waits
forever (checked on 3.11: a 0.3 s ``SO_RCVTIMEO`` still blocked after 2 s).
So a ``TLSSocket`` clears the kernel's time-outs and runs on Python's own
(``settimeout``), set before each call to the idle or write limit (bounded by
the connection's age), and a ``TimeoutError`` from such a wait becomes
``ConnectionTimeout``. A time-out the handler sets itself takes over, with the
stdlib's ``TimeoutError``, as on a plain socket; ``gettimeout()`` shows only
the handler's. The hub's ``GreenTLSSocket`` reads and writes through its
``GreenSocket``, whose waits keep the hub's limits.

Closing: shutting down the write side (as ``shutdown_request()`` does) first
sends close_notify, without waiting: on a peer that does not read, the alert
is dropped rather than waited for.

The cap (``tls_max_handshakes``): a handshake costs CPU (a signature), and a
flood of them is the cheapest attack on a small machine. A slot is taken for
each step of a handshake (the server working on what the peer sent) and given
back as soon as the step waits for the peer again: a client that stalls
mid-handshake holds no slot, so stalled clients cannot keep the others
waiting (they cost a parked connection each, bounded by ``stage_timeout``
and ``max_connections``). Over the cap a connection waits parked, the peer's
bytes unread in the kernel, until a step ends elsewhere (slots pass on in
arrival order) or its stage time-out ends it. The serving loop of the pool and
the hub's thread run one step at a time anyway; the cap bounds the thread
models. In the forking model each child handshakes its own connection: there
the bound is ``max_children``.
"""

from __future__ import annotations

import _socket
import collections
import io
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from netserve._core._errors import ConfigurationError, ConnectionTimeout, TLSHandshakeError
from netserve._core._limits import age_reached
from netserve._core._log import RateLimitedLog, get_logger
from netserve._core._stages import BUSY, DONE, READ, WRITE, Connection, Stage, has_input

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "GreenTLSSocket",
    "HandshakeGate",
    "TLSPolicy",
    "TLSSocket",
    "Ticket",
    "tls_policy",
]

log = get_logger("tls")

_CERT_REQS = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
# One TLS record's worth: what a cooperative read takes off the socket at once.
_CHUNK = 16384
# What one GreenTLSSocket.sendall() encrypts before sending (bounds the BIO).
_SEND_CHUNK = 65536
_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))
_NO_TIMEOUT = b"\0" * 16  # struct timeval {0, 0}: no kernel time-out
_settimeout = _socket.socket.settimeout


# -- the cap on concurrent handshakes --------------------


class Ticket:
    """A connection's place in the queue for a handshake slot."""

    __slots__ = ("event", "granted", "wake")

    def __init__(self) -> None:
        self.granted = False
        # Set by a driver that waits by callback (the pool, the hub); the
        # thread drivers wait on the event.
        self.wake: Callable[[], None] | None = None
        self.event = threading.Event()

    def notify(self) -> None:
        """Wake the waiting connection (``granted`` was set under the gate's lock)."""
        self.event.set()
        if self.wake is not None:
            self.wake()


class HandshakeGate:
    """At most ``cap`` handshakes at once; the others queue in arrival order."""

    __slots__ = ("busy", "cap", "lock", "waiting")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.busy = 0
        self.lock = threading.Lock()
        self.waiting: collections.deque[Ticket] = collections.deque()

    def enter(self) -> Ticket | None:
        """None: a slot is taken; else the ticket to wait on."""
        with self.lock:
            if self.busy < self.cap:
                self.busy += 1
                return None
            ticket = Ticket()
            self.waiting.append(ticket)
            return ticket

    def leave(self) -> None:
        """A handshake step ended: its slot passes to the first waiting, if any."""
        with self.lock:
            if not self.waiting:
                self.busy -= 1
                return
            ticket = self.waiting.popleft()
            # Under the lock: a cancel() that follows sees the slot as given.
            ticket.granted = True
        ticket.notify()

    def cancel(self, ticket: Ticket) -> None:
        """A waiting connection gave up (time-out, close); a slot it was given
        meanwhile passes on."""
        with self.lock:
            if not ticket.granted:
                self.waiting.remove(ticket)
                return
        self.leave()


# -- the settings --------------------


class TLSPolicy:
    """A server's TLS settings, checked at construction; the contexts in use."""

    __slots__ = (
        "_fail_log",
        "_lock",
        "alpn",
        "ca_certs",
        "cert_reqs",
        "certfile",
        "context",
        "cooperative",
        "gate",
        "keyfile",
        "sni",
        "sni_files",
        "user_context",
    )

    def __init__(
        self,
        *,
        user_context: ssl.SSLContext | None,
        certfile: str | None,
        keyfile: str | None,
        ca_certs: str | None,
        cert_reqs: ssl.VerifyMode,
        alpn: list[str] | None,
        sni_files: dict[str, tuple[str, str | None]],
        max_handshakes: int,
        cooperative: bool,
    ) -> None:
        self.user_context = user_context
        self.certfile = certfile
        self.keyfile = keyfile
        self.ca_certs = ca_certs
        self.cert_reqs = cert_reqs
        self.alpn = alpn
        self.sni_files = sni_files
        self.cooperative = cooperative
        self.gate = HandshakeGate(max_handshakes)
        self._lock = threading.Lock()
        self._fail_log = RateLimitedLog(log, 20)  # INFO: a scan must not flood the log
        self.sni: dict[str, ssl.SSLContext] = {}
        self.context = self._build(user_context)

    # -- contexts ---------------------------------------------------------------------------

    def _server_context(self, certfile: str, keyfile: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
        _load(context.load_cert_chain, "certificate", certfile, keyfile)
        if self.ca_certs is not None:
            _load(context.load_verify_locations, "CA", self.ca_certs)
        context.verify_mode = self.cert_reqs
        if self.alpn:
            context.set_alpn_protocols(self.alpn)
        return context

    def _build(self, given: ssl.SSLContext | None) -> ssl.SSLContext:
        """The default context (``given``, or one from the files) and the SNI
        contexts, all loaded afresh; nothing is swapped in yet."""
        if given is not None:
            context = given
        else:
            assert self.certfile is not None
            context = self._server_context(self.certfile, self.keyfile)
        sni = {
            name.lower(): self._server_context(cert, key)
            for name, (cert, key) in self.sni_files.items()
        }
        if sni:
            context.sni_callback = _sni_callback(sni)
        self.sni = sni
        return context

    def reload(self, context: ssl.SSLContext | None = None) -> None:
        """Load the certificates afresh (or take ``context``): the next handshake
        uses them; connections already open keep their session."""
        with self._lock:
            if context is None and self.certfile is None:
                raise ConfigurationError(
                    "this server's TLS context is the application's (tls_context): "
                    "pass the new one, reload_certificates(context)"
                )
            if context is not None:
                _check_server_context(context)
                self.user_context = context
            # Built first, then swapped: a handshake starting meanwhile takes
            # the old context or the new, whole.
            self.context = self._build(context if context is not None else None)

    def stage(self) -> Stage:
        if self.cooperative:
            return ObjectHandshake(self)
        return SocketHandshake(self)

    def failed(self, client_address: Any, exc: BaseException) -> None:
        self._fail_log.event("TLS handshake with %s failed: %s", client_address, exc)


def _sni_callback(
    contexts: dict[str, ssl.SSLContext],
) -> Callable[[Any, str | None, ssl.SSLContext], None]:
    def pick(conn: Any, server_name: str | None, _context: ssl.SSLContext) -> None:
        # An unknown name (or none) keeps the default certificate.
        if server_name is not None:
            chosen = contexts.get(server_name.lower())
            if chosen is not None:
                conn.context = chosen

    return pick


def _load(method: Callable[..., Any], what: str, *paths: str | None) -> None:
    try:
        method(*paths)
    except FileNotFoundError as exc:
        raise ConfigurationError(f"TLS {what} file not found: {exc.filename or paths[0]}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(f"TLS {what} {paths[0]!r} could not be loaded: {exc}") from None


def _check_server_context(context: Any) -> None:
    """An application's context must be one a server can handshake with."""
    if not isinstance(context, ssl.SSLContext):
        raise ConfigurationError(f"tls_context must be an ssl.SSLContext, not {context!r}")
    if context.protocol == ssl.PROTOCOL_TLS_CLIENT or context.check_hostname:
        # ssl.create_default_context() with no purpose makes a client's.
        raise ConfigurationError(
            "tls_context is a client's context (PROTOCOL_TLS_CLIENT, check_hostname): "
            "make a server's, ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)"
        )


def tls_policy(server: Any, *, cooperative: bool = False) -> TLSPolicy | None:
    """The TLS policy for ``server``'s ``tls_*`` attributes (None: no TLS);
    ``ConfigurationError`` when they do not make sense."""
    context = getattr(server, "tls_context", None)
    certfile = getattr(server, "tls_certfile", None)
    keyfile = getattr(server, "tls_keyfile", None)
    if context is None and certfile is None:
        if keyfile is not None:
            raise ConfigurationError("tls_keyfile is set without tls_certfile")
        if getattr(server, "tls_sni", None):
            raise ConfigurationError("tls_sni needs a default certificate (tls_certfile)")
        return None
    if getattr(server, "socket_type", socket.SOCK_STREAM) != socket.SOCK_STREAM:
        raise ConfigurationError(
            "TLS needs a stream server: Python's ssl module has no DTLS for datagrams"
        )
    if context is not None:
        _check_server_context(context)
    reqs = getattr(server, "tls_cert_reqs", ssl.CERT_NONE)
    if isinstance(reqs, str):
        if reqs not in _CERT_REQS:
            raise ConfigurationError(
                f"tls_cert_reqs must be 'none', 'optional' or 'required', not {reqs!r}"
            )
        reqs = _CERT_REQS[reqs]
    if reqs != ssl.CERT_NONE and context is None and not getattr(server, "tls_ca_certs", None):
        # The system's trust store is for checking servers: any public CA's
        # customer would pass as a client.
        raise ConfigurationError(
            "tls_cert_reqs asks for client certificates: tls_ca_certs must name the CAs "
            "that sign them (--ca-certs)"
        )
    alpn = getattr(server, "tls_alpn", None)
    if isinstance(alpn, str):
        alpn = [alpn]
    sni: dict[str, tuple[str, str | None]] = {}
    for name, files in (getattr(server, "tls_sni", None) or {}).items():
        if isinstance(files, str):
            sni[name] = (files, None)
        else:
            sni[name] = (files[0], files[1])
    cap = getattr(server, "tls_max_handshakes", 64)
    if not isinstance(cap, int) or cap < 1:
        raise ConfigurationError(f"tls_max_handshakes must be a positive int, not {cap!r}")
    return TLSPolicy(
        user_context=context,
        certfile=certfile if context is None else None,
        keyfile=keyfile if context is None else None,
        ca_certs=getattr(server, "tls_ca_certs", None),
        cert_reqs=ssl.VerifyMode(reqs),
        alpn=list(alpn) if alpn else None,
        sni_files=sni,
        max_handshakes=cap,
        cooperative=cooperative,
    )


# -- the stages --------------------


class _Handshake(Stage):
    """What both handshake stages share: the slot, and giving it back."""

    __slots__ = ("holding", "policy", "ticket")

    def __init__(self, policy: TLSPolicy) -> None:
        self.policy = policy
        self.holding = False
        self.ticket: Ticket | None = None

    def _slot(self, conn: Connection) -> bool:
        """Whether this connection may handshake now (else it waits: BUSY)."""
        if self.holding:
            return True
        ticket = self.ticket
        if ticket is None:
            ticket = self.policy.gate.enter()
            if ticket is None:
                self.holding = True
                conn.holder = self
                return True
            self.ticket = ticket
            conn.holder = self
            conn.ticket = ticket
            log.debug("handshake of %s waits for a slot", conn.client_address)
            return False
        if ticket.granted:
            self.ticket = conn.ticket = None
            self.holding = True
            return True
        return False

    def _done(self) -> None:
        if self.holding:
            self.holding = False
            self.policy.gate.leave()

    def abandon(self, conn: Connection, exc: BaseException | None) -> None:
        """The connection failed or timed out in this stage: give the slot back."""
        if self.ticket is not None:
            self.policy.gate.cancel(self.ticket)
            self.ticket = conn.ticket = None
        self._done()
        if exc is not None and not isinstance(exc, TLSHandshakeError):
            self.policy.failed(conn.client_address, exc)

    def _fail(self, conn: Connection, exc: BaseException) -> TLSHandshakeError:
        self.policy.failed(conn.client_address, exc)
        return TLSHandshakeError(f"TLS handshake failed: {exc}")


class SocketHandshake(_Handshake):
    """The handshake for the thread models: on a ``TLSSocket``, non-blocking."""

    __slots__ = ("tls",)

    def __init__(self, policy: TLSPolicy) -> None:
        super().__init__(policy)
        self.tls: TLSSocket | None = None

    def advance(self, conn: Connection) -> int:
        if self.tls is None and not has_input(conn.sock):
            return READ  # nothing made, no slot, until the ClientHello comes
        if not self._slot(conn):
            return BUSY
        tls = self.tls
        if tls is None:
            if conn.request is not conn.sock:
                raise TLSHandshakeError("bytes were read ahead of the TLS handshake")
            raw = conn.sock
            plain = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
            # ssl's own constructor, as SSLContext.wrap_socket() calls it, for
            # our subclass (wrap_socket() would need the context's class changed,
            # and the context may be the application's). Private, but the same
            # signature since 3.7 and run on each CPython scripts/test finds.
            try:
                tls = TLSSocket._create(  # type: ignore[attr-defined]
                    sock=plain,
                    server_side=True,
                    do_handshake_on_connect=False,
                    context=self.policy.context,
                )
            except BaseException:
                plain.close()  # not taken over: ours to close
                self._done()
                raise
            _settimeout(tls, 0.0)
            self.tls = tls
            # From here the stage's closing closes it too (_servers).
            conn.request = tls
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._done()  # waiting for the peer holds no slot
            return READ
        except ssl.SSLWantWriteError:
            self._done()
            return WRITE
        except OSError as exc:  # ssl.SSLError, a reset, EOF mid-handshake
            self._done()
            raise self._fail(conn, exc) from None
        self._done()
        tls._ns_arm(conn.sock)
        return DONE


class ObjectHandshake(_Handshake):
    """The hub's handshake: an ``SSLObject`` over memory, fed from the connection."""

    __slots__ = ("bios", "pending", "sslobj")

    def __init__(self, policy: TLSPolicy) -> None:
        super().__init__(policy)
        # Made with the SSLObject, once the peer's first bytes have come.
        self.sslobj: ssl.SSLObject | None = None
        self.bios: tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None = None
        self.pending = b""

    def advance(self, conn: Connection) -> int:
        if self.sslobj is None and not has_input(conn.sock):
            return READ  # nothing made, no slot, until the ClientHello comes
        if not self._slot(conn):
            return BUSY
        sslobj = self.sslobj
        if sslobj is None:
            if conn.request is not conn.sock:
                raise TLSHandshakeError("bytes were read ahead of the TLS handshake")
            self.bios = (ssl.MemoryBIO(), ssl.MemoryBIO())
            sslobj = self.sslobj = self.policy.context.wrap_bio(*self.bios, server_side=True)
        assert self.bios is not None
        incoming, outgoing = self.bios
        while True:
            while self.pending:
                sent = conn.send(self.pending)
                if sent is None:
                    self._done()  # waiting for the peer holds no slot
                    return WRITE
                self.pending = self.pending[sent:]
            try:
                sslobj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as exc:
                self._done()
                # The alert that says why, if the socket takes it now.
                conn.send(outgoing.read())
                raise self._fail(conn, exc) from None
            self.pending = outgoing.read()
            if self.pending:
                continue
            if done:
                break
            data = conn.recv(_CHUNK)
            if data is None:
                self._done()
                return READ
            if not data:
                self._done()
                raise self._fail(conn, ConnectionResetError("the peer closed mid-handshake"))
            incoming.write(data)
        self._done()
        conn.request = GreenTLSSocket(conn.sock, sslobj, incoming, outgoing)
        return DONE


# -- the thread models' socket --------------------


class TLSSocket(ssl.SSLSocket):
    """The handler's ``self.request`` under TLS in the thread models: an
    ``ssl.SSLSocket`` that keeps the server's time-outs (see the module's
    docstring) and sends close_notify when its write side is shut down."""

    # Set by _ns_arm() once the handshake is done.
    _ns_idle: float | None = None
    _ns_write: float | None = None
    _ns_deadline: float | None = None
    _ns_clock: Callable[[], float] = time.monotonic
    _ns_set: float | None = None
    # Whether the handler set a time-out of its own (the stdlib's rules then).
    _ns_user = True

    def _ns_arm(self, accepted: Any) -> None:
        """Take the accepted socket's time-outs (a ``_limits.TimedSocket``'s)."""
        idle = getattr(accepted, "_ns_idle", None)
        write = getattr(accepted, "_ns_write", None)
        deadline = getattr(accepted, "_ns_deadline", None)
        if hasattr(accepted, "_ns_idle"):
            # The kernel's time-outs would make a blocking SSL read spin; the
            # Python ones below replace them.
            self.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _NO_TIMEOUT)
            self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _NO_TIMEOUT)
            self._ns_clock = accepted._ns_clock
        self._ns_idle, self._ns_write, self._ns_deadline = idle, write, deadline
        self._ns_user = False
        self._ns_set = 0.0  # as the stage left it
        self._ns_before(False)

    def settimeout(self, value: float | None) -> None:
        super().settimeout(value)
        self._ns_user = True

    def setblocking(self, flag: bool) -> None:
        super().setblocking(flag)
        self._ns_user = True

    def gettimeout(self) -> float | None:
        return super().gettimeout() if self._ns_user else None

    def _ns_before(self, writing: bool) -> None:
        """Set the socket's time-out to the limit of the wait to come."""
        if self._ns_user:
            return
        limit = self._ns_write if writing else self._ns_idle
        deadline = self._ns_deadline
        if deadline is not None:
            remaining = deadline - self._ns_clock()
            if remaining <= 0:
                raise age_reached()
            limit = remaining if limit is None else min(limit, remaining)
        if limit != self._ns_set:
            _settimeout(self, limit)
            self._ns_set = limit

    def _ns_expired(self, writing: bool) -> ConnectionTimeout:
        deadline = self._ns_deadline
        if deadline is not None and self._ns_clock() >= deadline:
            return age_reached()
        if writing:
            return ConnectionTimeout(
                f"the peer read nothing for {self._ns_write} s", "write_timeout"
            )
        return ConnectionTimeout(f"the peer sent nothing for {self._ns_idle} s", "idle_timeout")

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        self._ns_before(False)
        try:
            return super().read(len, buffer)
        except TimeoutError as exc:
            if self._ns_user or isinstance(exc, ConnectionTimeout):
                raise
            raise self._ns_expired(False) from None

    def write(self, data: ReadableBuffer) -> int:
        self._ns_before(True)
        try:
            return super().write(data)
        except TimeoutError as exc:
            if self._ns_user or isinstance(exc, ConnectionTimeout):
                raise
            raise self._ns_expired(True) from None

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        self._ns_before(True)
        try:
            return super().send(data, flags)
        except TimeoutError as exc:
            if self._ns_user or isinstance(exc, ConnectionTimeout):
                raise
            raise self._ns_expired(True) from None

    def unwrap(self) -> socket.socket:
        self._ns_before(True)
        try:
            return super().unwrap()
        except TimeoutError as exc:
            if self._ns_user or isinstance(exc, ConnectionTimeout):
                raise
            raise self._ns_expired(True) from None

    def shutdown(self, how: int) -> None:
        if how != socket.SHUT_RD and self._sslobj is not None:  # type: ignore[attr-defined]
            _close_notify_now(self)
        super().shutdown(how)


def _close_notify_now(tls: ssl.SSLSocket) -> None:
    """Send close_notify if the socket takes it now; never wait for the peer."""
    sslobj = tls._sslobj  # type: ignore[attr-defined]
    try:
        _settimeout(tls, 0.0)
        sslobj.shutdown()
    except (OSError, ValueError):
        # Want-read: sent, and the peer's own has not come (we do not wait for
        # it); want-write: no room, dropped; or the session is broken already.
        pass


# -- the hub's socket --------------------


class GreenTLSSocket:
    """The handler's ``self.request`` under TLS on the hub: the ``SSLSocket``
    API handlers use, over an ``ssl.SSLObject`` and the connection's
    ``GreenSocket``, so that every wait is the hub's (cooperative, with the
    server's limits). Everything else (``fileno``, ``getpeername``,
    ``settimeout``, ``setsockopt`` ...) is the ``GreenSocket``'s."""

    def __init__(
        self, sock: Any, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> None:
        self._sock = sock
        self._sslobj: ssl.SSLObject | None = sslobj
        self._incoming = incoming
        self._outgoing = outgoing
        self._io_refs = 0
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def __repr__(self) -> str:
        return f"<GreenTLSSocket {self.version()} over {self._sock!r}>"

    def _obj(self) -> ssl.SSLObject:
        sslobj = self._sslobj
        if sslobj is None:
            raise ValueError("I/O on a closed or unwrapped TLS socket")
        return sslobj

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._sock.sendall(data)

    def _fill(self) -> None:
        """Wait (cooperatively) for more of the peer's records."""
        self._flush()
        data = self._sock.recv(_CHUNK)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    # -- reading ---------------------------------------------------------------------------

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        sslobj = self._obj()
        while True:
            try:
                data = sslobj.read(len) if buffer is None else sslobj.read(len, buffer)
            except ssl.SSLWantReadError:
                self._fill()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # close_notify, or an EOF without it (as SSLSocket's
                # suppress_ragged_eofs): the end of the stream.
                return b"" if buffer is None else 0
            if self._outgoing.pending:
                self._flush()  # a TLS 1.3 key update's answer
            return data

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if flags:
            raise ValueError("non-zero flags not allowed in calls to recv() on a TLS socket")
        data: bytes = self.read(bufsize)
        return data

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        if flags:
            raise ValueError("non-zero flags not allowed in calls to recv_into() on a TLS socket")
        with memoryview(buffer) as view:
            count: int = self.read(nbytes or view.nbytes, buffer)
        return count

    def pending(self) -> int:
        return self._obj().pending()

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: ReadableBuffer) -> int:
        sent = self._obj().write(data)
        self._flush()
        return sent

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        if flags:
            raise ValueError("non-zero flags not allowed in calls to send() on a TLS socket")
        with memoryview(data) as view:
            return self.write(view[:_SEND_CHUNK])

    def sendall(self, data: ReadableBuffer, flags: int = 0) -> None:
        if flags:
            raise ValueError("non-zero flags not allowed in calls to sendall() on a TLS socket")
        with memoryview(data) as whole, whole.cast("B") as view:
            for start in range(0, view.nbytes, _SEND_CHUNK):
                self.write(view[start : start + _SEND_CHUNK])

    def makefile(self, mode: str = "r", buffering: int | None = None, **text: Any) -> Any:
        """As ``socket.makefile()``, over this socket's ``recv_into``/``send``."""
        rawmode = ("r" if "r" in mode else "") + ("w" if "w" in mode else "")
        raw = socket.SocketIO(self, rawmode)  # type: ignore[arg-type]
        self._io_refs += 1
        if buffering is None or buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            return raw
        buffered: Any
        if "r" in mode and "w" in mode:
            buffered = io.BufferedRWPair(raw, raw, buffering)
        elif "r" in mode:
            buffered = io.BufferedReader(raw, buffering)
        else:
            buffered = io.BufferedWriter(raw, buffering)
        if "b" in mode:
            return buffered
        return io.TextIOWrapper(buffered, **text)

    def _netserve_raw_reader(self) -> Any:
        """rfile's raw file (``_lines.open_reader``, which bounds its lines)."""
        self._io_refs += 1
        return socket.SocketIO(self, "r")  # type: ignore[arg-type]

    def _decref_socketios(self) -> None:
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._closed and not self._io_refs:
            self._sock.close()

    # -- the session -----------------------------------------------------------------------

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._obj().getpeercert(binary_form)

    def selected_alpn_protocol(self) -> str | None:
        return self._obj().selected_alpn_protocol()

    def version(self) -> str | None:
        return None if self._sslobj is None else self._sslobj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._obj().cipher()

    def shared_ciphers(self) -> list[tuple[str, str, int]] | None:
        return self._obj().shared_ciphers()

    def compression(self) -> str | None:
        return self._obj().compression()

    def get_channel_binding(self, cb_type: str = "tls-unique") -> bytes | None:
        return self._obj().get_channel_binding(cb_type)

    @property
    def context(self) -> ssl.SSLContext:
        return self._obj().context

    @property
    def session(self) -> ssl.SSLSession | None:
        return self._obj().session

    @property
    def session_reused(self) -> bool:
        return self._obj().session_reused

    @property
    def server_side(self) -> bool:
        return True

    # -- closing ---------------------------------------------------------------------------

    def unwrap(self) -> Any:
        """End TLS (close_notify both ways) and return the plain cooperative socket."""
        sslobj = self._obj()
        while True:
            try:
                sslobj.unwrap()
                break
            except ssl.SSLWantReadError:
                self._fill()
        self._flush()
        self._sslobj = None
        return self._sock

    def shutdown(self, how: int) -> None:
        sslobj = self._sslobj
        if how != socket.SHUT_RD and sslobj is not None:
            self._sslobj = None
            try:
                sslobj.unwrap()
            except (OSError, ValueError):
                pass  # sent (want-read: the peer's is not awaited), or broken
            data = self._outgoing.read()
            if data:
                try:
                    # The descriptor's own send: never wait on a peer that does not read.
                    _socket.socket.send(self._sock, data, _DONTWAIT)
                except OSError:
                    pass
        self._sock.shutdown(how)

    def close(self) -> None:
        self._closed = True
        self._sslobj = None
        if not self._io_refs:
            self._sock.close()

    def detach(self) -> int:
        self._sslobj = None
        fd: int = self._sock.detach()
        return fd
