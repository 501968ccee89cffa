"""The access log: one line per request, with the kernel's byte counts (_access)."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import netserve
from netserve._core._access import outcome_name
from netserve._core._connections import DISCONNECTED, FAILED, HANDLED, timed_out
from tests.conftest import Serving, connect, recv_all
from tests.models import MODELS
from tests.test_serve_cli import LogLines, app_dir, serving

__all__ = ["app_dir"]  # the fixture, used here


class Upper(netserve.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline().upper())


@pytest.fixture
def access_records(tmp_path: Path) -> Iterator[Path]:
    """``netserve.access`` records, one JSON object per line, in a file: a forked
    child writes to it too (the handler is inherited)."""
    path = tmp_path / "access.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(netserve.JsonFormatter())
    logger = logging.getLogger("netserve.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        handler.close()


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def make(model: str, handler: Any, **attributes: Any) -> Any:
    server_class = type("Logged", (MODELS[model].tcp,), {"access_log": True, **attributes})
    return server_class(("127.0.0.1", 0), handler)


@pytest.mark.parametrize("model", list(MODELS))
def test_a_line_per_request_with_the_kernels_byte_counts(model: str, access_records: Path) -> None:
    server = make(model, Upper)
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(b"hello\n")
        assert recv_all(client) == b"HELLO\n"
        port = client.getsockname()[1]
        assert server.wait_closed(10)
    server.server_close()
    [entry] = records(access_records)
    assert entry["logger"] == "netserve.access"
    assert entry["peer"] == f"127.0.0.1:{port}"
    assert entry["client"] is None
    assert (entry["bytes_in"], entry["bytes_out"], entry["outcome"]) == (6, 6, "handled")
    assert 0 < entry["duration"] < 10
    assert entry["message"].startswith(f"127.0.0.1:{port} ")
    assert entry["message"].endswith(" in=6 out=6 handled")


def test_the_real_client_behind_a_proxy_and_a_time_out(access_records: Path) -> None:
    class Twice(netserve.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line.upper())

    header = b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n"
    server = make(
        "threading", Twice, proxy_protocol="v1", proxy_trusted=["127.0.0.1"], idle_timeout=0.3
    )
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(header + b"hi\n")
        assert client.recv(10) == b"HI\n"
        assert recv_all(client) == b""  # the idle time-out ended it
        assert server.wait_closed(10)
    server.server_close()
    [entry] = records(access_records)
    assert entry["client"] == "203.0.113.7:5555"
    assert entry["peer"].startswith("127.0.0.1:")
    assert (entry["bytes_in"], entry["bytes_out"]) == (len(header) + 3, 3)
    assert entry["outcome"] == "timeout:idle_timeout"
    assert entry["message"].split()[1] == "client=203.0.113.7:5555"


def test_off_by_default(access_records: Path) -> None:
    server = netserve.ThreadingTCPServer(("127.0.0.1", 0), Upper)
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(b"x\n")
        assert recv_all(client) == b"X\n"
        assert server.wait_closed(10)
    server.server_close()
    assert records(access_records) == []


def test_outcome_names() -> None:
    assert outcome_name(HANDLED) == "handled"
    assert outcome_name(FAILED) == "error"
    assert outcome_name(HANDLED | DISCONNECTED) == "disconnected"
    assert outcome_name(timed_out("write_timeout")) == "timeout:write_timeout"
    assert outcome_name(timed_out(None)) == "timeout"


def test_the_command_keeps_an_access_log(app_dir: Path) -> None:
    args = ["app:Echo", "-b", "127.0.0.1:0", "--access-log", "--log-format", "json"]
    with serving(app_dir, *args) as (proc, _, address):
        log = LogLines(proc)
        log.until("serving")
        with connect(address) as client:
            client.sendall(b"hello\n")
            assert client.recv(10) == b"HELLO\n"
        [line] = log.until(r'^\{.*"logger": "netserve.access".*\}$')
        entry = json.loads(line)
        assert (entry["bytes_in"], entry["bytes_out"], entry["outcome"]) == (6, 6, "handled")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
