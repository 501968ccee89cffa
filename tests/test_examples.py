"""Each example under examples/ runs and prints what the documentation shows."""

from __future__ import annotations

import json
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

from tests.conftest import connect, recv_all

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


@contextmanager
def running_server(name: str) -> Iterator[tuple[int, list[str]]]:
    """Start an example server on a port the OS picks; yield (port, its output)."""
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / name)],
        env=_env(PORT="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    output: list[str] = []
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()  # blocks until the server is listening
        match = re.fullmatch(r"Listening on port (\d+)\n", banner)
        assert match, banner + proc.stderr.read() if proc.stderr else banner
        yield int(match[1]), output
    finally:
        # Ctrl-C, as the documentation says.
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        output.extend(out.splitlines())


def run_example(name: str, *words: str, **env: str) -> str:
    """Run an example to completion; return what it printed."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *words],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


@pytest.mark.parametrize("server", ["tcp_server.py", "tcp_server_stream.py"])
def test_tcp_server_and_client(server: str) -> None:
    with running_server(server) as (port, server_output):
        first = run_example("tcp_client.py", "hello", "world and more", PORT=str(port))
        second = run_example("tcp_client.py", "python", "is", "nice", PORT=str(port))
    assert first == "Sent:     hello world and more\nReceived: HELLO WORLD AND MORE\n"
    assert second == "Sent:     python is nice\nReceived: PYTHON IS NICE\n"
    assert server_output == [
        "127.0.0.1 wrote:",
        "b'hello world and more'",
        "127.0.0.1 wrote:",
        "b'python is nice'",
    ]


def test_udp_server_and_client() -> None:
    with running_server("udp_server.py") as (port, server_output):
        reply = run_example("udp_client.py", "hello", "udp", PORT=str(port))
    assert reply == "Sent:     hello udp\nReceived: HELLO UDP\n"
    assert server_output == ["127.0.0.1 wrote:", "b'hello udp'"]


def test_threaded_tcp_server() -> None:
    lines = run_example("threaded_tcp_server.py").splitlines()
    assert re.fullmatch(r"Server loop running in thread: Thread-1( \(serve_forever\))?", lines[0])
    assert len(lines) == 4
    for n, line in enumerate(lines[1:], start=1):
        pattern = rf"Received: Thread-{n + 1}( \(process_request_thread\))?: Hello World {n}"
        assert re.fullmatch(pattern, line), line


def test_green_echo_example() -> None:
    assert run_example("green_echo.py") == "Received: b'HELLO HUB\\n'\n"


def test_pool_echo_example() -> None:
    lines = run_example("pool_echo.py").splitlines()
    assert lines[0] == "Received: b'HELLO POOL\\n'"
    assert lines[1] == "Parked silent connections: 10"
    # The silent connections closed before shutdown are handled (they see
    # EOF) or, if still parked when the server closes, closed with it.
    assert re.fullmatch(r"Handled: (1[01]|[1-9])", lines[2]), lines[2]


def test_proxy_protocol_example() -> None:
    assert run_example("proxy_protocol.py").splitlines() == [
        "hello ada, from 203.0.113.7",
        "''",
        "handled: 2 failed headers: 0",
    ]


def test_tls_echo_example() -> None:
    assert run_example("tls_echo.py").splitlines() == [
        "TLSv1.3: HELLO TLS",
        "alpn: echo/1",
        "handled: 1 failed handshakes: 0",
    ]


@pytest.mark.parametrize("model", ["threading", "forking", "pool", "hub"])
def test_graceful_stop_example(model: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "graceful_stop.py"), model],
        env=_env(PORT="0", GRACE="0.5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        match = re.fullmatch(r"Listening on port (\d+)\n", banner)
        assert match, banner
        address = ("127.0.0.1", int(match[1]))
        with connect(address) as done:
            done.sendall(b"hello\n")
            done.shutdown(socket.SHUT_WR)
            assert recv_all(done) == b"HELLO\n"
        with connect(address) as idle:
            idle.sendall(b"one\n")
            assert idle.recv(100) == b"ONE\n"
            # The client stays connected and silent: only the abort ends it.
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
            assert recv_all(idle) == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[:2] == [
        "Stopped accepting; waiting up to 0.5 s",
        "Aborting 1 connection(s) still open",
    ], out + err
    stats = dict(re.findall(r"(\w+)=(\w+)", lines[2]))
    # A forked child ended by the abort exits with a failure status: an error.
    errors = "1" if model == "forking" else "0"
    assert stats | {"errors": errors} == stats, lines[2]
    assert (stats["accepted"], stats["handled"], stats["active"], stats["parked"]) == (
        "2",
        "2",
        "0",
        "0",
    )
    assert (stats["refused"], stats["accepting"]) == ("0", "False")


def test_logging_setup_example() -> None:
    lines = run_example("logging_setup.py").splitlines()
    assert lines[:2] == ["Received: b'HELLO\\n'", "myapp ERROR request from 127.0.0.1 failed"]
    assert lines[2] == "Traceback (most recent call last):"
    # The traceback of the handler's ValueError, then the pool's warning.
    assert lines[-3:] == [
        "ValueError: asked to fail",
        "netserve.pool WARNING a handler raised SystemExit; reported through "
        "threading.excepthook, serving goes on",
        "Handled: 3, errors: 2",
    ]


PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize(
    "page", ["README.md", "docs/lifecycle.md", "docs/limits.md", "docs/deploying.md"]
)
def test_code_shown_in_the_docs_is_an_example(page: str) -> None:
    # Every Python block of the page is a verbatim part of an example file,
    # so the tests above run it.
    text = (EXAMPLES.parent / page).read_text()
    sources = [path.read_text() for path in EXAMPLES.glob("*.py")]
    for block in PYTHON_BLOCK.findall(text):
        assert any(block in source for source in sources), block


def test_limits_example() -> None:
    assert run_example("limits.py") == (
        "echo: hello\nbye (idle_timeout)\nline too long\nhandled 1, timeouts 1\n"
    )


def test_serve_app_example_under_the_command() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "netserve", "serve_app:Shout", "--bind", "127.0.0.1:0"],
        cwd=EXAMPLES,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        match = re.match(
            r"netserve: serving serve_app:Shout \(pool model\) on 127.0.0.1:(\d+)", banner
        )
        assert match, banner
        with connect(("127.0.0.1", int(match[1]))) as client:
            client.sendall(b"hello\nbye\n")
            assert recv_all(client) == b"HELLO\nbye\n"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def test_observability_example() -> None:
    access, *rest = run_example("observability.py").splitlines()
    entry = json.loads(access)
    assert (entry["logger"], entry["outcome"], entry["bytes_in"], entry["bytes_out"]) == (
        "netserve.access",
        "handled",
        6,
        6,
    )
    assert rest == [
        "readyz: 200 ready",
        "netserve_requests_handled_total 1.0",
        "readyz: 503 draining",
    ]
