"""The ``netserve`` command: ``netserve [OPTIONS] MODULE:ATTR`` serves a handler.

With no ``MODULE:ATTR`` it serves the upper-case echo demo on localhost:9999.
What ``ATTR`` may name is ``_target``'s; this module reads the options (each
also from a ``NETSERVE_*`` environment variable), binds the sockets, and
serves them until a signal: SIGTERM drains (``drain(graceful_timeout)``),
SIGINT and SIGQUIT stop at once. A user's mistake is one line on stderr and
exit status 2, never a traceback; an exception raised by the user's module
while it is imported is shown with its traceback, as the user needs it.
"""

from __future__ import annotations

import argparse
import grp
import logging
import os
import pwd
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType, SimpleNamespace
from typing import Any, NoReturn

import netserve
from netserve._core._errors import AddressError, ConfigurationError
from netserve._core._log import JsonFormatter, get_logger
from netserve._core._socket_servers import TCPServer
from netserve._edges._proxy import proxy_policy
from netserve._edges._tls import tls_policy
from netserve._edges._unix import FileIdentity, bind_unix, remove_socket_file
from netserve._models._combos import ThreadingTCPServer
from netserve._serving._demo import UpperCaseEchoHandler
from netserve._serving._supervisor import Supervisor
from netserve._serving._systemd import SystemdNotifier, systemd_listeners, systemd_watchdog_interval
from netserve._serving._target import (
    DEFAULT_MODEL,
    MODELS,
    TargetError,
    TargetImportError,
    load_target,
    server_maker,
)

__all__ = ["BindAddress", "main", "parse_bind"]

DEFAULT_BIND = "localhost:9999"
# Where MODULE:ATTR is served without --bind (and without socket activation).
DEFAULT_TARGET_BIND = "127.0.0.1:8000"
# Exit statuses: a user's mistake (argparse's too), and a server that failed
# after it started.
USAGE_ERROR = 2
SERVER_FAILED = 3

_log = get_logger("cli")


@dataclass(frozen=True)
class BindAddress:
    """A parsed ``--bind`` value: an address family and a socket address."""

    family: int  # -1 for an inherited descriptor (fd://N)
    address: str | tuple[str, int] | int

    def __str__(self) -> str:
        if isinstance(self.address, int):
            return f"fd://{self.address}"
        if isinstance(self.address, str):
            return f"unix:{_unix_text(self.address)}"
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _unix_text(path: str | bytes) -> str:
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    return "@" + path[1:] if path.startswith("\0") else path


