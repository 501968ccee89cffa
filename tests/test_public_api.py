"""The public surface: names, defaults and signatures, checked against the stdlib."""

from __future__ import annotations

import inspect
import socket
import socketserver  # the stdlib's, for differential checks only
import sys
import types

import pytest

import netserve

STDLIB_NAMES = sorted(socketserver.__all__)
# 3.12 added these to the stdlib; netserve has them on every version.
ALWAYS_OURS = {"ForkingUnixStreamServer", "ForkingUnixDatagramServer"}


def test_all_equals_the_set_of_public_names() -> None:
    public = {
        name
        for name, value in vars(netserve).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(netserve.__all__) == public


def test_every_public_name_is_exported_exactly_once() -> None:
    assert len(netserve.__all__) == len(set(netserve.__all__))


def test_stdlib_names_come_first_in_all() -> None:
    stdlib_part = netserve.__all__[: len(set(STDLIB_NAMES) | ALWAYS_OURS)]
    assert set(stdlib_part) == set(STDLIB_NAMES) | ALWAYS_OURS


@pytest.mark.parametrize("name", sorted(set(STDLIB_NAMES) | ALWAYS_OURS))
def test_every_stdlib_name_exists(name: str) -> None:
    assert isinstance(getattr(netserve, name), type)


CLASS_ATTRIBUTES = [
    ("BaseServer", "timeout"),
    ("TCPServer", "address_family"),
    ("TCPServer", "socket_type"),
    ("TCPServer", "request_queue_size"),
    ("TCPServer", "allow_reuse_address"),
    ("TCPServer", "allow_reuse_port"),
    ("UDPServer", "socket_type"),
    ("UDPServer", "max_packet_size"),
    ("UDPServer", "allow_reuse_address"),
    ("UDPServer", "allow_reuse_port"),
    ("UnixStreamServer", "address_family"),
    ("UnixDatagramServer", "address_family"),
    ("ForkingMixIn", "timeout"),
    ("ForkingMixIn", "active_children"),
    ("ForkingMixIn", "max_children"),
    ("ForkingMixIn", "block_on_close"),
    ("ThreadingMixIn", "daemon_threads"),
    ("ThreadingMixIn", "block_on_close"),
    ("StreamRequestHandler", "rbufsize"),
    ("StreamRequestHandler", "wbufsize"),
    ("StreamRequestHandler", "timeout"),
    ("StreamRequestHandler", "disable_nagle_algorithm"),
]


@pytest.mark.parametrize(("cls", "attr"), CLASS_ATTRIBUTES)
def test_class_attribute_defaults_match_the_stdlib(cls: str, attr: str) -> None:
    assert getattr(getattr(netserve, cls), attr) == getattr(getattr(socketserver, cls), attr)


def test_documented_defaults() -> None:
    # The checklist's values, stated once more so a stdlib change cannot hide ours.
    assert netserve.TCPServer.request_queue_size == (
        socket.SOMAXCONN if sys.version_info >= (3, 15) else 5
    )
    assert netserve.UDPServer.max_packet_size == 8192
    assert netserve.ForkingMixIn.max_children == 40
    assert netserve.ForkingMixIn.timeout == 300
    assert netserve.StreamRequestHandler.rbufsize == -1
    assert netserve.StreamRequestHandler.wbufsize == 0


@pytest.mark.parametrize(
    ("sub", "base"),
    [
        ("TCPServer", "BaseServer"),
        ("UDPServer", "TCPServer"),
        ("UnixStreamServer", "TCPServer"),
        ("UnixDatagramServer", "UDPServer"),
        ("StreamRequestHandler", "BaseRequestHandler"),
        ("DatagramRequestHandler", "BaseRequestHandler"),
    ],
)
def test_hierarchy(sub: str, base: str) -> None:
    assert issubclass(getattr(netserve, sub), getattr(netserve, base))


PREDEFINED = {
    "ThreadingTCPServer": ("ThreadingMixIn", "TCPServer"),
    "ThreadingUDPServer": ("ThreadingMixIn", "UDPServer"),
    "ThreadingUnixStreamServer": ("ThreadingMixIn", "UnixStreamServer"),
    "ThreadingUnixDatagramServer": ("ThreadingMixIn", "UnixDatagramServer"),
    "ForkingTCPServer": ("ForkingMixIn", "TCPServer"),
    "ForkingUDPServer": ("ForkingMixIn", "UDPServer"),
    "ForkingUnixStreamServer": ("ForkingMixIn", "UnixStreamServer"),
    "ForkingUnixDatagramServer": ("ForkingMixIn", "UnixDatagramServer"),
}


@pytest.mark.parametrize("name", sorted(PREDEFINED))
def test_predefined_combinations_are_mixin_then_base(name: str) -> None:
    cls = getattr(netserve, name)
    assert cls.__bases__ == tuple(getattr(netserve, b) for b in PREDEFINED[name])
    # "class X(MixIn, Base): pass": nothing of its own.
    assert {k for k in vars(cls) if not k.startswith("__")} == set()


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") or name in ("__init__", "__enter__", "__exit__")
    }


@pytest.mark.parametrize("name", STDLIB_NAMES)
def test_methods_and_signatures_match_the_stdlib(name: str) -> None:
    ours = _public_methods(getattr(netserve, name))
    theirs = _public_methods(getattr(socketserver, name))
    missing = set(theirs) - set(ours)
    assert not missing
    for method, signature in theirs.items():
        mine = ours[method]
        # Same parameter names, kinds and defaults; annotations may differ.
        assert [(p.name, p.kind, p.default) for p in mine.parameters.values()] == [
            (p.name, p.kind, p.default) for p in signature.parameters.values()
        ], method


def test_the_package_never_imports_the_stdlib_socketserver() -> None:
    import ast
    import pathlib

    source = pathlib.Path(netserve.__file__).parent
    for path in source.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert "socketserver" not in [a.name for a in node.names], path
            elif isinstance(node, ast.ImportFrom):
                assert node.module != "socketserver", path


def test_py_typed_is_shipped() -> None:
    import pathlib

    assert (pathlib.Path(netserve.__file__).parent / "py.typed").is_file()
