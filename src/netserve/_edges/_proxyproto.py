"""The PROXY protocol, versions 1 and 2: a sans-IO parser (HAProxy's proxy-protocol.txt).

Theory of operation
-------------------
``parse_header(data, version)`` looks at the bytes a connection has sent so
far and answers one of three things:

* ``None``: these bytes could still start a valid header; read more and call
  again with everything read so far (any fragmentation, down to one byte at a
  time, gives the same answer once the header is complete);
* ``(header, consumed)``: a complete, valid header, which is exactly the first
  ``consumed`` bytes; everything after them is the peer's payload and belongs
  to the handler;
* ``ProxyProtocolError``: these bytes cannot start a valid header; the spec
  says to abort the connection. It is raised as soon as the bytes rule a
  header out, not only once a header's worth has arrived.

It never touches a socket and keeps no state: the caller keeps the buffer (the
stage in ``_proxy``). Every size is bounded (``V1_MAX_SIZE``,
``V2_MAX_SIZE``), so a caller that stops at the first non-``None`` answer
never buffers more than ``MAX_HEADER_SIZE`` bytes.

The spec's rules the parser keeps: the receiver is told which version to
expect and does not guess beyond it (``version``); LOCAL (v2) and UNKNOWN (v1)
mean "use the socket's own addresses", so their headers carry no addresses
here; a CRC32C TLV is verified over the whole header; unknown TLV types are
kept raw rather than refused, as the spec asks receivers to ignore them.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
import socket
import struct
from typing import Literal, TypeAlias, TypeVar

from netserve._core._errors import ProxyProtocolError

__all__ = [
    "MAX_HEADER_SIZE",
    "V1_MAX_SIZE",
    "V2_MAX_SIZE",
    "V2_SIGNATURE",
    "Address",
    "Command",
    "Family",
    "ProxyHeader",
    "SSLInfo",
    "Transport",
    "crc32c",
    "parse_header",
]

#: The v1 line's limit, CRLF included (the spec's worst case: a TCP6 line).
V1_MAX_SIZE = 107
#: The largest v2 address block and TLVs accepted (the header is 16 bytes more).
#: The length field allows 65,535, but the spec expects headers to fit in one
#: 536-byte TCP segment; what real senders add beyond the addresses (an SSL TLV
#: with a client certificate's CN, a 128-byte unique id, an authority, a cloud
#: endpoint id) stays well under 4,096. A larger one is refused rather than
#: buffered: 64 KiB per connection waiting in a stage is a cheap flood.
V2_MAX_SIZE = 4096
#: The most a caller buffers before the parser answers one way or the other.
MAX_HEADER_SIZE = 16 + V2_MAX_SIZE
#: The first 12 bytes of every v2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_START = b"PROXY "

# A UNIQUE_ID TLV is at most this long (the spec's limit).
_UNIQUE_ID_MAX = 128


class Command(enum.IntEnum):
    """What the proxy says about the connection (v2's low nibble of byte 12)."""

    #: The proxy's own connection (a health check): keep the socket's addresses.
    LOCAL = 0
    #: A relayed connection: the header carries the original endpoints.
    PROXY = 1


class Family(enum.IntEnum):
    """The address family of the original connection (v2's high nibble of byte 13)."""

    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


class Transport(enum.IntEnum):
    """The transport of the original connection (v2's low nibble of byte 13)."""

    UNSPEC = 0
    STREAM = 1
    DGRAM = 2


# The shape getpeername() gives for the family: (host, port) for INET,
# (host, port, flowinfo, scope_id) for INET6, a path for UNIX (bytes for a
# Linux abstract name, which starts with a NUL byte).
Address: TypeAlias = tuple[str, int] | tuple[str, int, int, int] | str | bytes

# TLV types (the spec's section 2.2).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
# The custom range (0xE0-0xEF) as the clouds use it.
PP2_TYPE_GCP = 0xE0
PP2_TYPE_AWS = 0xEA
PP2_TYPE_AZURE = 0xEE

# The SSL TLV's client field.
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

# Address block sizes by family, for a PROXY command.
_BLOCK_SIZE = {Family.INET: 12, Family.INET6: 36, Family.UNIX: 216}
_VALID_FAMILY_BYTES = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})
_UNIX_PATH = 108

_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