def parse_bind(text: str) -> BindAddress:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT``, ``unix:PATH`` or ``fd://N``."""
    if text.startswith("fd://"):
        number = text[len("fd://") :]
        if not number.isdigit():
            raise AddressError(f"{text!r}: fd:// needs a descriptor number, as in fd://3")
        return BindAddress(-1, int(number))
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path or path == "@":
            raise AddressError("unix: needs a path, as in unix:/tmp/netserve.sock")
        if path.startswith("@"):
            path = "\0" + path[1:]  # a Linux abstract name: no file at all
        return BindAddress(socket.AF_UNIX, path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{text!r} is not HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N")
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


def _serve_demo(bind: BindAddress) -> int:
    """The upper-case echo demo (no MODULE:ATTR), stopped by SIGINT or SIGTERM."""
    if isinstance(bind.address, int):
        print("netserve: the demo cannot serve fd:// addresses", file=sys.stderr)
        return USAGE_ERROR
    try:
        server = _make_server(bind)
    except OSError as exc:
        print(f"netserve: cannot listen on {bind}: {exc.strerror or exc}", file=sys.stderr)
        return USAGE_ERROR

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


def _bind_arg(text: str) -> BindAddress:
    try:
        return parse_bind(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _admin_bind_arg(text: str) -> BindAddress:
    """The admin endpoint's address: a bare port (or ``:PORT``) is loopback's,
    so that health and metrics are not published by accident."""
    if text.lstrip(":").isdigit():
        text = "127.0.0.1:" + text.lstrip(":")
    return _bind_arg(text)


class _Parser(argparse.ArgumentParser):
    """argparse, with a user's mistake as one line on stderr (exit status 2)."""

    def __init__(self, *args: Any, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefix = prefix  # where the words came from (a variable)

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"netserve: {self.prefix}{message}\n")


class _UsageError(Exception):
    """A mistake on the command line found after parsing (one line, status 2)."""


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
        return value

    return parse


# Each option's NETSERVE_* variable: the option's long name, upper-cased
# (NETSERVE_TARGET for MODULE:ATTR). The command line wins over the variable.
def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(_variable(name), default)


def _variable(option: str) -> str:
    return "NETSERVE_" + option.lstrip("-").upper().replace("-", "_")


# Repeatable options: their variable is a comma-separated list.
_LISTS = ("--bind", "--proxy-trusted")
# A flag's variable: on, off, or a mistake.
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off", "")
# Options no variable sets.
_NOT_FROM_ENVIRONMENT = ("--help", "--version", "--check")


def _from_environment(argv: list[str]) -> list[str]:
    """The NETSERVE_* variables as command-line words, for the options the
    command line does not give; each variable is checked as its option would
    be, and a mistake is one line naming the variable (status 2)."""
    probe = _build_parser()
    given = {word.split("=", 1)[0] for word in argv if word.startswith("--")}
    given |= {word[:2] for word in argv if word.startswith("-") and not word.startswith("--")}
    words: list[str] = []
    # argparse keeps its actions in a private list; it is the one place that
    # names every option with its type and choices.
    for action in probe._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or longs[0] in _NOT_FROM_ENVIRONMENT:
            continue
        option = longs[0]
        name = _variable(option)
        value = os.environ.get(name)
        if value is None or given & set(action.option_strings):
            continue
        if action.nargs == 0:  # a flag
            if value.strip().lower() not in _ON + _OFF:
                probe.error(
                    f"{name}={value!r}: a flag's variable is one of {', '.join(_ON)} or "
                    f"{', '.join(_OFF[:-1])}"
                )
            ours = [option] if value.strip().lower() in _ON else []
        elif option in _LISTS:
            ours = [w for item in value.split(",") if item.strip() for w in (option, item.strip())]
        else:
            ours = [option, value]
        probe.prefix = f"{name}: "
        probe.parse_args(ours)  # a mistake ends here, naming the variable
        probe.prefix = ""
        words += ours
    return words


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="netserve",
        description=(
            "Serve MODULE:ATTR (a request handler class, a server class, or a factory "
            "taking the listening socket). Without it, the upper-case echo demo."
        ),
        epilog="Every option can also be set as NETSERVE_<OPTION> (e.g. NETSERVE_WORKERS=4).",
    )
    parser.add_argument("target", nargs="?", metavar="MODULE:ATTR")
    parser.add_argument(
        "-b",
        "--bind",
        type=_bind_arg,
        action="append",
        metavar="ADDRESS",
        help="HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N; repeatable "
        f"(default: the socket-activated sockets, else {DEFAULT_TARGET_BIND}; "
        f"the demo: {DEFAULT_BIND})",
    )
    parser.add_argument(
        "--udp",
        action="store_true",
        default=False,
        help="datagram sockets instead of streams (for a DatagramRequestHandler)",
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default=DEFAULT_MODEL,
        help=f"concurrency model (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "-w",
        "--workers",
        type=_positive(int),
        default=1,
        help="worker processes, each serving every socket (default 1, always supervised)",
    )
    parser.add_argument(
        "--threads",
        type=_positive(int),
        default=None,
        help="the pool's threads per worker (its max_workers; --model pool only)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=30.0,
        metavar="S",
        help="a worker whose serving loop is silent this long is replaced (default 30)",
    )
    parser.add_argument(
        "--max-requests",
        type=_positive(int),
        default=0,
        metavar="N",
        help="recycle a worker after N requests (default 0: never)",
    )
    parser.add_argument(
        "--max-requests-jitter",
        type=_positive(int),
        default=0,
        metavar="N",
        help="add 0..N to each worker's --max-requests",
    )
    parser.add_argument(
        "--preload",
        action="store_true",
        default=False,
        help="import the code once, in the supervisor (a reload then keeps it)",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=_positive(float),
        default=30.0,
        metavar="S",
        help="how long SIGTERM lets requests in progress finish (default 30)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        default=False,
        help="a SO_REUSEPORT listener per worker: the kernel spreads the connections",
    )
    parser.add_argument(
        "--proxy-protocol",
        choices=["v1", "v2", "any"],
        default=None,
        help="expect a PROXY protocol header from the --proxy-trusted peers",
    )
    parser.add_argument(
        "--proxy-trusted",
        action="append",
        metavar="CIDR",
        help="a proxy that sends the header: an address, a network or 'unix'; repeatable "
        "(NETSERVE_PROXY_TRUSTED: comma-separated)",
    )
    parser.add_argument(
        "--metrics-bind",
        type=_admin_bind_arg,
        default=None,
        metavar="ADDRESS",
        help="serve /metrics, /livez and /readyz over HTTP here: [HOST:]PORT "
        "(127.0.0.1 unless a host is given) or unix:PATH",
    )
    parser.add_argument(
        "--drain-delay",
        type=_positive(float),
        default=0.0,
        metavar="S",
        help="on SIGTERM, /readyz answers 503 at once and serving goes on S seconds "
        "before the drain starts (default 0)",
    )
    parser.add_argument(
        "--hooks",
        default=None,
        metavar="MODULE[:ATTR]",
        help="an object (a module, a class) whose post_fork(worker_id), worker_start(servers) "
        "and worker_exit(worker_id, code) attributes, each optional, are the worker hooks",
    )
    parser.add_argument(
        "--user", default=None, help="workers run as this user (switched after the fork)"
    )
    parser.add_argument("--group", default=None, help="workers run as this group")
    parser.add_argument(
        "--certfile",
        default=None,
        metavar="FILE",
        help="serve TLS with this certificate",
    )
    parser.add_argument(
        "--keyfile", default=None, metavar="FILE", help="its key (else in --certfile)"
    )
    parser.add_argument(
        "--ca-certs",
        default=None,
        metavar="FILE",
        help="CA certificates to check client certificates against",
    )
    parser.add_argument(
        "--cert-reqs",
        choices=["none", "optional", "required"],
        default=None,
        help="client certificates: none (default), optional, required",
    )
    parser.add_argument(
        "--alpn",
        default=None,
        metavar="LIST",
        help="ALPN protocols offered, comma-separated (e.g. h2,http/1.1)",
    )
    parser.add_argument("--umask", default=None, help="octal, as in 022")
    parser.add_argument(
        "--chdir", default=None, metavar="DIR", help="change to DIR before importing"
    )
    parser.add_argument(
        "--pid", default=None, metavar="FILE", help="write the supervisor's pid to FILE"
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error", "critical"],
        default="info",
        help="the least severe records logged on stderr (default info)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        default=False,
        help="log a line per request on netserve.access: peer, client, duration, bytes, outcome",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text lines, or one JSON object per line for log shippers (default text)",
    )
    parser.add_argument(
        "--check", action="store_true", help="import and validate MODULE:ATTR, then exit"
    )
    parser.add_argument("--version", action="version", version=f"netserve {_version()}")
    return parser


def _version() -> str:
    return netserve.__version__


def main(argv: list[str] | None = None) -> int:
    """Run the ``netserve`` command; returns the exit status."""
    parser = _build_parser()
    words = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(_from_environment(words) + words)
    if args.target is None:
        args.target = _env("target") or None
    if args.target is None:
        return _serve_demo(args.bind[0] if args.bind else parse_bind(DEFAULT_BIND))
    try:
        return _serve_target(args)
    except (_UsageError, TargetError, AddressError, ConfigurationError) as exc:
        print(f"netserve: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except TargetImportError as exc:
        print(f"netserve: {exc}", file=sys.stderr)
        cause = exc.__cause__
        if cause is not None:
            # The user's frames only: netserve's and importlib's say nothing.
            frames = cause.__traceback__
            while frames is not None and _not_users(frames.tb_frame.f_code.co_filename):
                frames = frames.tb_next
            traceback.print_exception(type(cause), cause, frames)
        return USAGE_ERROR


def _check_policies(attributes: dict[str, Any], families: set[int]) -> None:
    """The PROXY and TLS settings, as each server will check them (the TLS
    files are read: a missing one is one line, status 2)."""
    for family in families:
        settings = SimpleNamespace(**attributes, address_family=family)
        proxy_policy(settings)
        tls_policy(settings)


def _check_kind(target: Any, *, udp: bool) -> None:
    """A handler class must be of the sockets' kind: a stream handler cannot
    serve datagrams, nor a datagram handler streams (the stdlib's classes are
    told apart by name: netserve never imports the stdlib's socketserver)."""
    if not isinstance(target, type):
        return
    names = {klass.__name__ for klass in target.__mro__}
    if udp and "StreamRequestHandler" in names:
        raise _UsageError(
            f"{target.__name__} is a stream handler: --udp needs a DatagramRequestHandler"
        )
    if not udp and "DatagramRequestHandler" in names:
        raise _UsageError(f"{target.__name__} is a datagram handler: serve it with --udp")


def _not_users(filename: str) -> bool:
    package = os.path.dirname(os.path.abspath(netserve.__file__))
    return filename.startswith(package) or "importlib" in filename


def _serve_target(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise _UsageError("--workers must be at least 1")
    if args.threads is not None and args.model != "pool":
        raise _UsageError("--threads is for --model pool")
    if args.chdir:
        try:
            os.chdir(args.chdir)
        except OSError as exc:
            raise _UsageError(f"--chdir {args.chdir}: {exc.strerror}") from None
    if args.umask is not None:
        try:
            os.umask(int(str(args.umask), 8))
        except ValueError:
            raise _UsageError(f"--umask {args.umask!r} is not an octal number") from None
    _configure_logging(args.log_level, args.log_format)
    attributes = _proxy_options(args)
    attributes.update(_tls_options(args))
    if args.access_log:
        attributes["access_log"] = True
    # Imported here first, whatever --preload says: a mistake in the import
    # string is then one line and status 2, before anything is bound.
    before = set(sys.modules)
    target = load_target(args.target)
    hooks = _load_hooks(args.hooks)
    _check_kind(target, udp=args.udp)
    maker = server_maker(target, args.model, threads=args.threads, attributes=attributes)
    user_modules = set(sys.modules) - before
    identity = _identity(args.user, args.group)
    if attributes and (args.bind or "LISTEN_FDS" not in os.environ):
        # Checked here, for --check too, not first in the workers: a
        # contradiction is the user's mistake (one line, status 2), not a
        # worker that fails. (Socket-activated sockets are checked once known.)
        _check_policies(
            attributes, {b.family for b in args.bind or [parse_bind(DEFAULT_TARGET_BIND)]}
        )
    if args.check:
        print(f"netserve: {args.target} is servable with the {args.model} model")
        return 0
    # The code as this process last imported it: the hooks must see the same
    # modules as the handler (a pool a hook opens is the one the handler uses).
    loaded = _Loaded(maker, hooks)

    def import_fresh() -> None:
        # Without --preload each worker (and a reload) imports the code afresh:
        # the modules that importing it loaded are forgotten first.
        for name in user_modules:
            sys.modules.pop(name, None)
        target = load_target(args.target)
        hooks = _load_hooks(args.hooks)
        loaded.maker = server_maker(target, args.model, threads=args.threads, attributes=attributes)
        loaded.hooks = hooks

    def post_fork(worker_id: int) -> None:
        # Before the code is imported and before any hook: nothing the user
        # wrote runs in a worker with the supervisor's rights.
        if identity is not None:
            _switch_to(identity)
        if not args.preload:
            import_fresh()
        loaded.call("post_fork", worker_id)

    def make_servers(sockets: Sequence[socket.socket]) -> list[Any]:
        return [loaded.maker(sock) for sock in sockets]

    sockets = _listen(args)
    admin: socket.socket | None = None
    try:
        if attributes:
            _check_policies(attributes, {sock.family for sock in sockets})
        if args.metrics_bind is not None:
            admin = _open(args.metrics_bind, socket.SOCK_STREAM, reuse_port=False)
        supervisor = Supervisor(
            make_servers,
            sockets,
            workers=args.workers,
            graceful_timeout=args.graceful_timeout,
            timeout=args.timeout,
            max_requests=args.max_requests,
            max_requests_jitter=args.max_requests_jitter,
            post_fork=post_fork,
            worker_start=lambda servers: loaded.call("worker_start", servers),
            worker_exit=lambda worker_id, code: loaded.call("worker_exit", worker_id, code),
            import_fresh=None if args.preload else import_fresh,
            reuse_port=args.reuse_port,
            notifier=SystemdNotifier(unset_environment=True),
            watchdog_interval=systemd_watchdog_interval(unset_environment=True),
            admin_socket=admin,
            drain_delay=args.drain_delay,
        )
    except BaseException:
        for sock in sockets:
            sock.close()
        if admin is not None:
            admin.close()
        raise
    try:
        return _supervise(supervisor, sockets, args)
    finally:
        if admin is not None:
            admin.close()


def _configure_logging(level: str, form: str) -> None:
    """The command's logging: every record on stderr, as text or one JSON
    object per line (a library user configures logging themselves)."""
    handler = logging.StreamHandler()
    if form == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _tls_options(args: argparse.Namespace) -> dict[str, Any]:
    """The server attributes the TLS options set. Each worker builds its own
    context from the files, so a HUP's new workers load the certificate afresh."""
    if args.certfile is None:
        for name in ("keyfile", "ca_certs", "cert_reqs", "alpn"):
            if getattr(args, name) is not None:
                raise _UsageError(f"--{name.replace('_', '-')} is for TLS: give --certfile")
        return {}
    if args.udp:
        raise _UsageError("TLS needs a stream socket: Python's ssl module has no DTLS for --udp")
    options: dict[str, Any] = {"tls_certfile": args.certfile, "tls_keyfile": args.keyfile}
    if args.ca_certs is not None:
        options["tls_ca_certs"] = args.ca_certs
    if args.cert_reqs is not None:
        options["tls_cert_reqs"] = args.cert_reqs
    if args.alpn:
        options["tls_alpn"] = [name.strip() for name in args.alpn.split(",") if name.strip()]
    return options


def _proxy_options(args: argparse.Namespace) -> dict[str, Any]:
    """The server attributes --proxy-protocol and --proxy-trusted set."""
    trusted = args.proxy_trusted
    if args.proxy_protocol is None:
        if trusted:
            raise _UsageError("--proxy-trusted is for --proxy-protocol")
        return {}
    if not trusted:
        raise _UsageError(
            "--proxy-protocol needs --proxy-trusted: the proxies' addresses or networks"
        )
    return {"proxy_protocol": args.proxy_protocol, "proxy_trusted": tuple(trusted)}


def _listen(args: argparse.Namespace) -> list[socket.socket]:
    """The listening sockets: --bind, else the socket-activated ones, else the default."""
    kind = socket.SOCK_DGRAM if args.udp else socket.SOCK_STREAM
    binds: list[BindAddress] | None = args.bind
    if not binds:
        activated = systemd_listeners()
        if activated:
            return [listener.socket for listener in activated]
        binds = [parse_bind(DEFAULT_TARGET_BIND)]
    sockets: list[socket.socket] = []
    try:
        for bind in binds:
            sockets.append(_open(bind, kind, reuse_port=args.reuse_port))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _open(bind: BindAddress, kind: int, *, reuse_port: bool) -> socket.socket:
    if isinstance(bind.address, int):
        try:
            return socket.socket(fileno=bind.address)
        except OSError as exc:
            raise _UsageError(f"{bind}: not an open socket ({exc.strerror})") from None
    sock = socket.socket(bind.family, kind)
    try:
        if bind.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if bind.family == socket.AF_INET6 and isinstance(bind.address, tuple):
            # [::] is both stacks, explicitly (never left to net.ipv6.bindv6only).
            dual = bind.address[0] in ("::", "")
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        if bind.family == socket.AF_UNIX:
            # A stale file from a server that was killed is replaced; the file
            # is removed when the command stops (see _run).
            inode = bind_unix(sock, bind.address, replace_stale=True, mode=None)
            _SOCKET_FILES.append((bind.address, inode))
        else:
            sock.bind(bind.address)
        if kind == socket.SOCK_STREAM:
            sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise _UsageError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    return sock


_HOOKS = ("post_fork", "worker_start", "worker_exit")


class _Loaded:
    """What this process imported last: the server maker and the worker hooks."""

    def __init__(self, maker: Callable[[socket.socket], Any], hooks: dict[str, Any]) -> None:
        self.maker = maker
        self.hooks = hooks

    def call(self, name: str, *args: Any) -> None:
        hook = self.hooks.get(name)
        if hook is not None:
            hook(*args)


def _load_hooks(spec: str | None) -> dict[str, Callable[..., object]]:
    """The worker hooks ``--hooks`` names: a mistake is the user's (one line, status 2)."""
    if spec is None:
        return {}
    try:
        holder = load_target(spec, module_alone=True)
    except TargetError as exc:
        raise _UsageError(f"--hooks: {exc}") from None
    hooks = {name: getattr(holder, name) for name in _HOOKS if hasattr(holder, name)}
    for name, hook in hooks.items():
        if not callable(hook):
            raise _UsageError(f"--hooks {spec}: {name} is {hook!r}, not a function")
    if not hooks:
        raise _UsageError(f"--hooks {spec}: has none of {', '.join(_HOOKS)}")
    return hooks


@dataclass(frozen=True)
class _Identity:
    """Who the workers become: --user and --group, resolved before anything forks."""

    uid: int | None
    gid: int


def _identity(user: str | None, group: str | None) -> _Identity | None:
    """Resolve --user and --group now, so that a mistake is one line and status 2."""
    if user is None and group is None:
        return None
    uid = None
    gid = os.getgid()
    try:
        if user is not None:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
            uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        raise _UsageError(f"--user {user}: no such user") from None
    try:
        if group is not None:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise _UsageError(f"--group {group}: no such group") from None
    changes = (uid is not None and uid != os.geteuid()) or gid != os.getegid()
    if changes and os.geteuid() != 0:
        option = "--user" if uid is not None and uid != os.geteuid() else "--group"
        raise _UsageError(f"{option}: only root can switch the workers to another identity")
    return _Identity(uid, gid)


def _switch_to(identity: _Identity) -> None:
    """In a worker, right after the fork: the group first, while still allowed."""
    if os.geteuid() == 0:
        os.setgroups([identity.gid])
    os.setgid(identity.gid)
    if identity.uid is not None:
        os.setuid(identity.uid)


def _address_text(sock: socket.socket, *, tls: bool = False) -> tuple[str, str]:
    """How a listening socket is reached: its address, and a command that talks
    to it (``openssl s_client`` when it speaks TLS)."""
    address = sock.getsockname()
    if sock.family == getattr(socket, "AF_UNIX", None):
        shown = _unix_text(address)
        if shown.startswith("@"):
            return f"unix:{shown}", f"socat - ABSTRACT-CONNECT:{shown[1:]}"
        if tls:
            return f"unix:{shown}", f"openssl s_client -unix {shown}"
        return f"unix:{shown}", f"nc -U {shown}"
    host, port = address[0], address[1]
    # A wildcard address is not one a client can connect to: name loopback.
    reach = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    udp = " -u" if sock.type == socket.SOCK_DGRAM else ""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls:
        target = f"[{reach}]:{port}" if ":" in reach else f"{reach}:{port}"
        return shown, f"openssl s_client -connect {target}"
    return shown, f"nc{udp} {reach} {port}"


def _supervise(supervisor: Supervisor, sockets: list[socket.socket], args: Any) -> int:
    """Run the supervisor: workers serve until TERM (drain), INT or QUIT (fast)."""
    # Signals wait from here until the supervisor handles them (it unblocks
    # them): a TERM right after the banner must drain, not kill the process.
    stopping = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    if args.pid:
        with open(args.pid, "w") as pidfile:
            pidfile.write(f"{os.getpid()}\n")
    try:
        for sock in sockets:
            shown, hint = _address_text(sock, tls=bool(args.certfile))
            print(
                f"netserve: serving {args.target} ({args.model} model) on {shown}   (try: {hint})",
                flush=True,
            )
            _log.info("listening on %s (%s, %s model)", shown, args.target, args.model)
        if supervisor.admin_socket is not None:
            shown, _ = _address_text(supervisor.admin_socket)
            print(
                f"netserve: health and metrics on {shown}: /livez /readyz /metrics",
                flush=True,
            )
        status = supervisor.run()
    finally:
        for sock in sockets:
            sock.close()
        if args.pid:
            _unlink_quietly(args.pid)
        for path, identity in _SOCKET_FILES:
            remove_socket_file(path, identity)
    print("netserve: stopped", flush=True)
    return status


# The Unix socket files this command bound: (path, inode), removed as it stops.
_SOCKET_FILES: list[tuple[Any, FileIdentity | None]] = []


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


if __name__ == "__main__":  # pragma: no cover - python -m netserve._serving._cli
    sys.exit(main())
