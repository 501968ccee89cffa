"""GreenReader (a hub handler's rfile) against io.BufferedReader, the stdlib's rfile.

Every check runs the same reads on both: the stdlib's reader over one end of a
socket pair, and a hub handler's reader over a real connection. What one read
returns may depend on how the bytes arrived (read1, peek); those are checked
against what any buffered reader must return, everything else for equality.
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Callable
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

import netserve
from tests.conftest import Serving, connect, recv_all

Probe = Callable[[socket.socket], list[Any]]


def on_the_hub(data: bytes, probe: Probe, pieces: list[int] | None = None) -> list[Any]:
    """``probe(sock)`` in a hub handler whose client sends ``data`` and
    then shuts down its side: in ``pieces`` (split at those offsets) while the
    handler reads, or, without pieces, all of it before the handler starts."""
    outcome: list[Any] = []
    sent = threading.Event()

    class Handler(netserve.BaseRequestHandler):
        def handle(self) -> None:
            if pieces is None:
                # Blocks the hub, which serves only this connection: its reads
                # then see the whole stream in the receive queue.
                assert sent.wait(10)
            outcome.extend(probe(self.request))
            while self.request.recv(4096):  # until the client has sent everything
                pass

    with Serving(netserve.GreenTCPServer(("127.0.0.1", 0), Handler)) as serving:
        with connect(serving.address) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start = 0
            for end in [*sorted(pieces or []), len(data)]:
                client.sendall(data[start:end])
                start = max(start, end)
            client.shutdown(socket.SHUT_WR)
            sent.set()
            recv_all(client)  # the handler has finished once this returns
    return outcome


def in_the_stdlib(data: bytes, probe: Probe) -> list[Any]:
    """``probe(sock)`` over a socket pair, ``data`` sent beforehand."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        return probe(ours)


