"""The PROXY protocol on a server: the policy (who must send a header) and the stage.

A server speaks it when its ``proxy_protocol`` attribute says which version to
expect (``"v1"``, ``"v2"`` or ``"any"``; None, the default, is off), and
``proxy_trusted`` names the peers that send it: addresses and networks (text
or ``ipaddress`` objects) and ``"unix"`` for every peer of a Unix socket. The
spec asks both: a receiver expects the header only where configured to, and
only from trusted peers, since whoever sends it chooses the client address the
handler sees.

* On the accept path, where ``verify_request()`` runs: a peer outside
  ``proxy_trusted`` is closed at once, counted as refused, before
  ``verify_request()`` (which keeps its stdlib arguments: the proxy's address).
* As the connection's first stage (``_stages``): the header is read off the
  stream, bounded by the stage deadline and by the parser's size limits; the
  bytes after it stay in the socket for the next stage (TLS) or the handler:
  the stage reads exactly the header. The handler's ``client_address``
  becomes the header's source, in the shape ``getpeername()`` gives for its
  family; a LOCAL header (a health check) and v1's UNKNOWN keep the socket's.
  ``proxy_header(self.request)`` gives the handler the parsed header.
* Anything invalid (a bad header, a peer that closes first) fails the stage:
  the connection is closed and counted, never ``handle_error()``.

Datagram servers: each datagram starts with its own header (a v2 header with
the DGRAM transport, as dnsdist sends it), parsed when its request runs. The
handler's ``client_address`` is the original client, and the request's socket
is a ``ProxiedDatagramSocket``: ``sendto(data, client_address)`` goes to the
proxy, the datagram's real source, so an unchanged ``DatagramRequestHandler``
replies through it. A datagram without a valid header is dropped and counted
as a stage failure.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import weakref
from collections.abc import Iterable
from typing import Any

from netserve._core._errors import ConfigurationError, ProxyProtocolError
from netserve._core._log import RateLimitedLog, get_logger
from netserve._core._stages import DONE, READ, Connection, Stage
from netserve._edges._proxyproto import (
    V1_MAX_SIZE,
    V2_SIGNATURE,
    ProxyHeader,
    Version,
    parse_header,
)

__all__ = ["ProxyPolicy", "ProxyStage", "proxy_header", "proxy_policy"]

log = get_logger("proxy")

_VERSIONS = ("v1", "v2", "any")
_SIGNATURE_SIZE = len(V2_SIGNATURE)
_V2_FIXED = 16  # the signature, version and command, family, length
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The header each connection's stage parsed, by the accepted socket. Weak: the
# entry goes with the socket, whatever becomes of the connection.
_headers: weakref.WeakKeyDictionary[Any, ProxyHeader] = weakref.WeakKeyDictionary()


def proxy_header(request: Any) -> ProxyHeader | None:
    """The PROXY protocol header the connection of ``request`` (a handler's
    ``self.request``) began with; None if it sent none (the server does not
    speak the protocol, or the request is a datagram).

    The header says what the client address alone cannot: the address the
    client connected to (``destination``), whether it was a health check
    (``command`` LOCAL), and the TLVs (ALPN, authority, TLS details, cloud ids).
    """
    if isinstance(request, tuple) and len(request) == 2:
        request = request[1]  # a datagram's (data, socket)
    # A stage's wrapper (PrefixedSocket) keeps the accepted socket as ``_sock``.
    for _ in range(8):
        if request is None:
            return None
        try:
            header = _headers.get(request)
        except TypeError:  # not weakly referenceable: not an accepted socket
            header = None
        if header is not None:
            return header
        request = getattr(request, "_sock", None)
    return None


class ProxyStage(Stage):
    """Reads one PROXY protocol header off a new stream connection."""

    __slots__ = ("buffer", "version")

    def __init__(self, version: Version) -> None:
        self.version = version
        self.buffer = b""

    def advance(self, conn: Connection) -> int:
        while True:
            # Exactly the header's bytes, never one past it: the stage after
            # this one (TLS) reads the socket itself, so nothing can be pushed
            # back. The parser still sees every byte as it comes.
            want = self._wanted(conn)
            if want is None:
                return READ
            chunk = conn.recv(want)
            if chunk is None:
                return READ
            if not chunk:
                raise ProxyProtocolError("the peer closed before its PROXY protocol header")
            self.buffer += chunk
            result = parse_header(self.buffer, self.version)
            if result is not None:
                break
        header, used = result
        if header.source is not None:
            conn.client_address = header.source
        _headers[conn.sock] = header
        conn.pushback(self.buffer[used:])  # nothing, as read above
        self.buffer = b""
        return DONE

    def _wanted(self, conn: Connection) -> int | None:
        """How many bytes the header has left at least (None: none has come)."""
        buffer = self.buffer
        size = len(buffer)
        # Twelve: v2's signature, and less than the shortest v1 header (15).
        if size < _SIGNATURE_SIZE:
            return _SIGNATURE_SIZE - size
        if buffer.startswith(V2_SIGNATURE):
            if size < _V2_FIXED:
                return _V2_FIXED - size
            return _V2_FIXED + int.from_bytes(buffer[14:16], "big") - size
        # v1: through the line's end if it is there, else all there is (all of
        # it header, up to v1's limit, which the parser enforces).
        peeked = conn.peek(V1_MAX_SIZE + 1 - size)
        if not peeked:
            return None if peeked is None else 1  # 1: recv() then reports the close
        end = peeked.find(b"\n")
        return len(peeked) if end < 0 else end + 1


class ProxiedDatagramSocket:
    """A datagram server's socket as a handler behind a proxy sees it.

    Everything is the socket's, except that ``sendto()`` to the original
    client (the handler's ``client_address``) goes to the proxy instead.
    """

    def __init__(self, sock: Any, proxy_address: Any, client_address: Any) -> None:
        self._sock = sock
        self._proxy_address = proxy_address
        self._client_address = client_address

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def __repr__(self) -> str:
        return f"<ProxiedDatagramSocket via {self._proxy_address!r} of {self._sock!r}>"

    def sendto(self, data: Any, flags_or_address: Any, address: Any = None) -> int:
        """As ``socket.sendto(data[, flags], address)``."""
        if address is None:
            flags, address = 0, flags_or_address
        else:
            flags = flags_or_address
        if address == self._client_address:
            address = self._proxy_address
        sent: int = self._sock.sendto(data, flags, address)
        return sent


class ProxyPolicy:
    """A server's PROXY protocol settings, checked once at construction."""

    __slots__ = ("_refused_log", "networks", "unix", "unix_server", "version")

    def __init__(
        self, version: Version, networks: tuple[_Network, ...], unix: bool, unix_server: bool
    ) -> None:
        self.version = version
        self.networks = networks
        self.unix = unix
        self.unix_server = unix_server
        self._refused_log = RateLimitedLog(log, logging.WARNING)

    def stage(self) -> ProxyStage:
        return ProxyStage(self.version)

    def datagram(self, request: Any, client_address: Any) -> tuple[Any, Any]:
        """A datagram's (request, client_address) past its header (the
        payload, and the original client); ProxyProtocolError if it has none."""
        data, sock = request
        result = parse_header(data, self.version)
        if result is None:
            raise ProxyProtocolError("a datagram with an incomplete PROXY protocol header")
        header, used = result
        client = client_address if header.source is None else header.source
        proxied = ProxiedDatagramSocket(sock, client_address, client)
        _headers[proxied] = header
        return (data[used:], proxied), client

    def trusts(self, client_address: Any) -> bool:
        """Whether the peer at ``client_address`` (as accept() gave it) may
        send a header; logs the refusal (sparingly) if not."""
        trusted = self.unix if self.unix_server else _in_networks(client_address, self.networks)
        if not trusted:
            self._refused_log.event(
                "refused a connection from %s: not in proxy_trusted", client_address
            )
        return trusted


def _in_networks(client_address: Any, networks: tuple[_Network, ...]) -> bool:
    try:
        host = client_address[0].partition("%")[0]  # an IPv6 scope is no part of it
        address = ipaddress.ip_address(host)
    except (TypeError, IndexError, AttributeError, ValueError):
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # a dual-stack socket's IPv4 peer
    return any(address in net or (mapped is not None and mapped in net) for net in networks)


def proxy_policy(server: Any) -> ProxyPolicy | None:
    """The policy for ``server``'s ``proxy_protocol`` and ``proxy_trusted``
    (None when off); ``ConfigurationError`` when they do not make sense."""
    version = getattr(server, "proxy_protocol", None)
    if version is None:
        return None
    if version not in _VERSIONS:
        raise ConfigurationError(
            f"proxy_protocol must be None, 'v1', 'v2' or 'any', not {version!r}"
        )
    trusted = getattr(server, "proxy_trusted", None)
    if not trusted:
        raise ConfigurationError(
            "proxy_protocol is set but proxy_trusted is not: name the proxies that send "
            "the header (addresses, networks such as '10.0.0.0/8', or 'unix'); a header "
            "from anyone else would let a client choose its own address"
        )
    networks, unix = _parse_trusted(trusted)
    unix_server = getattr(server, "address_family", None) == getattr(socket, "AF_UNIX", None)
    if unix_server and not unix:
        raise ConfigurationError(
            "a Unix socket server's peers have no address: put 'unix' in proxy_trusted"
        )
    return ProxyPolicy(version, networks, unix, unix_server)


def _parse_trusted(trusted: Any) -> tuple[tuple[_Network, ...], bool]:
    entries: Iterable[Any] = [trusted] if isinstance(trusted, str | bytes) else trusted
    networks: list[_Network] = []
    unix = False
    for entry in entries:
        if entry == "unix":
            unix = True
            continue
        try:
            # strict=False: "10.1.2.3/8" means the network 10.0.0.0/8.
            networks.append(ipaddress.ip_network(entry, strict=False))
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"proxy_trusted: {entry!r} is not an address, a network or 'unix'"
            ) from None
    return tuple(networks), unix
