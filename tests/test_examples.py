"""Each example under examples/ runs and prints what the documentation shows."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

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