@dataclasses.dataclass(frozen=True)
class SSLInfo:
    """The SSL TLV: how the client reached the proxy."""

    #: The client field: PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN, PP2_CLIENT_CERT_SESS bits.
    client: int
    #: 0 when the client presented a certificate that verified.
    verify: int
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    #: Every sub-TLV as sent, (type, value), the typed ones included.
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def client_used_ssl(self) -> bool:
        """Whether the client spoke TLS to the proxy. The client field's bit,
        not ``verify == 0``: HAProxy sends this TLV with zero flags and zero
        ``verify`` for a client that spoke plain TCP."""
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def client_cert(self) -> bool:
        """Whether the client presented a certificate (on this connection or its session)."""
        return bool(self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS))

    @property
    def verified(self) -> bool:
        """Whether the client presented a certificate and it verified."""
        return self.client_cert and self.verify == 0


@dataclasses.dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY protocol header (either version)."""

    #: 1 or 2.
    version: int
    command: Command
    family: Family
    transport: Transport
    #: The original client, in the shape getpeername() gives for ``family``;
    #: None when the socket's own addresses stand (LOCAL, UNSPEC, v1 UNKNOWN).
    source: Address | None
    #: The address the client connected to, in the same shape; None as ``source``.
    destination: Address | None
    #: Every TLV as sent, (type, value), except NOOP and CRC32C.
    tlvs: tuple[tuple[int, bytes], ...] = ()
    alpn: bytes | None = None
    #: The host name the client asked for (TLS SNI or Host), UTF-8.
    authority: str | None = None
    unique_id: bytes | None = None
    ssl: SSLInfo | None = None
    netns: str | None = None
    #: The CRC32C the header carried (already verified), if any.
    crc32c: int | None = None

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type ``kind``, or None."""
        for found, value in self.tlvs:
            if found == kind:
                return value
        return None

    @property
    def aws(self) -> bytes | None:
        """The AWS TLV (0xEA) raw: a subtype byte (0x01: VPC endpoint id), then the value."""
        return self.tlv(PP2_TYPE_AWS)

    @property
    def azure(self) -> bytes | None:
        """The Azure TLV (0xEE) raw: a subtype byte (0x01: the private endpoint's LinkID)."""
        return self.tlv(PP2_TYPE_AZURE)

    @property
    def gcp(self) -> bytes | None:
        """The GCP TLV (0xE0) raw: the Private Service Connect connection id."""
        return self.tlv(PP2_TYPE_GCP)


Version = Literal["v1", "v2", "any"]


def parse_header(
    data: bytes | bytearray | memoryview, version: Version = "any"
) -> tuple[ProxyHeader, int] | None:
    """Parse a header from the start of ``data`` (see the module's docstring)."""
    data = bytes(data)
    if version not in ("v1", "v2", "any"):
        raise ValueError(f"version must be 'v1', 'v2' or 'any', not {version!r}")
    could_be_v2 = version != "v1" and _could_start(data, V2_SIGNATURE)
    could_be_v1 = version != "v2" and _could_start(data, _V1_START)
    if could_be_v2:
        return _parse_v2(data)
    if could_be_v1:
        return _parse_v1(data)
    expected = {"v1": "a v1", "v2": "a v2", "any": "a"}[version]
    raise ProxyProtocolError(f"not {expected} PROXY protocol header: {data[:16]!r}")


def _could_start(data: bytes, prefix: bytes) -> bool:
    size = min(len(data), len(prefix))
    return data[:size] == prefix[:size]


# -- version 1 ----------------------------------------------------------------------------


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\n", 0, V1_MAX_SIZE)
    if end < 0:
        if len(data) >= V1_MAX_SIZE:
            raise ProxyProtocolError(f"no CRLF in the first {V1_MAX_SIZE} bytes of a v1 header")
        if b"\r" in data[:-1]:
            raise ProxyProtocolError("a CR without its LF in a v1 header")
        return None
    if data[end - 1 : end] != b"\r" or b"\r" in data[: end - 1]:
        raise ProxyProtocolError("a v1 header must end with CRLF")
    line = data[: end - 1]
    consumed = end + 1
    parts = line.split(b" ")
    if len(parts) < 2:
        raise ProxyProtocolError("a v1 header without its protocol")
    protocol = parts[1]
    if protocol == b"UNKNOWN":
        # The rest of the line may be anything (the spec): the socket's addresses stand.
        return _v1_header(Family.UNSPEC, Transport.UNSPEC, None, None), consumed
    if protocol == b"TCP4":
        family, af = Family.INET, socket.AF_INET
    elif protocol == b"TCP6":
        family, af = Family.INET6, socket.AF_INET6
    else:
        raise ProxyProtocolError(f"unknown v1 protocol {protocol!r}")
    if len(parts) != 6:
        raise ProxyProtocolError(f"a v1 {protocol.decode()} header has six fields: {line!r}")
    src = _v1_host(parts[2], af)
    dst = _v1_host(parts[3], af)
    sport = _v1_port(parts[4])
    dport = _v1_port(parts[5])
    if family == Family.INET:
        source: Address = (src, sport)
        destination: Address = (dst, dport)
    else:
        source, destination = (src, sport, 0, 0), (dst, dport, 0, 0)
    return _v1_header(family, Transport.STREAM, source, destination), consumed


