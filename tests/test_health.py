"""Health and metrics of a running instance: ``--metrics-bind`` and ``--drain-delay``
(issue 14, section 1), through the command, with real signals."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

from tests.conftest import connect
from tests.test_serve_cli import LogLines, app_dir, serving

__all__ = ["LogLines", "app_dir"]  # the fixture, used here; the reader, for others

ADMIN = re.compile(r"netserve: health and metrics on (\S+):(\d+): ")
SERVING = r"worker \d+ \(pid (\d+)\) serving"


def get(address: tuple[str, int], path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def samples(address: tuple[str, int]) -> dict[str, float]:
    status, body = get(address, "/metrics")
    assert status == 200, body
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in body.splitlines())
        if name and not name.startswith("#")
    }


def echo(address: Any, text: bytes) -> None:
    with connect(address) as client:
        client.sendall(text + b"\n")
        assert client.recv(100) == text.upper() + b"\n"


def test_health_metrics_and_the_drain_delay(app_dir: Path) -> None:
    args = ["app:Echo", "-b", "127.0.0.1:0", "-w", "2", "--metrics-bind", "0"]
    with serving(app_dir, *args, "--drain-delay", "1", "--graceful-timeout", "5") as (
        proc,
        _,
        address,
    ):
        # Printed with the banner, before serving starts: already in the
        # stream's buffer, where a wait on the descriptor would not see it.
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = ADMIN.match(line)
        assert match, line
        admin = (match[1], int(match[2]))
        assert admin[0] == "127.0.0.1"  # a bare port is loopback's
        log = LogLines(proc)
        first = log.until(SERVING, 2)
        assert get(admin, "/livez") == (200, "alive\n")
        assert get(admin, "/readyz") == (200, "ready\n")
        for i in range(5):
            echo(address, b"request %d" % i)

        # A reload: still ready throughout; the old workers' counts are kept
        # once they have exited (each writes its figures as it goes).
        proc.send_signal(signal.SIGHUP)
        new = log.until(SERVING, 2)
        log.until("reload done")
        assert get(admin, "/readyz") == (200, "ready\n")
        second = log.until(r"worker \d+ \(pid (\d+)\) exited with", 2)
        assert sorted(second) == sorted(first)
        figures = samples(admin)
        assert figures["netserve_requests_handled_total"] == 5
        assert figures["netserve_connections_accepted_total"] == 5
        assert figures["netserve_reloads_total"] == 1
        assert figures["netserve_workers"] == 2
        assert figures["netserve_ready"] == 1
        assert figures['netserve_timeouts_total{kind="idle_timeout"}'] == 0
        assert figures["netserve_connections_active"] == 0

        # A worker killed outright is replaced and counted as a restart.
        os.kill(int(new[0]), signal.SIGKILL)
        log.until("replacing it")
        assert samples(admin)["netserve_worker_restarts_total"] == 1

        # TERM with a drain delay: not ready at once, still serving meanwhile.
        proc.send_signal(signal.SIGTERM)
        log.until("draining in 1 s")
        assert get(admin, "/readyz") == (503, "draining\n")
        assert get(admin, "/livez") == (200, "alive\n")
        echo(address, b"during the delay")
        assert samples(admin)["netserve_draining"] == 1
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    # The admin listener is gone with the command.
    with socket.socket() as probe:
        assert probe.connect_ex(admin) != 0


BROKEN_FIGURES = r"""
import netserve

class Echo(netserve.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())

class Server(netserve.ThreadingTCPServer):
    RequestHandlerClass = Echo

    def statistics(self):
        raise RuntimeError("no figures here")
"""


def test_a_server_whose_figures_fail_still_serves(app_dir: Path) -> None:
    (app_dir / "broken_figures.py").write_text(BROKEN_FIGURES)
    args = ["broken_figures:Server", "-b", "127.0.0.1:0", "--metrics-bind", "0"]
    with serving(app_dir, *args) as (proc, _, address):
        assert proc.stdout is not None
        match = ADMIN.match(proc.stdout.readline())
        assert match
        admin = (match[1], int(match[2]))
        log = LogLines(proc)
        log.until("figures cannot be read")  # said once; the worker goes on
        with connect(address) as client:
            client.sendall(b"still here\n")
            assert client.recv(100) == b"still here\n"
        assert samples(admin)["netserve_workers"] == 1
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
