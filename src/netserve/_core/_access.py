"""The access log (issue 14, section 2): one line per request, when asked for.

A server with ``access_log = True`` (the command's ``--access-log``) logs one
INFO record per request on ``netserve.access``, as its connection closes:

    127.0.0.1:40112 client=203.0.113.7:5555 0.012s in=18 out=25 handled

- the peer (the address the connection came from: a proxy, behind one), and
  ``client=`` the client the handler saw when a PROXY header named another;
- the duration, from the start of the request's stages (or its handler) to
  its close; in the pool, the wait while parked comes before that start;
- the bytes received and sent on the connection (TCP only: the kernel's own
  counts, ``TCP_INFO``, read once as it closes; TLS bytes on a TLS
  connection; ``-`` elsewhere);
- the outcome: ``handled``, ``error``, ``disconnected``, ``line_too_long``,
  ``refused``, ``stage_failed``, ``timeout:<setting>``.

The fields are also on the record as a ``netserve`` dict, so that the JSON
format (``JsonFormatter``) gives each its own key. Off by default: a line per
request is a cost a server should choose; when it is off, the runner pays one
attribute test per request.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from netserve._core._connections import (
    DISCONNECTED,
    FAILED,
    HANDLED,
    LINE_TOO_LONG,
    REFUSED,
    STAGE_FAILED,
    TIMED_OUT,
    TIMEOUT_KINDS,
    outcome_base,
)
from netserve._core._log import get_logger
from netserve._edges._proxy import proxy_header

__all__ = ["outcome_name", "run_logged"]

log = get_logger("access")

# struct tcp_info (linux/tcp.h): tcpi_bytes_received (a u64 at offset 128,
# Linux 4.1+) and tcpi_bytes_sent (at offset 200, Linux 4.19+), less
# tcpi_bytes_retrans (offset 208: bytes_sent counts each retransmission
# again); before 4.19, tcpi_bytes_acked (offset 120) stands in for what was sent.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_U64 = struct.Struct("=Q")
_RECEIVED, _SENT, _RETRANS, _ACKED = 128, 200, 208, 120
_INFO_SIZE = 256
# tcpi_state (the first byte), from include/net/tcp_states.h: the states in
# which the peer's FIN has arrived, and those in which ours was acknowledged.
_PEER_CLOSED = frozenset({6, 8, 9, 11})  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING
_FIN_ACKED = frozenset({5, 6})  # FIN_WAIT2, TIME_WAIT
_CLOSE = 7

_BASE_NAMES = {
    HANDLED: "handled",
    FAILED: "error",
    STAGE_FAILED: "stage_failed",
    REFUSED: "refused",
}


def outcome_name(outcome: int) -> str:
    """A request's outcome (``_connections``), as the access log names it."""
    base = outcome_base(outcome)
    if base == TIMED_OUT:
        kind = TIMEOUT_KINDS[outcome >> 5]
        return f"timeout:{kind}" if kind else "timeout"
    if outcome & DISCONNECTED:
        return "disconnected"
    if outcome & LINE_TOO_LONG:
        return "line_too_long"
    return _BASE_NAMES.get(base, str(outcome))


def run_logged(
    run: Callable[[Any, Any, Any], int],
    clock: Callable[[], float],
    request: Any,
    client_address: Any,
    staged: Any,
) -> int:
    """``run(request, client_address, staged)`` (the request runner), then one
    access log line for it."""
    sock = request if staged is None else staged.sock
    # A duplicate descriptor keeps the kernel's socket, and its counts, past
    # the runner's close (the peer has its end of the stream by then).
    counted = _duplicate(sock)
    started = clock()
    outcome = FAILED
    try:
        outcome = run(request, client_address, staged)
        return outcome
    finally:
        duration = clock() - started
        counts: tuple[int | None, int | None] = (None, None)
        if counted is not None:
            counts = _byte_counts(counted)
            counted.close()
        _log_one(sock, client_address, duration, counts, outcome)


def _duplicate(sock: Any) -> socket.socket | None:
    if (
        _TCP_INFO is None
        or not isinstance(sock, socket.socket)
        or sock.type != socket.SOCK_STREAM
        or sock.family not in (socket.AF_INET, socket.AF_INET6)
    ):
        return None
    try:
        return socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return None


def _byte_counts(sock: socket.socket) -> tuple[int | None, int | None]:
    assert _TCP_INFO is not None  # (_duplicate() made no socket without it)
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _INFO_SIZE)
    except OSError:
        return None, None
    received = _U64.unpack_from(info, _RECEIVED)[0] if len(info) >= _RECEIVED + 8 else None
    if received and _fin_received(sock, info[0]):
        received -= 1  # the peer's FIN takes a sequence number: it is no byte
    at = _SENT if len(info) >= _SENT + 8 else _ACKED
    sent = _U64.unpack_from(info, at)[0] if len(info) >= at + 8 else None
    if sent is not None and at == _SENT and len(info) >= _RETRANS + 8:
        sent -= _U64.unpack_from(info, _RETRANS)[0]
    if sent and at == _ACKED and info[0] in _FIN_ACKED:
        sent -= 1  # ours, acknowledged
    return received, sent


def _fin_received(sock: socket.socket, state: int) -> bool:
    if state in _PEER_CLOSED:
        return True
    # CLOSE: our FIN went first and the peer's then ended the socket (Linux
    # moves it on to a time-wait entry), or a reset did, which counts nothing.
    return state == _CLOSE and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, bytes):
        address = address.decode(errors="replace")
    return str(address) if address else "-"


def _log_one(
    sock: Any,
    peer: Any,
    duration: float,
    counts: tuple[int | None, int | None],
    outcome: int,
) -> None:
    received, sent = counts
    header = proxy_header(sock)
    client = header.source if header is not None else None
    fields = {
        "peer": _address(peer),
        "client": _address(client) if client is not None else None,
        "duration": round(duration, 6),
        "bytes_in": received,
        "bytes_out": sent,
        "outcome": outcome_name(outcome),
    }
    log.info(
        "%s%s %.3fs in=%s out=%s %s",
        fields["peer"],
        f" client={fields['client']}" if client is not None else "",
        duration,
        "-" if received is None else received,
        "-" if sent is None else sent,
        fields["outcome"],
        extra={"netserve": fields},
    )
