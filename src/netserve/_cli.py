"""The ``netserve`` command: serves the upper-case echo demo.

``netserve`` listens on localhost:9999; ``--bind HOST:PORT``, ``--bind [V6]:PORT``
and ``--bind unix:PATH`` choose the address. SIGINT (Ctrl-C) and SIGTERM stop it
through ``shutdown()``, which is safe to call from the serving thread: the loop
leaves at once, the listener is closed and the process exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from dataclasses import dataclass
from types import FrameType

from netserve._combos import ThreadingTCPServer
from netserve._demo import UpperCaseEchoHandler
from netserve._errors import AddressError
from netserve._servers import TCPServer

__all__ = ["BindAddress", "main", "parse_bind"]

DEFAULT_BIND = "localhost:9999"


@dataclass(frozen=True)
class BindAddress:
    """A parsed ``--bind`` value: an address family and a socket address."""

    family: int
    address: str | tuple[str, int]

    def __str__(self) -> str:
        if isinstance(self.address, str):
            return f"unix:{self.address}"
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_bind(text: str) -> BindAddress:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT`` or ``unix:PATH``."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise AddressError("unix: needs a path, as in unix:/tmp/netserve.sock")
        return BindAddress(socket.AF_UNIX, path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{text!r} is not HOST:PORT, [IPV6]:PORT or unix:PATH")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        family = socket.AF_INET6
    elif ":" in host:
        raise AddressError(f"{text!r}: write an IPv6 address in brackets, as in [::1]:9999")
    else:
        family = socket.AF_INET
    try:
        port = int(port_text)
    except ValueError:
        raise AddressError(f"{text!r}: the port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"{text!r}: the port must be between 0 and 65535")
    if family == socket.AF_INET and not _is_ipv4_literal(host):
        # A name may resolve to either family; take the first the resolver offers.
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise AddressError(f"{text!r}: cannot resolve {host!r}: {exc}") from None
        family = infos[0][0]
    return BindAddress(family, (host, port))


def _is_ipv4_literal(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return False
    return True


def _bind_arg(text: str) -> BindAddress:
    try:
        return parse_bind(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _make_server(bind: BindAddress) -> TCPServer:
    server_class = type(
        "DemoServer",
        (ThreadingTCPServer,),
        {
            "address_family": bind.family,
            # Restarting the demo must not wait for TIME_WAIT to clear.
            "allow_reuse_address": bind.family != socket.AF_UNIX,
            # A connected client must not keep the process alive after a stop.
            "daemon_threads": True,
        },
    )
    server: TCPServer = server_class(bind.address, UpperCaseEchoHandler)
    return server


def _how_to_talk(bind: BindAddress, server: TCPServer) -> str:
    if bind.family == socket.AF_UNIX:
        nc = f"nc -U {bind.address}"
        py = f"socket.socket(socket.AF_UNIX); s.connect({bind.address!r})"
    else:
        host, port = server.server_address[:2]
        shown = BindAddress(bind.family, (str(host), int(port)))
        nc = f"nc {host} {port}"
        py = f"socket.create_connection({(str(host), int(port))!r})"
        bind = shown
    return (
        f"netserve: upper-case echo server listening on {bind}\n"
        f"  talk to it:  {nc}   (type a line; it comes back upper-cased)\n"
        f'  or:          python3 -c "import socket; s = {py}; '
        "s.sendall(b'hello\\n'); print(s.recv(100))\"\n"
        "  stop it with Ctrl-C"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the ``netserve`` command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="netserve",
        description="Serve the upper-case echo demo: each line sent comes back upper-cased.",
    )
    parser.add_argument(
        "--bind",
        type=_bind_arg,
        default=parse_bind(DEFAULT_BIND),
        metavar="ADDRESS",
        help=f"HOST:PORT, [IPV6]:PORT or unix:PATH (default {DEFAULT_BIND})",
    )
    args = parser.parse_args(argv)
    bind: BindAddress = args.bind
    try:
        server = _make_server(bind)
    except OSError as exc:
        print(f"netserve: cannot listen on {bind}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        server.shutdown()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with server:
            print(_how_to_talk(bind, server), flush=True)
            server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if bind.family == socket.AF_UNIX:
            _unlink_quietly(str(bind.address))
    print("netserve: stopped", flush=True)
    return 0


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


if __name__ == "__main__":  # pragma: no cover - python -m netserve._cli
    sys.exit(main())
