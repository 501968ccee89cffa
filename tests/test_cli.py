"""The netserve command: the demo server, its addresses, a clean Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from netserve._core._errors import AddressError
from netserve._serving._cli import BindAddress, _address_text, parse_bind
from tests.conftest import connect

BANNER = re.compile(r"netserve: upper-case echo server listening on (\S+)\n")


@contextmanager
def netserve_command(
    *args: str, command: list[str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start the command; yield the address it shows and the process.

    The whole four-line banner is read here and kept in ``proc.banner``.
    """
    proc = subprocess.Popen(
        [*(command or [sys.executable, "-m", "netserve"]), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()  # printed once the server listens
        match = BANNER.fullmatch(banner)
        assert match, banner
        proc.banner = banner + "".join(proc.stdout.readline() for _ in range(3))  # type: ignore[attr-defined]
        yield match[1], proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> tuple[int, str, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def echo_lines(address: object, family: int = socket.AF_INET) -> bytes:
    with connect(address, family) as client:
        client.sendall(b"hello\nnetserve\n")
        client.shutdown(socket.SHUT_WR)
        reader = client.makefile("rb")
        data = reader.read()
        reader.close()
        return data


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serves_upper_case_echo_and_stops_cleanly(sig: int) -> None:
    with netserve_command("--bind", "127.0.0.1:0") as (shown, proc):
        port = int(shown.rpartition(":")[2])
        assert echo_lines(("127.0.0.1", port)) == b"HELLO\nNETSERVE\n"
        # A client still connected must not keep the process from stopping.
        with connect(("127.0.0.1", port)) as idle_client:
            idle_client.sendall(b"x\n")
            assert idle_client.recv(10) == b"X\n"
            code, out, err = stop(proc, sig)
    assert code == 0
    assert "Traceback" not in err
    assert err == ""
    assert out.splitlines()[-1] == "netserve: stopped"


def test_banner_says_how_to_talk_to_it() -> None:
    with netserve_command("--bind", "127.0.0.1:0") as (shown, proc):
        port = shown.rpartition(":")[2]
        banner = proc.banner  # type: ignore[attr-defined]
        assert stop(proc)[0] == 0
    assert f"nc 127.0.0.1 {port}" in banner
    assert "Ctrl-C" in banner


def test_unix_socket(unix_path: str) -> None:
    with netserve_command("--bind", f"unix:{unix_path}") as (shown, proc):
        assert shown == f"unix:{unix_path}"
        assert echo_lines(unix_path, socket.AF_UNIX) == b"HELLO\nNETSERVE\n"
        banner = proc.banner  # type: ignore[attr-defined]
        assert stop(proc)[0] == 0
    assert f"nc -U {unix_path}" in banner
    assert not os.path.exists(unix_path)  # the socket file is removed on exit


def test_ipv6() -> None:
    with netserve_command("--bind", "[::1]:0") as (shown, proc):
        port = int(shown.rpartition(":")[2])
        assert shown.startswith("[::1]:")
        assert echo_lines(("::1", port), socket.AF_INET6) == b"HELLO\nNETSERVE\n"
        assert stop(proc)[0] == 0


def test_console_script() -> None:
    script = Path(sys.executable).parent / "netserve"
    assert script.exists(), "the netserve console script is not installed"
    with netserve_command("--bind", "127.0.0.1:0", command=[str(script)]) as (_, proc):
        assert stop(proc)[0] == 0


def test_address_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "netserve", "--bind", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 2  # a user's mistake (issue 12)
    assert result.stderr == f"netserve: cannot listen on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope", "is not HOST:PORT"),
        ("127.0.0.1:99999", "between 0 and 65535"),
        ("127.0.0.1:http", "is not a number"),
        ("::1:80", "in brackets"),
        ("unix:", "needs a path"),
        (":80", "is not HOST:PORT"),
    ],
)
def test_bad_bind_is_refused(text: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "netserve", "--bind", text],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    with pytest.raises(AddressError, match=re.escape(message)):
        parse_bind(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9999", BindAddress(socket.AF_INET, ("127.0.0.1", 9999))),
        ("[::1]:0", BindAddress(socket.AF_INET6, ("::1", 0))),
        ("unix:/run/x.sock", BindAddress(socket.AF_UNIX, "/run/x.sock")),
    ],
)
def test_parse_bind(text: str, expected: BindAddress) -> None:
    assert parse_bind(text) == expected
    assert str(parse_bind(text)) == text


def test_the_hint_for_a_tls_listener_is_openssl_s_client() -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
        assert _address_text(sock) == (f"127.0.0.1:{port}", f"nc 127.0.0.1 {port}")
        assert _address_text(sock, tls=True) == (
            f"127.0.0.1:{port}",
            f"openssl s_client -connect 127.0.0.1:{port}",
        )
