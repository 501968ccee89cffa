"""systemd: socket activation (a launcher of our own and the real systemd-socket-activate),
readiness notifications read on a datagram socket the test binds, the watchdog interval."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import netserve
from tests.conftest import connect, recv_all

ROOT = Path(__file__).resolve().parent.parent
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


# --- notifications -----------------------------------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, unix_path: str) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, and the NOTIFY_SOCKET that names it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    try:
        if request.param == "path":
            sock.bind(unix_path)
            yield sock, unix_path
        else:
            name = f"netserve-test-{uuid.uuid4().hex}"
            sock.bind(b"\0" + name.encode())
            yield sock, "@" + name
    finally:
        sock.close()


def _fields(sock: socket.socket) -> list[str]:
    return sock.recv(65536).decode().split("\n")


def _nothing_waiting(sock: socket.socket) -> bool:
    return select.select([sock], [], [], 0)[0] == []


def test_each_notification(
    manager: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = manager
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with netserve.SystemdNotifier() as notifier:
        assert notifier.enabled
        assert notifier.ready()
        assert _fields(sock) == ["READY=1"]
        assert notifier.ready(status="serving on 127.0.0.1:8080")
        assert _fields(sock) == ["READY=1", "STATUS=serving on 127.0.0.1:8080"]
        assert notifier.status("two\nlines")
        assert _fields(sock) == ["STATUS=two lines"]
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading(status="reloading")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        reloading, usec, status = _fields(sock)
        assert (reloading, status) == ("RELOADING=1", "STATUS=reloading")
        assert usec.startswith("MONOTONIC_USEC=")
        assert before <= int(usec.partition("=")[2]) <= after
        assert notifier.stopping()
        assert _fields(sock) == ["STOPPING=1"]
        assert notifier.watchdog()
        assert _fields(sock) == ["WATCHDOG=1"]
        assert notifier.main_pid(1234)
        assert _fields(sock) == ["MAINPID=1234"]
        assert notifier.send("EXTEND_TIMEOUT_USEC=5000000", "STATUS=draining")
        assert _fields(sock) == ["EXTEND_TIMEOUT_USEC=5000000", "STATUS=draining"]
    assert _nothing_waiting(sock)
    # The one-shot function opens and closes its own socket (the leak check sees it).
    assert netserve.systemd_notify("READY=1", "STATUS=once")
    assert _fields(sock) == ["READY=1", "STATUS=once"]


def test_notifications_from_a_child_process(manager: tuple[socket.socket, str]) -> None:
    sock, address = manager
    code = "import netserve, sys; sys.exit(0 if netserve.systemd_notify('READY=1') else 3)"
    subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "NOTIFY_SOCKET": address},
        check=True,
        timeout=30,
    )
    assert _fields(sock) == ["READY=1"]


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = netserve.SystemdNotifier()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not netserve.systemd_notify("READY=1")
    notifier.close()


def test_unset_environment_reads_then_removes_the_variable(
    manager: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = manager
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with netserve.SystemdNotifier(unset_environment=True) as notifier:
        assert "NOTIFY_SOCKET" not in os.environ
        assert notifier.ready()
    assert _fields(sock) == ["READY=1"]


def test_a_missing_listener_is_logged_not_raised(
    unix_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", unix_path)  # nothing bound there
    caplog.set_level(logging.DEBUG, logger="netserve.systemd")
    with netserve.SystemdNotifier() as notifier:
        assert notifier.enabled
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.watchdog()
    records = [r for r in caplog.records if r.name == "netserve.systemd"]
    # The first failure of a run is logged; repeats within the interval are counted.
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert unix_path in records[0].getMessage()


def test_a_listener_that_comes_back_is_notified_again(
    unix_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="netserve.systemd")
    with netserve.SystemdNotifier(unix_path) as notifier:
        assert not notifier.watchdog()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.bind(unix_path)
            assert notifier.watchdog()
            assert _fields(sock) == ["WATCHDOG=1"]
        os.unlink(unix_path)
        # Gone again within seconds: counted under the log's rate limit, not
        # logged again (one line per 10 s, however often it comes and goes).
        assert not notifier.watchdog()
    assert len([r for r in caplog.records if r.name == "netserve.systemd"]) == 1


def test_a_manager_that_stops_reading_costs_a_bounded_wait(
    manager: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, address = manager  # bound, never read: its queue fills
    caplog.set_level(logging.WARNING, logger="netserve.systemd")
    with netserve.SystemdNotifier(address) as notifier:
        notifier.timeout = 0.05
        # The kernel queues a few hundred datagrams at most (net.unix.max_dgram_qlen).
        sent = 0
        while sent < 10_000 and notifier.watchdog():
            sent += 1
        assert 0 < sent < 10_000
    assert "timed out" in caplog.text


def test_an_address_that_is_not_a_unix_socket_disables_notification(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="netserve.systemd")
    notifier = netserve.SystemdNotifier("vsock:2:1234")
    assert not notifier.enabled
    assert not notifier.ready()
    assert "vsock:2:1234" in caplog.text


@pytest.mark.parametrize("field", ["READY", "STATUS=a\nREADY=1"])
def test_a_malformed_field_is_the_caller_s_error(field: str) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        netserve.SystemdNotifier("/nonexistent").send(field)


# --- the watchdog --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("500000", "self", 0.5),
        ("30000000", "other", None),
        (None, None, None),
        ("0", None, None),
    ],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            pid_text = {"self": str(os.getpid()), "other": str(os.getppid())}.get(value, value)
            monkeypatch.setenv(name, pid_text)
    assert netserve.systemd_watchdog_interval() == expected
    assert ("WATCHDOG_USEC" in os.environ) == (usec is not None)


def test_watchdog_interval_unset_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert netserve.systemd_watchdog_interval(unset_environment=True) == 2.0
    assert "WATCHDOG_USEC" not in os.environ
    assert "WATCHDOG_PID" not in os.environ


def test_a_malformed_watchdog_is_logged_and_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30s")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    caplog.set_level(logging.WARNING, logger="netserve.systemd")
    assert netserve.systemd_watchdog_interval() is None
    assert "WATCHDOG_USEC='30s'" in caplog.text


# --- socket activation, with a launcher of our own -----------------------------------------


def _activate(
    socks: list[socket.socket | int], *, pid: str = "self", **env: str | None
) -> dict[str, object]:
    """Run tests.systemd_child as a manager would start it with ``socks``; its report."""
    fds = [s if isinstance(s, int) else s.fileno() for s in socks]
    child_env = {**os.environ, "LISTEN_FDS": str(len(fds))}
    for name, value in env.items():
        if value is None:
            child_env.pop(name, None)
        else:
            child_env[name] = value
    result = subprocess.run(
        [sys.executable, "-m", "tests.systemd_child", "launch", pid, ",".join(map(str, fds))],
        cwd=ROOT,
        env=child_env,
        pass_fds=fds,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    report: dict[str, object] = json.loads(result.stdout)
    return report


@pytest.fixture
def three_sockets(unix_path: str) -> Iterator[list[socket.socket]]:
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        udp.bind(("::1", 0))
        unix.bind(unix_path)
        unix.listen()
        yield [tcp, udp, unix]
    finally:
        for sock in (tcp, udp, unix):
            sock.close()


def test_activated_sockets_with_names(three_sockets: list[socket.socket]) -> None:
    report = _activate(three_sockets, LISTEN_FDNAMES="web:dns:control")
    assert report == {
        "sockets": [
            {"name": "web", "family": "AF_INET", "type": "SOCK_STREAM", "fd": 3, "cloexec": True},
            {"name": "dns", "family": "AF_INET6", "type": "SOCK_DGRAM", "fd": 4, "cloexec": True},
            {
                "name": "control",
                "family": "AF_UNIX",
                "type": "SOCK_STREAM",
                "fd": 5,
                "cloexec": True,
            },
        ],
        "env": [],
    }


def test_without_names_each_is_unknown(three_sockets: list[socket.socket]) -> None:
    report = _activate(three_sockets[:2], LISTEN_FDNAMES=None)
    sockets = report["sockets"]
    assert isinstance(sockets, list)
    assert [s["name"] for s in sockets] == ["unknown", "unknown"]


def test_sockets_meant_for_another_process_are_left_alone(
    three_sockets: list[socket.socket],
) -> None:
    report = _activate(three_sockets, pid="parent", LISTEN_FDNAMES="a:b:c")
    # sd_listen_fds(3): nothing taken, and the variables are unset all the same.
    assert report == {"sockets": [], "env": []}


def test_no_activation_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.setenv("LISTEN_FDS", "2")
    assert netserve.systemd_listeners(unset_environment=False) == []
    assert os.environ["LISTEN_FDS"] == "2"
    assert netserve.systemd_listeners() == []
    assert "LISTEN_FDS" not in os.environ


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_FDS": "two"}, "LISTEN_FDS='two' is not a non-negative integer"),
        ({"LISTEN_FDNAMES": "a:b"}, "LISTEN_FDNAMES names 2 descriptors, LISTEN_FDS says 3"),
        ({"LISTEN_FDS": "4"}, "LISTEN_FDS=4, but descriptor 6 is not open"),
    ],
)
def test_malformed_variables(
    three_sockets: list[socket.socket], env: dict[str, str], message: str
) -> None:
    report = _activate(three_sockets, **env)
    assert report["error"] == "SocketActivationError"
    assert isinstance(report["message"], str)
    assert report["message"].startswith(message)
    assert report["env"] == []


def test_a_descriptor_that_is_not_a_socket(three_sockets: list[socket.socket]) -> None:
    read_end, write_end = os.pipe()
    try:
        report = _activate([three_sockets[0], read_end], LISTEN_FDNAMES="web:fifo")
    finally:
        os.close(read_end)
        os.close(write_end)
    assert report["error"] == "UnusableSocketError"
    assert report["message"] == "descriptor 4 ('fifo') is not a socket (a FIFO or file unit?)"


def test_a_socket_of_a_kind_netserve_cannot_serve(unix_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as seqpacket:
        report = _activate([seqpacket], LISTEN_FDNAMES="seq")
    assert report["error"] == "UnusableSocketError"
    assert report["message"] == (
        "descriptor 3 ('seq') is an AF_UNIX/SOCK_SEQPACKET socket; netserve serves "
        "TCP, UDP and Unix stream or datagram sockets"
    )


# --- socket activation by the real systemd-socket-activate ---------------------------------


def _socket_activate() -> str:
    if SOCKET_ACTIVATE is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-socket-activate is missing (Debian's systemd package)")
        pytest.skip("systemd-socket-activate is not installed")
    return SOCKET_ACTIVATE


def _free_tcp_port() -> int:
    # systemd-socket-activate takes a port, not port 0: the port the kernel gave
    # a socket that is then closed (no connection was made, so no TIME_WAIT).
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.parametrize("model", ["threading", "green"])
@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_real_socket_activation(model: str, family: str, unix_path: str) -> None:
    tool = _socket_activate()
    if family == "tcp":
        listen: str = f"127.0.0.1:{_free_tcp_port()}"
        address: object = ("127.0.0.1", int(listen.rpartition(":")[2]))
        client_family = socket.AF_INET
    else:
        listen = address = unix_path
        client_family = socket.AF_UNIX
    proc = subprocess.Popen(
        [
            tool,
            "-l",
            listen,
            "--fdname=web",
            # It starts the program with only the variables it is told to pass.
            "-E",
            f"PYTHONPATH={ROOT}",
            "--",
            sys.executable,
            "-m",
            "tests.systemd_child",
            "serve",
            model,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        listening = proc.stderr.readline()  # "Listening on ... as 3."
        assert listening.startswith("Listening on"), listening + proc.stderr.read()
        # The program is started once the first connection arrives.
        with connect(address, client_family) as client:
            client.sendall(b"hello\n")
            reply = recv_all(client)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    # Its name, no LISTEN_* left, the reply.
    assert reply == b"web - HELLO\n"


def test_the_example_under_systemd_socket_activate(unix_path: str) -> None:
    tool = _socket_activate()
    directory = os.path.dirname(unix_path)
    notify_path = os.path.join(directory, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.settimeout(10)
        manager.bind(notify_path)
        proc = subprocess.Popen(
            [
                tool,
                "-l",
                unix_path,
                "--fdname=echo",
                "-E",
                f"NOTIFY_SOCKET={notify_path}",
                "--",
                sys.executable,
                str(ROOT / "examples" / "systemd_echo.py"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            assert proc.stdout is not None
            listening = proc.stderr.readline()
            assert listening.startswith("Listening on"), listening + proc.stderr.read()
            with connect(unix_path, socket.AF_UNIX) as client:
                client.sendall(b"hello\n")
                assert client.recv(100) == b"HELLO\n"
                assert proc.stdout.readline() == f"Serving echo on {unix_path}\n"
                assert _fields(manager) == ["READY=1", "STATUS=serving echo"]
                # systemctl stop, with a client still connected.
                proc.terminate()
                out, err = proc.communicate(timeout=30)
            assert _fields(manager) == ["STOPPING=1"]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert out == "Stopped\n"


# --- the docs page ---------------------------------------------------------------------------

DOCS = ROOT / "docs" / "systemd.md"


def _blocks(language: str) -> list[str]:
    pattern = re.compile(rf"^```{language}\n(.*?)^```", re.MULTILINE | re.DOTALL)
    return pattern.findall(DOCS.read_text())


def test_the_docs_python_is_the_example_s() -> None:
    example = (ROOT / "examples" / "systemd_echo.py").read_text()
    blocks = _blocks("python")
    assert len(blocks) == 3
    for block in blocks:
        assert block in example, block


def test_the_docs_units_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing (Debian's systemd package)")
        pytest.skip("systemd-analyze is not installed")
    units = []
    for block in _blocks("ini"):
        name, _, text = block.partition("\n")
        path = tmp_path / name.removeprefix("# ")
        path.write_text(text)
        units.append(str(path))
    assert [os.path.basename(u) for u in units] == ["echo.socket", "echo.service"]
    result = subprocess.run(
        [tool, "verify", *units], capture_output=True, text=True, timeout=30, check=False
    )
    # It reports what it ignores on stderr, and still exits 0.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# --- examples/systemd: the units for the netserve command --------------------------------

UNITS = ROOT / "examples" / "systemd"
# The units name the command where a system-wide install puts it; the tests use
# the one installed next to this interpreter.
UNIT_COMMAND = "/usr/local/bin/netserve"


def _installed_command() -> str:
    command = Path(sysconfig.get_path("scripts")) / "netserve"
    assert command.exists(), f"{command}: install netserve (pip install -e .) first"
    return str(command)


def _setting(unit: Path, key: str) -> str:
    (value,) = re.findall(rf"^{key}=(.*)$", unit.read_text(), re.MULTILINE)
    return str(value)


def test_the_example_units_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing (Debian's systemd package)")
        pytest.skip("systemd-analyze is not installed")
    units = []
    for unit in sorted(UNITS.iterdir()):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(UNIT_COMMAND, _installed_command()))
        units.append(str(copy))
    assert [os.path.basename(u) for u in units] == [
        "netserve-example.service",
        "netserve-example.socket",
    ]
    result = subprocess.run(
        [tool, "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    service = UNITS / "netserve-example.service"
    # The supervisor drains its workers itself, and systemd waits for it.
    assert _setting(service, "KillMode") == "mixed"
    graceful = float(re.findall(r"--graceful-timeout (\S+)", _setting(service, "ExecStart"))[0])
    assert float(_setting(service, "TimeoutStopSec")) > graceful + netserve.Supervisor.kill_grace


def test_the_example_service_under_systemd_socket_activate(unix_path: str) -> None:
    tool = _socket_activate()
    service = UNITS / "netserve-example.service"
    argv = shlex.split(_setting(service, "ExecStart"))
    assert argv[0] == UNIT_COMMAND
    argv[0] = _installed_command()
    name = _setting(UNITS / "netserve-example.socket", "FileDescriptorName")
    port = _free_tcp_port()
    notify_path = os.path.join(os.path.dirname(unix_path), "notify")
    notify = [f"NOTIFY_SOCKET={notify_path}"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.settimeout(20)
        manager.bind(notify_path)
        proc = subprocess.Popen(
            [tool, "-l", f"127.0.0.1:{port}", f"--fdname={name}", "-E", *notify, "--", *argv],
            # WorkingDirectory= is where serve_app.py was copied to.
            cwd=ROOT / "examples",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            listening = proc.stderr.readline()
            assert listening.startswith("Listening on"), listening + proc.stderr.read()
            # It starts the command at the first connection, which waits meanwhile.
            with connect(("127.0.0.1", port)) as client:
                client.sendall(b"hello\nbye\n")
                assert recv_all(client) == b"HELLO\nbye\n"
            ready = _fields(manager)
            assert ready[0] == "READY=1", ready
            assert "STATUS=2 workers serving" in ready
            # systemctl reload: ExecReload=, with $MAINPID the command's pid
            # (systemd-socket-activate execs it).
            reload = shlex.split(_setting(service, "ExecReload"))
            subprocess.run(
                [str(proc.pid) if arg == "$MAINPID" else arg for arg in reload],
                check=True,
                timeout=30,
            )
            assert _fields(manager)[0] == "RELOADING=1"
            assert _fields(manager)[:2] == ["READY=1", "STATUS=reloaded: 2 workers serving"]
            # An old worker may still take a connection until its drain has
            # begun; the example's handler then says goodbye at once (its
            # docstring). The new workers answer the next one.
            for _ in range(10):
                with connect(("127.0.0.1", port)) as client:
                    client.sendall(b"again\nbye\n")
                    reply = recv_all(client)
                if reply != b"bye\n":
                    break
            assert reply == b"AGAIN\nbye\n"
            # systemctl stop: TERM to the main process (KillMode=mixed).
            proc.terminate()
            _, err = proc.communicate(timeout=30)
            assert _fields(manager)[0] == "STOPPING=1"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err


def test_the_docs_show_the_example_units() -> None:
    shown = _blocks("systemd")
    assert shown == [
        (UNITS / "netserve-example.socket").read_text(),
        (UNITS / "netserve-example.service").read_text(),
    ]