def outcome_of(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:  # the outcome compared is the exception's type and text
        return (type(exc).__name__, str(exc))


# -- reads against a model of the stream ---------------------------------------------

OPERATIONS = st.one_of(
    st.tuples(st.just("readline"), st.one_of(st.none(), st.integers(-2, 12))),
    st.tuples(st.just("read"), st.one_of(st.none(), st.integers(-1, 30))),
    st.tuples(st.just("read1"), st.integers(-1, 30)),
    st.tuples(st.just("peek"), st.integers(0, 5)),
    st.tuples(st.just("readinto"), st.integers(0, 30)),
    st.tuples(st.just("readinto1"), st.integers(0, 30)),
    st.tuples(st.just("next"), st.none()),
)
STREAMS = st.lists(
    st.sampled_from([b"a", b"bc", b"\n", b"xyz\n", b"\r\n", b"a longer line\n", b"0" * 20]),
    max_size=30,
)


def run_operations(reader: Any, operations: list[tuple[str, Any]]) -> list[Any]:
    results: list[Any] = []
    for name, argument in operations:
        if name in ("readinto", "readinto1"):
            target = bytearray(argument)
            count = getattr(reader, name)(target)
            results.append(bytes(target[:count]))
        elif name == "next":
            results.append(next(reader, None))
        else:
            results.append(getattr(reader, name)(argument))
    return results


def check_against_the_stream(
    stream: bytes, operations: list[tuple[str, Any]], results: list[Any]
) -> None:
    """What any buffered reader must return, read by read, for this stream."""
    rest = stream
    for (name, argument), result in zip(operations, results, strict=True):
        assert isinstance(result, bytes) or (name == "next" and result is None), (name, result)
        unlimited = argument is None or argument < 0
        if name in ("readline", "next"):
            line = rest[: rest.find(b"\n") + 1 or len(rest)]
            expected = line if unlimited or name == "next" else line[:argument]
            assert result == (expected or (None if name == "next" else b"")), (name, argument)
        elif name in ("read", "readinto"):
            assert result == (rest if unlimited else rest[:argument]), (name, argument)
        else:  # read1, readinto1, peek: a prefix of what is left, of one recv or the buffer
            assert rest.startswith(result), (name, argument, result)
            if rest and (name == "peek" or argument != 0):
                assert result, (name, argument)
            if name != "peek" and not unlimited:
                assert len(result) <= argument, (name, argument)
        if name != "peek" and result:
            rest = rest[len(result) :]


@settings(max_examples=150, deadline=None)
@example(  # lines longer than readline's small reads, then short ones, then long again
    chunks=[b"0" * 20] * 40 + [b"\n", b"xyz\n", b"\n"] + [b"0" * 20] * 40 + [b"\n"],
    operations=[("readline", None)] * 5,
    buffering=8192,
    pieces=None,
)
@example(  # a limit shorter than the one line that one recv brought
    chunks=[b"a longer line\n"],
    operations=[("readline", 3), ("readline", None)],
    buffering=8192,
    pieces=None,
)
@example(  # a limit that ends a line before its newline, in a buffered line
    chunks=[b"a longer line\n", b"xyz\n"],
    operations=[("readline", 3)] * 3,
    buffering=8192,
    pieces=None,
)
@example(  # what one recv brought beyond what read() and read1() asked for stays buffered
    chunks=[b"0" * 20, b"\n"],
    operations=[("read", 3), ("read1", 2), ("peek", 0), ("readinto", 4), ("read", None)],
    buffering=8192,
    pieces=None,
)
@given(
    chunks=STREAMS,
    operations=st.lists(OPERATIONS, max_size=12),
    buffering=st.sampled_from([1, 3, 16, 8192]),
    pieces=st.one_of(st.none(), st.lists(st.integers(0, 200), max_size=4)),
)
def test_reads_return_what_the_stream_holds(
    chunks: list[bytes],
    operations: list[tuple[str, Any]],
    buffering: int,
    pieces: list[int] | None,
) -> None:
    stream = b"".join(chunks)

    def probe(sock: socket.socket) -> list[Any]:
        with sock.makefile("rb", buffering) as reader:
            return run_operations(reader, operations)

    check_against_the_stream(stream, operations, in_the_stdlib(stream, probe))
    check_against_the_stream(stream, operations, on_the_hub(stream, probe, pieces))


def test_a_hub_handlers_rfile_is_a_green_reader() -> None:
    def probe(sock: socket.socket) -> list[Any]:
        with sock.makefile("rb") as reader:
            return [type(reader).__name__, isinstance(reader, io.BufferedIOBase)]

    assert on_the_hub(b"", probe) == ["GreenReader", True]


# -- the file around the reads --------------------------------------------------------


def probe_the_file(sock: socket.socket) -> list[Any]:
    reader = sock.makefile("rb")
    seen = [
        reader.readable(),
        reader.seekable(),
        reader.writable(),
        reader.isatty(),
        reader.mode,
        reader.name == sock.fileno(),
        reader.fileno() == sock.fileno(),
        outcome_of(reader.tell),
        outcome_of(lambda: reader.seek(0)),
        outcome_of(lambda: reader.write(b"x")),
        outcome_of(lambda: reader.readline(1.5)),
        outcome_of(lambda: reader.read("3")),
        outcome_of(lambda: reader.peek(None)),
        reader.readline(),
        reader.read(0),
        reader.readline(0),
        reader.readlines(),
        reader.read(),
        reader.read1(),
        reader.peek(),
        list(reader),
    ]
    reader.close()
    seen += [
        reader.closed,
        outcome_of(reader.readline),
        outcome_of(lambda: reader.read(0)),
        outcome_of(lambda: iter(reader)),
        outcome_of(reader.fileno),
        outcome_of(reader.readable),
    ]
    reader.close()  # a second close is harmless
    return seen


def probe_a_closed_raw(sock: socket.socket) -> list[Any]:
    # Closing the raw file leaves what is buffered readable (as BufferedReader does).
    reader = sock.makefile("rb")
    first = reader.readline()
    sock_seen_complete = reader.peek()  # buffered now: the rest came in one read
    reader.raw.close()
    return [
        first,
        sock_seen_complete,
        reader.closed,
        reader.readline(),
        reader.read(2),
        outcome_of(reader.read),
    ]


def probe_detach(sock: socket.socket) -> list[Any]:
    reader = sock.makefile("rb")
    line = reader.readline()
    raw = reader.detach()
    seen = [
        line,
        type(raw).__name__ in ("SocketIO", "GreenSocketIO"),
        outcome_of(reader.readline),
        outcome_of(lambda: reader.closed),
        outcome_of(reader.fileno),
        outcome_of(reader.detach),
    ]
    raw.close()
    return seen


def test_the_file_behaves_as_the_stdlibs() -> None:
    data = b"first\nsecond\nthird\nlast"
    for probe in (probe_the_file, probe_a_closed_raw, probe_detach):
        expected = in_the_stdlib(data, probe)
        assert on_the_hub(data, probe) == expected, probe.__name__


def probe_timeouts(sock: socket.socket) -> list[Any]:
    reader = sock.makefile("rb")
    seen = [reader.readline()]
    sock.settimeout(0.01)
    seen.append(outcome_of(reader.readline))  # the client says nothing more
    sock.settimeout(None)
    seen.append(outcome_of(reader.readline))  # a timed-out file stays unusable
    reader.close()
    return seen


def probe_non_blocking(sock: socket.socket) -> list[Any]:
    reader = sock.makefile("rb")
    seen = [reader.readline()]
    sock.setblocking(False)
    seen += [reader.read(5), reader.read(), reader.readline(), reader.read1(), reader.peek()]
    reader.close()
    return seen


def without_end_of_stream(data: bytes, probe: Probe) -> tuple[list[Any], list[Any]]:
    """``probe`` in the stdlib and on the hub, where the peer sends ``data`` and
    then stays connected and silent until the probe is done."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        expected = probe(ours)

    outcome: list[Any] = []
    done = threading.Event()

    class Handler(netserve.BaseRequestHandler):
        def handle(self) -> None:
            outcome.extend(probe(self.request))
            done.set()

    with Serving(netserve.GreenTCPServer(("127.0.0.1", 0), Handler)) as serving:
        with connect(serving.address) as client:
            client.sendall(data)
            assert done.wait(10)
    return expected, outcome


def test_timeouts_as_the_stdlibs() -> None:
    expected, outcome = without_end_of_stream(b"hello\n", probe_timeouts)
    assert outcome == expected
    assert expected[1][0] == "TimeoutError"
    assert "timed out object" in expected[2][1]


def test_non_blocking_reads_as_the_stdlibs() -> None:
    expected, outcome = without_end_of_stream(b"hello\n", probe_non_blocking)
    assert outcome == expected
    assert expected == [b"hello\n", None, None, b"", b"", b""]
