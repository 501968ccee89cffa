"""A small HTTP endpoint for health checks and metrics (issue 14, section 1).

The supervisor serves it from its own selector loop: it forks, so it runs no
thread (one that held a lock, the logging module's say, as a worker forked
would leave it held in that worker forever), and a slow or silent client must
never hold up the loop that watches the workers. So everything here is
non-blocking and bounded:

- the listener is accepted from until the backlog is empty, with at most
  ``MAX_CLIENTS`` open at once: a new client then takes the place of the one
  that has waited longest for its request to arrive (so idle connections
  cannot lock the health checks out). An accept that fails for want of
  descriptors or memory stops watching the listener for a back-off (10 ms,
  doubling to 1 s), rather than spin on a listener that stays readable;
- a client has ``TIMEOUT`` seconds to send its request (at most
  ``MAX_REQUEST`` bytes of request line and headers) and take the answer;
- each answer is computed at once from the supervisor's state and sent with
  ``Connection: close``: health checkers (HAProxy, the kubelet) and Prometheus
  open a connection per check or scrape anyway.

Only GET and HEAD are served; the body is ignored. The routes are callables
returning ``(status, content type, body)``.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

from netserve._core._log import RateLimitedLog, get_logger

__all__ = ["AdminEndpoint", "Response", "text"]

log = get_logger("admin")

#: What a route returns: status, content type, body.
Response = tuple[int, str, bytes]
#: Seconds a client has for its request and the answer.
TIMEOUT = 5.0
#: Bytes of request line and headers a client may send.
MAX_REQUEST = 8192
#: Clients served at once.
MAX_CLIENTS = 64
# The back-off while accept() fails (descriptors, memory): first, and at most.
_BACKOFF_FIRST = 0.01
_BACKOFF_MAX = 1.0


def text(status: int, body: str) -> Response:
    """A plain-text answer."""
    return (status, "text/plain; charset=utf-8", body.encode())


class _Client:
    __slots__ = ("deadline", "received", "sending", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.received = bytearray()
        self.sending: memoryview | None = None


class AdminEndpoint:
    """Answers HTTP requests on ``sock`` from a selector loop the caller runs.

    ``attach(selector)`` registers the listener; the caller's loop calls each
    ready key's ``data`` with ``(selector, key)``, and ``expire(selector)``
    after each wait (``next_deadline()`` says when one is due).
    """

    def __init__(
        self,
        sock: socket.socket,
        routes: Mapping[str, Callable[[], Response]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sock = sock
        self.routes = dict(routes)
        self.clock = clock
        self._clients: dict[int, _Client] = {}
        self._errors = RateLimitedLog(log, logging.ERROR)
        # While accept() fails (EMFILE ...): when to watch the listener again.
        self._resume_at: float | None = None
        self._backoff = _BACKOFF_FIRST
        sock.setblocking(False)

    def serve_until(self, stop_fd: int) -> None:
        """Serve from a selector loop of this thread's own until ``stop_fd`` is
        readable (for a process without a loop to attach to)."""
        with selectors.DefaultSelector() as selector:
            selector.register(stop_fd, selectors.EVENT_READ, None)
            self.attach(selector)
            try:
                while True:
                    deadline = self.next_deadline()
                    wait = None if deadline is None else max(0.0, deadline - self.clock())
                    for key, _ in selector.select(wait):
                        if key.data is None:
                            return
                        key.data(selector, key)
                    self.expire(selector)
            finally:
                self.detach(selector)

    def attach(self, selector: selectors.BaseSelector) -> None:
        selector.register(self.sock, selectors.EVENT_READ, self._accept)

    def detach(self, selector: selectors.BaseSelector) -> None:
        """Stop serving: close every client, and unregister (not close) the listener."""
        for client in list(self._clients.values()):
            self._close(selector, client)
        if self._resume_at is None:
            selector.unregister(self.sock)

    def forget(self) -> None:
        """In a forked child: close this process's copies of every socket."""
        for client in self._clients.values():
            client.sock.close()
        self._clients.clear()
        self.sock.close()

    def next_deadline(self) -> float | None:
        deadlines = [client.deadline for client in self._clients.values()]
        if self._resume_at is not None:
            deadlines.append(self._resume_at)
        return min(deadlines) if deadlines else None

    def expire(self, selector: selectors.BaseSelector) -> None:
        """Close the clients whose time is up; watch the listener again after a
        back-off."""
        now = self.clock()
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            self._close(selector, client)
        if self._resume_at is not None and now >= self._resume_at:
            self._resume_at = None
            self.attach(selector)

    # -- the loop's callbacks ------------------------------------------------------------

    def _accept(self, selector: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                self._backoff = _BACKOFF_FIRST
                return
            except OSError as exc:
                # Out of descriptors or memory: the connection stays queued and
                # the listener readable, so stop watching it for a while.
                self._errors.event("admin endpoint: accept failed (%s); backing off", exc)
                selector.unregister(self.sock)
                self._resume_at = self.clock() + self._backoff
                self._backoff = min(_BACKOFF_MAX, self._backoff * 2)
                return
            if len(self._clients) >= MAX_CLIENTS and not self._made_room(selector):
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, self.clock() + TIMEOUT)
            try:
                selector.register(sock, selectors.EVENT_READ, self._callback(client))
            except OSError as exc:
                self._errors.event("admin endpoint: cannot watch a client (%s)", exc)
                sock.close()
                continue
            self._clients[sock.fileno()] = client

    def _made_room(self, selector: selectors.BaseSelector) -> bool:
        """Every place is taken: the client that has waited longest for its own
        request gives its place up (one being answered keeps it)."""
        reading = [c for c in self._clients.values() if c.sending is None]
        if not reading:
            return False
        self._close(selector, min(reading, key=lambda c: c.deadline))
        return True

    def _callback(self, client: _Client) -> Callable[[selectors.BaseSelector, Any], None]:
        def ready(selector: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
            if client.sock.fileno() == -1:
                return  # closed earlier in this pass of the loop (its place was taken)
            if client.sending is None:
                self._read(selector, client)
            else:
                self._write(selector, client)

        return ready

    def _read(self, selector: selectors.BaseSelector, client: _Client) -> None:
        try:
            data = client.sock.recv(MAX_REQUEST + 1 - len(client.received))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(selector, client)
            return
        if not data:
            self._close(selector, client)
            return
        client.received += data
        head_end = _end_of_head(client.received)
        if head_end < 0:
            if len(client.received) > MAX_REQUEST:
                self._answer(selector, client, _reply(text(431, "request too large\n"), True))
            return
        self._answer(selector, client, self._respond(bytes(client.received[:head_end])))

    def _respond(self, head: bytes) -> bytes:
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _reply(text(400, "bad request\n"), True)
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        with_body = method != b"HEAD"
        if method not in (b"GET", b"HEAD"):
            return _reply(text(405, "only GET and HEAD\n"), with_body, allow=True)
        route = self.routes.get(target.decode("latin-1"))
        if route is None:
            return _reply(text(404, "not found\n"), with_body)
        try:
            return _reply(route(), with_body)
        except Exception:
            log.exception("admin endpoint: %s failed", target.decode("latin-1"))
            return _reply(text(500, "internal error\n"), with_body)

    def _answer(self, selector: selectors.BaseSelector, client: _Client, answer: bytes) -> None:
        client.sending = memoryview(answer)
        selector.modify(client.sock, selectors.EVENT_WRITE, self._callback(client))
        self._write(selector, client)

    def _write(self, selector: selectors.BaseSelector, client: _Client) -> None:
        assert client.sending is not None
        try:
            sent = client.sock.send(client.sending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(selector, client)
            return
        client.sending = client.sending[sent:]
        if not client.sending:
            self._close(selector, client)

    def _close(self, selector: selectors.BaseSelector, client: _Client) -> None:
        if client.sock.fileno() == -1:
            return  # closed already
        self._clients.pop(client.sock.fileno(), None)
        selector.unregister(client.sock)
        # Bytes left unread (a request refused as too large) would make the
        # close a reset, which can destroy the answer before the client reads it.
        for _ in range(4):
            try:
                if not client.sock.recv(65536):
                    break
            except OSError:
                break
        client.sock.close()


def _end_of_head(received: bytearray) -> int:
    """Where the request's head ends (past its blank line), or -1."""
    for blank in (b"\r\n\r\n", b"\n\n"):
        at = received.find(blank)
        if at >= 0:
            return at + len(blank)
    return -1


def _reply(response: Response, with_body: bool, *, allow: bool = False) -> bytes:
    status, content_type, body = response
    reason = HTTPStatus(status).phrase
    headers = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow:
        headers.append("Allow: GET, HEAD")
    head = ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1")
    return head + body if with_body else head