def _v1_header(
    family: Family, transport: Transport, source: Address | None, destination: Address | None
) -> ProxyHeader:
    return ProxyHeader(1, Command.PROXY, family, transport, source, destination)


def _v1_host(field: bytes, af: int) -> str:
    try:
        text = field.decode("ascii")
        # ipaddress is strict where inet_pton is lax (leading zeros, "1.2.3"); a
        # scope ("%eth0") is no part of the spec's address forms.
        if "%" in text:
            raise ValueError(text)
        address = (
            ipaddress.IPv4Address(text) if af == socket.AF_INET else ipaddress.IPv6Address(text)
        )
    except ValueError:
        raise ProxyProtocolError(f"not an address of the v1 protocol named: {field!r}") from None
    # As getpeername() writes it.
    return socket.inet_ntop(af, address.packed)


def _v1_port(field: bytes) -> int:
    if not _PORT.fullmatch(field) or int(field) > 65535:
        raise ProxyProtocolError(f"not a port: {field!r}")
    return int(field)


# -- version 2 ----------------------------------------------------------------------------


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) > 12:
        if data[12] >> 4 != 2:
            raise ProxyProtocolError(f"v2 header of version {data[12] >> 4}")
        if data[12] & 0x0F not in (Command.LOCAL, Command.PROXY):
            raise ProxyProtocolError(f"unknown v2 command {data[12] & 0x0F}")
    if len(data) < 16:
        return None
    command = Command(data[12] & 0x0F)
    family_byte = data[13]
    (length,) = struct.unpack_from("!H", data, 14)
    if length > V2_MAX_SIZE:
        raise ProxyProtocolError(f"v2 header of {length} bytes (at most {V2_MAX_SIZE} accepted)")
    if command == Command.PROXY and family_byte not in _VALID_FAMILY_BYTES:
        raise ProxyProtocolError(f"unknown v2 family and transport 0x{family_byte:02x}")
    consumed = 16 + length
    if len(data) < consumed:
        return None
    header = data[:consumed]
    family = _enum_or_unspec(Family, family_byte >> 4)
    transport = _enum_or_unspec(Transport, family_byte & 0x0F)
    if command == Command.LOCAL or family == Family.UNSPEC:
        # LOCAL: use the real endpoints and skip the block, whatever its length
        # (the spec). UNSPEC: the addresses are unknown, and so is the block.
        return ProxyHeader(2, command, family, transport, None, None), consumed
    block = _BLOCK_SIZE[family]
    if length < block:
        raise ProxyProtocolError(f"v2 {family.name} header of {length} bytes (needs {block})")
    source, destination = _v2_addresses(family, header[16 : 16 + block])
    base = ProxyHeader(2, command, family, transport, source, destination)
    return _v2_tlvs(header, 16 + block, base), consumed


_E = TypeVar("_E", Family, Transport)


def _enum_or_unspec(kind: type[_E], value: int) -> _E:
    # Only a LOCAL header gets here with an unknown nibble (its block is ignored).
    try:
        return kind(value)
    except ValueError:
        return kind(0)


def _v2_addresses(family: Family, block: bytes) -> tuple[Address, Address]:
    if family == Family.INET:
        src = socket.inet_ntop(socket.AF_INET, block[0:4])
        dst = socket.inet_ntop(socket.AF_INET, block[4:8])
        sport, dport = struct.unpack_from("!HH", block, 8)
        return (src, sport), (dst, dport)
    if family == Family.INET6:
        src = socket.inet_ntop(socket.AF_INET6, block[0:16])
        dst = socket.inet_ntop(socket.AF_INET6, block[16:32])
        sport, dport = struct.unpack_from("!HH", block, 32)
        return (src, sport, 0, 0), (dst, dport, 0, 0)
    return _unix_path(block[:_UNIX_PATH]), _unix_path(block[_UNIX_PATH:])


def _unix_path(raw: bytes) -> str | bytes:
    if raw[:1] == b"\x00":
        # A Linux abstract name: getpeername() gives bytes. Its length is not
        # sent, so the padding is taken for the end of the name.
        return raw.rstrip(b"\x00")
    path = raw.split(b"\x00", 1)[0]
    return path.decode("utf-8", "surrogateescape")


