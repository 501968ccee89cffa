"""The command's TLS options: --certfile, --keyfile, --ca-certs, --cert-reqs, --alpn."""

from __future__ import annotations

import shutil
import signal
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import connect
from tests.test_serve_cli import LogLines, app_dir, run, serving

__all__ = ["app_dir"]


def peer_certificate(address: Any, cafile: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["http/1.1"])
    with context.wrap_socket(connect(address), server_hostname="localhost") as client:
        client.sendall(b"hi\n")
        assert client.recv(100) == b"HI\n"
        assert client.selected_alpn_protocol() == "http/1.1"
        cert = client.getpeercert(binary_form=True)
        client.unwrap().close()
    assert cert is not None
    return cert


@pytest.fixture
def ca(app_dir: Path) -> trustme.CA:
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(app_dir / "ca.pem"))
    return authority


def issue(ca: trustme.CA, app_dir: Path, name: str) -> bytes:
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(app_dir / f"{name}.pem"))
    cert.private_key_pem.write_to_path(str(app_dir / f"{name}.key"))
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def test_tls_served_and_hup_loads_the_new_certificate(app_dir: Path, ca: trustme.CA) -> None:
    first = issue(ca, app_dir, "server")
    args = (
        "app:Echo",
        "-b",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--preload",
        "--certfile",
        "server.pem",
        "--keyfile",
        "server.key",
        "--alpn",
        "h2,http/1.1",
    )
    with serving(app_dir, *args) as (proc, _, address):
        assert peer_certificate(address, app_dir / "ca.pem") == first
        renewed = issue(ca, app_dir, "renewed")
        shutil.copy(app_dir / "renewed.pem", app_dir / "server.pem")
        shutil.copy(app_dir / "renewed.key", app_dir / "server.key")
        log = LogLines(proc)
        proc.send_signal(signal.SIGHUP)
        log.until("reload done")
        seen = [peer_certificate(address, app_dir / "ca.pem") for _ in range(20)]
        assert seen[-1] == renewed
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--certfile", "missing.pem"], "not found: missing.pem"),
        (["--certfile", "missing.pem", "--udp"], "no DTLS"),
        (["--keyfile", "k.pem"], "--keyfile is for TLS"),
        (["--certfile", "c.pem", "--cert-reqs", "sometimes"], "invalid choice"),
        # The system's trust store is for servers: client certificates need their CAs.
        (["--certfile", "c.pem", "--cert-reqs", "required"], "tls_ca_certs must name the CAs"),
    ],
)
def test_tls_mistakes_are_one_line_and_status_2(
    app_dir: Path,
    args: list[str],
    message: str,
) -> None:
    result = run(app_dir, "app:Echo", "-b", "127.0.0.1:0", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
