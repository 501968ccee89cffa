"""Addresses that behave (issue 13, section 3): Unix stale files, clean-up,
mode, abstract names, peer credentials; explicit dual stack; datagrams past
max_packet_size, the receive buffer."""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Any

import pytest

import netserve
from netserve._edges._proxyproto import V2_SIGNATURE
from tests.conftest import LogEvent, Serving, connect, recv_all
from tests.models import MODELS


class Creds(netserve.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        peer = netserve.peer_credentials(self.request)
        self.wfile.write(b"%d %d %d\n" % (peer.pid, peer.uid, peer.gid))


def stale_socket_file(path: str) -> None:
    """A socket file nothing accepts on, as a killed server leaves it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()


def test_the_stdlib_classes_keep_eaddrinuse_on_a_stale_file(unix_path: str) -> None:
    stale_socket_file(unix_path)
    with pytest.raises(OSError) as raised:
        netserve.UnixStreamServer(unix_path, Creds)
    assert raised.value.errno == errno.EADDRINUSE


@pytest.mark.parametrize(
    "cls", [netserve.ThreadPoolUnixStreamServer, netserve.GreenUnixStreamServer]
)
def test_the_new_models_replace_a_stale_file_and_remove_theirs(unix_path: str, cls: type) -> None:
    stale_socket_file(unix_path)
    server: Any = cls(unix_path, Creds)
    with Serving(server), connect(unix_path, socket.AF_UNIX) as client:
        client.sendall(b"who\n")
        # The peer's credentials, as the kernel saw them at connect().
        assert recv_all(client) == b"%d %d %d\n" % (os.getpid(), os.getuid(), os.getgid())
    assert not os.path.exists(unix_path)  # removed on server_close()


@pytest.mark.parametrize("live", [True, False])
def test_a_live_socket_or_another_file_is_never_replaced(unix_path: str, live: bool) -> None:
    if live:
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.bind(unix_path)
        holder.listen()
    else:
        with open(unix_path, "w") as regular:
            regular.write("not a socket")
    try:
        with pytest.raises(OSError) as raised:
            netserve.ThreadPoolUnixStreamServer(unix_path, Creds)
        assert raised.value.errno == errno.EADDRINUSE
        assert os.path.exists(unix_path)
    finally:
        if live:
            holder.close()


def test_the_stdlib_classes_leave_their_file_and_the_mode_applies(unix_path: str) -> None:
    cls = type("Private", (netserve.UnixStreamServer,), {"unix_mode": 0o600})
    server = cls(unix_path, Creds)
    server.server_close()
    assert stat.S_IMODE(os.stat(unix_path).st_mode) == 0o600
    assert os.path.exists(unix_path)  # as the stdlib leaves it


def test_a_replaced_file_is_not_removed_by_the_old_server(unix_path: str) -> None:
    server = netserve.ThreadPoolUnixStreamServer(unix_path, Creds)
    server.socket.close()
    os.unlink(unix_path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with other:
        other.bind(unix_path)  # someone else's now
        server.server_close()
        assert os.path.exists(unix_path)


def test_an_abstract_name_has_no_file() -> None:
    name = f"\0netserve-test-{os.getpid()}"
    server = netserve.ThreadPoolUnixStreamServer(name, Creds)
    with Serving(server), connect(name, socket.AF_UNIX) as client:
        client.sendall(b"who\n")
        assert recv_all(client).startswith(b"%d " % os.getpid())


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_gives_the_handler_its_peers_credentials(unix_path: str, model: str) -> None:
    server: Any = MODELS[model].unix_stream(unix_path, Creds)
    with Serving(server), connect(unix_path, socket.AF_UNIX) as client:
        client.sendall(b"who\n")
        assert recv_all(client) == b"%d %d %d\n" % (os.getpid(), os.getuid(), os.getgid())


@pytest.mark.parametrize("model", ["threading", "hub"])
def test_peer_credentials_behind_the_proxy_protocol(unix_path: str, model: str) -> None:
    # The request is then a stage's PrefixedSocket (bytes read ahead of the handler).
    cls: Any = type(
        "Proxied", (MODELS[model].unix_stream,), {"proxy_protocol": "v2", "proxy_trusted": "unix"}
    )
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"  # a LOCAL header
    with cls(unix_path, Creds) as server, Serving(server):
        with connect(unix_path, socket.AF_UNIX) as client:
            client.sendall(local + b"who\n")
            assert recv_all(client) == b"%d %d %d\n" % (os.getpid(), os.getuid(), os.getgid())


# -- dual stack (issue 13, section 3) --------------------------------------------------


class Peer(netserve.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        self.wfile.write(self.client_address[0].encode())


def peer_seen(address: Any, family: int = socket.AF_INET) -> bytes:
    with connect(address, family) as client:
        client.sendall(b"who\n")
        return recv_all(client)


def v6only(server: Any) -> int:
    return int(server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))


def host_default_v6only() -> int:
    with socket.socket(socket.AF_INET6) as sock:
        return int(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))


@pytest.mark.parametrize("base", [netserve.ThreadPoolTCPServer, netserve.GreenTCPServer])
def test_dual_stack_is_explicit_in_the_new_models(base: type) -> None:
    # Both stacks when asked: an IPv4 client reaches [::], as a mapped address.
    both: Any = type("Both", (base,), {"address_family": socket.AF_INET6, "dualstack_ipv6": True})
    with both(("::", 0), Peer) as server, Serving(server):
        assert v6only(server) == 0
        assert peer_seen(("127.0.0.1", server.server_address[1])) == b"::ffff:127.0.0.1"
    # By default IPv6 only, whatever net.ipv6.bindv6only says.
    only: Any = type("Only", (base,), {"address_family": socket.AF_INET6})
    with only(("::", 0), Peer) as server, Serving(server):
        assert v6only(server) == 1
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", server.server_address[1]))
        assert peer_seen(("::1", server.server_address[1]), socket.AF_INET6) == b"::1"


def test_the_stdlib_classes_leave_dual_stack_to_the_host() -> None:
    cls: Any = type("V6", (netserve.TCPServer,), {"address_family": socket.AF_INET6})
    with cls(("::", 0), Peer) as server:
        assert v6only(server) == host_default_v6only()
    explicit: Any = type("V6", (cls,), {"dualstack_ipv6": False})
    with explicit(("::", 0), Peer) as server:
        assert v6only(server) == 1


# -- datagrams (issue 13, section 3) ---------------------------------------------------


class Length(netserve.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"%d" % len(self.rfile.read()))


@pytest.mark.parametrize(
    ("cls", "first_reply"),
    [
        (netserve.UDPServer, b"8192"),  # the stdlib's: cut, silently
        (netserve.ThreadPoolUDPServer, None),  # the new models: dropped, counted
        (netserve.GreenUDPServer, None),
    ],
)
def test_a_datagram_longer_than_max_packet_size(cls: type, first_reply: bytes | None) -> None:
    server: Any = cls(("127.0.0.1", 0), Length)
    with (
        LogEvent("netserve.limits", "longer than max_packet_size") as dropped,
        Serving(server),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.settimeout(10)
        client.sendto(b"x" * 9000, server.server_address)
        if first_reply is not None:
            assert client.recv(100) == first_reply
        else:
            assert dropped.event.wait(10)
        client.sendto(b"y" * 10, server.server_address)
        assert client.recv(100) == b"10"
    stats = server.statistics()
    assert (stats.refused, stats.handled) == ((0, 2) if first_reply else (1, 1))
    server.server_close()


def test_receive_buffer_size_is_applied_and_logged() -> None:
    cls = type("Buffered", (netserve.ThreadPoolUDPServer,), {"receive_buffer_size": 65536})
    with LogEvent("netserve.limits", "receive buffer") as logged:
        server: Any = cls(("127.0.0.1", 0), Length)
    with server:
        given = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert given >= 65536  # Linux doubles what it is asked for
        assert logged.messages == [
            f"datagram receive buffer: asked for 65536 bytes, the kernel gave {given}"
        ]