def _split_tlvs(data: bytes, start: int, end: int, what: str) -> list[tuple[int, int, int]]:
    """(type, value start, value end) for each TLV in ``data[start:end]``."""
    found = []
    at = start
    while at < end:
        if end - at < 3:
            raise ProxyProtocolError(f"a truncated {what} ({end - at} bytes left)")
        kind = data[at]
        (size,) = struct.unpack_from("!H", data, at + 1)
        value_end = at + 3 + size
        if value_end > end:
            raise ProxyProtocolError(f"{what} 0x{kind:02x} of {size} bytes overruns the header")
        found.append((kind, at + 3, value_end))
        at = value_end
    return found


def _v2_tlvs(header: bytes, start: int, base: ProxyHeader) -> ProxyHeader:
    """``base`` with the TLVs from ``header[start:]``."""
    kept: list[tuple[int, bytes]] = []
    alpn = unique_id = None
    authority = netns = None
    ssl: SSLInfo | None = None
    crc: int | None = None
    for kind, begin, end in _split_tlvs(header, start, len(header), "TLV"):
        value = header[begin:end]
        if kind == PP2_TYPE_NOOP:
            continue
        if kind == PP2_TYPE_CRC32C:
            if crc is not None:
                raise ProxyProtocolError("two CRC32C TLVs")
            crc = _check_crc(header, begin, value)
            continue
        kept.append((kind, value))
        # The first of each type counts, should a sender repeat one.
        if kind == PP2_TYPE_ALPN and alpn is None:
            alpn = value
        elif kind == PP2_TYPE_AUTHORITY and authority is None:
            authority = _text(value, "AUTHORITY")
        elif kind == PP2_TYPE_UNIQUE_ID:
            if len(value) > _UNIQUE_ID_MAX:
                raise ProxyProtocolError(f"a UNIQUE_ID of {len(value)} bytes (at most 128)")
            if unique_id is None:
                unique_id = value
        elif kind == PP2_TYPE_SSL and ssl is None:
            ssl = _ssl_info(value)
        elif kind == PP2_TYPE_NETNS and netns is None:
            netns = _text(value, "NETNS")
    return dataclasses.replace(
        base,
        tlvs=tuple(kept),
        alpn=alpn,
        authority=authority,
        unique_id=unique_id,
        ssl=ssl,
        netns=netns,
        crc32c=crc,
    )


def _check_crc(header: bytes, begin: int, value: bytes) -> int:
    if len(value) != 4:
        raise ProxyProtocolError(f"a CRC32C TLV of {len(value)} bytes (needs 4)")
    sent = int.from_bytes(value, "big")
    computed = crc32c(header[:begin] + b"\x00\x00\x00\x00" + header[begin + 4 :])
    if computed != sent:
        raise ProxyProtocolError(f"CRC32C mismatch: sent 0x{sent:08x}, computed 0x{computed:08x}")
    return sent


_SSL_TEXT = {
    PP2_SUBTYPE_SSL_VERSION: "version",
    PP2_SUBTYPE_SSL_CN: "cn",
    PP2_SUBTYPE_SSL_CIPHER: "cipher",
    PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg",
    PP2_SUBTYPE_SSL_KEY_ALG: "key_alg",
}


def _ssl_info(value: bytes) -> SSLInfo:
    if len(value) < 5:
        raise ProxyProtocolError(f"an SSL TLV of {len(value)} bytes (needs 5 at least)")
    client = value[0]
    (verify,) = struct.unpack_from("!I", value, 1)
    texts: dict[str, str] = {}
    subs = []
    for kind, begin, end in _split_tlvs(value, 5, len(value), "SSL sub-TLV"):
        sub = value[begin:end]
        subs.append((kind, sub))
        name = _SSL_TEXT.get(kind)
        if name is not None and name not in texts:
            texts[name] = _text(sub, name)
    return SSLInfo(client, verify, tlvs=tuple(subs), **texts)


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProxyProtocolError(f"{what} is not UTF-8: {value[:32]!r}") from None


# -- CRC32C (Castagnoli), for the CRC32C TLV ------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C (Castagnoli, reflected, as iSCSI and the PROXY protocol use it).

    Table-driven in pure Python: a header is at most ``MAX_HEADER_SIZE`` bytes,
    and the core stays free of dependencies."""
    table = _CRC32C_TABLE
    value = crc ^ 0xFFFFFFFF
    for byte in data:
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ 0xFFFFFFFF
