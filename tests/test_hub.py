"""The hub kernel on its own: timers, the ready queue, waits, the thread's life.

Time is a fake clock the test moves (rule 5 of _hub): nothing here sleeps. A
test moves the clock, then ``settle()``s: the loop wakes and completes a pass,
firing what is due by then.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import greenlet
import pytest

import netserve
import netserve._models._hub
from netserve._models._hub import Expiry, Hub, Limits


class FakeClock:
    """A clock that stands still until the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Registered:
    """The least a socket must carry to be registered with the hub (HubSocket)."""

    def __init__(self, limits: Limits | None = None, *, fresh: bool = False) -> None:
        self.hub_readable = True
        self.hub_hangup = False
        self.hub_reader: Any = None
        self.hub_writer: Any = None
        self.hub_limits = limits
        self.hub_born = self.hub_read_since = self.hub_write_since = 0
        self.hub_fresh = fresh


class Mark:
    """A waiter that only records that the loop switched to it, and with what."""

    def __init__(self, seen: list[Any], name: str, then: Callable[[], None] | None = None):
        self.seen = seen
        self.name = name
        self.then = then

    def switch(self, value: Any = None) -> None:
        self.seen.append((self.name, value))
        if self.then is not None:
            self.then()


def settle(hub: Hub) -> None:
    """Return once the loop has woken and completed a pass: everything due on
    its clock now has fired, and what was ready has run."""
    passed = threading.Event()
    waiter = Mark([], "settled", passed.set)
    # The ready queue runs at the top of the next pass, after this pass's timers.
    hub.run_sync(lambda: hub.schedule(waiter))
    assert passed.wait(10)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def hub(clock: FakeClock) -> Iterator[Hub]:
    """A hub on the fake clock whose thread stays up until the test ends."""
    hub = Hub("test-hub", clock=clock)
    hub.hold()
    try:
        yield hub
    finally:
        if hub.thread is not None:
            hub.run_sync(hub.release)
        hub.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        yield a, b


def test_timers_fire_in_deadline_order_on_the_hubs_clock(hub: Hub, clock: FakeClock) -> None:
    fired: list[str] = []

    def schedule() -> None:
        hub.call_at(3.0, fired.append, "c")
        hub.call_later(1.0, fired.append, "a")  # 1.0 on the clock
        hub.call_at(2.0, fired.append, "b")
        hub.call_at(2.0, fired.append, "b, made later")

    hub.run_sync(schedule)
    settle(hub)
    assert fired == []
    clock.now = 1.5
    settle(hub)
    assert fired == ["a"]
    clock.now = 2.0
    settle(hub)
    assert fired == ["a", "b", "b, made later"]
    clock.now = 100.0
    settle(hub)
    assert fired == ["a", "b", "b, made later", "c"]


def test_cancelled_timers_do_not_fire_and_the_heap_is_compacted(hub: Hub, clock: FakeClock) -> None:
    fired: list[int] = []
    timers = hub.run_sync(lambda: [hub.call_at(10.0 + i, fired.append, i) for i in range(1000)])

    def cancel() -> None:
        # The later ones: the loop's look at the heap's head does not remove them.
        for timer in timers[100:]:
            timer.cancel()

    hub.run_sync(cancel)
    settle(hub)
    assert hub.run_sync(lambda: len(hub._timers)) == 100
    clock.now = 2000.0
    settle(hub)
    assert fired == list(range(100))
    assert hub.run_sync(lambda: len(hub._timers)) == 0


def test_the_ready_queue_runs_in_order(hub: Hub) -> None:
    seen: list[Any] = []
    done = threading.Event()

    def schedule() -> None:
        # Scheduled while the queue runs: after what was queued before it.
        late = Mark(seen, "late", done.set)
        hub.schedule(Mark(seen, "first", lambda: hub.schedule(late, 4)), 1)
        hub.schedule(Mark(seen, "second"), 2)
        hub.schedule(Mark(seen, "third"))

    hub.run_sync(schedule)
    assert done.wait(10)
    assert seen == [("first", 1), ("second", 2), ("third", None), ("late", 4)]


def _wait_in_greenlet(
    hub: Hub, sock: Registered, deadline: float | None, outcome: list[Any], *, write: bool = False
) -> None:
    """On the hub's thread: a greenlet that waits on ``sock`` and records how it ended."""

    def wait(sock: Registered, deadline: float | None) -> None:
        try:
            if write:
                hub.wait_writable(sock, deadline)
            else:
                hub.wait_readable(sock, deadline)
            outcome.append("ready")
        except OSError as exc:  # TimeoutError included
            outcome.append(exc)

    hub.spawn(wait, sock, deadline)


def test_a_waiter_with_a_deadline_times_out(
    hub: Hub, clock: FakeClock, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, _ = pair
    sock = Registered()
    outcome: list[Any] = []

    def start() -> None:
        hub.register(ours.fileno(), sock)
        _wait_in_greenlet(hub, sock, 5.0, outcome)

    hub.run_sync(start)
    clock.now = 4.9
    settle(hub)
    assert outcome == []
    clock.now = 5.0
    settle(hub)
    assert [type(e) for e in outcome] == [TimeoutError]
    assert sock.hub_reader is None
    hub.run_sync(lambda: hub.forget(ours.fileno(), sock))


def test_a_waiter_woken_by_its_edge_leaves_no_timer(
    hub: Hub, clock: FakeClock, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, theirs = pair
    sock = Registered()
    outcome: list[Any] = []

    def start() -> None:
        hub.register(ours.fileno(), sock)
        _wait_in_greenlet(hub, sock, 5.0, outcome)

    hub.run_sync(start)
    theirs.send(b"x")
    settle(hub)
    assert outcome == ["ready"]
    assert hub.run_sync(lambda: [t for _, _, t in hub._timers if t.active]) == []
    clock.now = 10.0
    settle(hub)
    assert outcome == ["ready"]
    hub.run_sync(lambda: hub.forget(ours.fileno(), sock))


def test_sleep_follows_the_hubs_clock(hub: Hub, clock: FakeClock) -> None:
    woke: list[float] = []

    def sleeper(seconds: float, _: object) -> None:
        hub.sleep(seconds)
        woke.append(clock.now)

    hub.run_sync(lambda: hub.spawn(sleeper, 30.0, None))
    clock.now = 29.0
    settle(hub)
    assert woke == []
    clock.now = 30.0
    settle(hub)
    assert woke == [30.0]


@pytest.mark.parametrize("deadline", [None, 60.0])
@pytest.mark.parametrize("where", ["hub thread", "other thread"])
def test_a_closed_socket_wakes_its_waiters_with_ebadf(
    hub: Hub, deadline: float | None, where: str
) -> None:
    a, b = socket.socketpair()
    sock = Registered()
    outcome: list[Any] = []
    fd = a.fileno()

    def start() -> None:
        hub.register(fd, sock)
        _wait_in_greenlet(hub, sock, deadline, outcome)
        # Its writer too: the send buffer is full, so it waits for an edge.
        while True:
            try:
                a.send(b"x" * 65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        _wait_in_greenlet(hub, sock, deadline, outcome, write=True)

    def close() -> None:
        hub.forget(fd, sock)
        hub.notify_closing(sock)
        a.close()

    try:
        hub.run_sync(start)
        assert outcome == []
        if where == "hub thread":
            hub.run_sync(close)
        else:
            close()
        settle(hub)
        assert [(type(e), e.errno) for e in outcome] == [(OSError, errno.EBADF)] * 2
        assert "closed while waiting" in str(outcome[0])
        assert (sock.hub_reader, sock.hub_writer) == (None, None)
    finally:
        a.close()
        b.close()


def test_a_closed_socket_drops_a_waiter_that_is_not_a_greenlet(hub: Hub) -> None:
    sock = Registered()
    seen: list[Any] = []
    sock.hub_reader = Mark(seen, "starter")
    hub.run_sync(lambda: hub.notify_closing(sock))
    settle(hub)
    assert (seen, sock.hub_reader) == ([], None)


def test_waiting_on_the_hubs_own_greenlet_is_refused(hub: Hub) -> None:
    sock = Registered()
    for deadline in (None, 1.0):
        with pytest.raises(RuntimeError, match="handler greenlet"):
            hub.run_sync(lambda d=deadline: hub.wait_readable(sock, d))  # type: ignore[misc]
    assert sock.hub_reader is None


def test_spare_greenlets_are_reused_and_end_with_the_thread(clock: FakeClock) -> None:
    hub = Hub("test-hub", clock=clock, max_spares=1)
    hub.hold()
    used: list[greenlet.greenlet] = []
    done = threading.Event()

    def record(_: object, then: Callable[[], None] | None) -> None:
        used.append(greenlet.getcurrent())
        if then is not None:
            then()

    def twice_at_once() -> None:
        # Both wait, then finish in one pass: one place among the spares.
        def both(_: object, __: object) -> None:
            hub.sleep(0)
            used.append(greenlet.getcurrent())
            if len(used) == 4:
                done.set()

        hub.spawn(both, None, None)
        hub.spawn(both, None, None)

    try:
        hub.run_sync(lambda: hub.spawn(record, None, None))
        hub.run_sync(lambda: hub.spawn(record, None, None))
        assert used[0] is used[1]  # the spare, reused
        hub.run_sync(twice_at_once)
        assert done.wait(10)
        assert used[2] is used[0]
        assert used[3] is not used[0]
        assert [g.dead for g in used] == [False, False, False, True]
        thread = hub.run_sync(threading.current_thread)
        hub.run_sync(hub.release)
        thread.join(10)  # idle: the thread ends on its own
        assert not thread.is_alive()
        assert used[0].dead  # and the spare with it
    finally:
        hub.close()


def test_a_call_made_while_the_thread_decides_to_end_runs_on_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The wake-up race: the loop has found itself idle and is about to end
    # when another thread queues a call. The call must run on that thread.
    hub = Hub("test-hub")
    ran_on: list[threading.Thread] = []
    ran = threading.Event()
    ending: list[threading.Thread] = []
    end_spares = netserve._models._hub._end_spares

    def call() -> None:
        ran_on.append(threading.current_thread())
        ran.set()

    def end_spares_then_call(spares: list[greenlet.greenlet]) -> None:
        # Runs on the hub's thread between "idle" and taking the lock to end.
        end_spares(spares)
        if not ending:
            ending.append(threading.current_thread())
            caller = threading.Thread(target=hub.call_soon_threadsafe, args=(call,))
            caller.start()
            caller.join()

    monkeypatch.setattr(netserve._models._hub, "_end_spares", end_spares_then_call)
    try:
        hub.call_soon_threadsafe(lambda: None)  # starts the thread, soon idle
        assert ran.wait(10)
        assert ran_on == ending
    finally:
        hub.close()


def test_a_call_after_the_thread_ended_starts_another(clock: FakeClock) -> None:
    hub = Hub("test-hub", clock=clock)
    try:
        first = hub.run_sync(threading.current_thread)
        first.join(10)  # idle: it ends on its own
        assert not first.is_alive()
        second = hub.run_sync(threading.current_thread)
        assert second is not first
    finally:
        hub.close()


def test_a_thread_started_while_the_last_one_ends_keeps_its_spares(
    excepthook_calls: list[type[BaseException]],
) -> None:
    # The first thread has torn down and is on its way out when a call starts
    # a second one, which makes a spare greenlet: the first must not touch it
    # (greenlets cannot be switched across threads).
    hub = Hub("test-hub")
    used: list[greenlet.greenlet] = []
    left = threading.Event()

    def record(_: object, __: object) -> None:
        used.append(greenlet.getcurrent())

    def make_a_spare() -> None:
        hub.hold()  # keeps the second thread, and its spare
        hub.spawn(record, None, None)

    def loop() -> None:
        Hub._loop(hub)  # returns once torn down
        if not left.is_set():
            hub.run_sync(make_a_spare)  # from the first thread, on the second
            left.set()

    hub._loop = loop  # type: ignore[method-assign]
    try:
        hub.call_soon_threadsafe(lambda: None)
        assert left.wait(10)
        hub.run_sync(lambda: hub.spawn(record, None, None))
        assert used[1] is used[0]  # the second thread's spare, alive and reused
        hub.run_sync(hub.release)
    finally:
        hub.close()
    assert used[0].dead
    assert excepthook_calls == []


# -- the sweep's wait limits (rule 6) ---------------------------------------------------------


def _fill(sock: socket.socket) -> None:
    """Fill the send buffer, so that a write waits for an edge."""
    while True:
        try:
            sock.send(b"x" * 65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return


@pytest.mark.parametrize(
    "case",
    [
        ("first", True, False, "park_timeout"),
        ("idle", False, False, "idle_timeout"),
        ("write", False, True, "write_timeout"),
        ("age", False, False, "max_connection_age"),
        ("age", False, True, "max_connection_age"),
    ],
    ids=["first-byte", "idle", "write", "age-read", "age-write"],
)
def test_the_sweep_ends_an_untimed_wait_at_its_limit_and_never_before(
    hub: Hub, clock: FakeClock, pair: tuple[socket.socket, socket.socket], case: tuple[Any, ...]
) -> None:
    limit, fresh, write, setting = case
    ours, _ = pair
    outcome: list[Any] = []
    limits = hub.run_sync(lambda: hub.limits(**{limit: 1.0}))
    assert hub.sweep_period == 0.125  # an eighth of the smallest limit
    sock = Registered(limits, fresh=fresh)

    def start() -> None:
        hub.register(ours.fileno(), sock)
        hub.active += 1  # the sweep runs while greenlets are alive
        if write:
            _fill(ours)
        _wait_in_greenlet(hub, sock, None, outcome, write=write)

    hub.run_sync(start)
    # One sweep a period: the wait is a limit old at the ninth, not before.
    for step in range(1, 8):
        clock.now = step * 0.125
        settle(hub)
        assert outcome == []
    clock.now = 1.0
    settle(hub)
    [error] = outcome
    assert type(error) is netserve.ConnectionTimeout
    assert error.setting == setting
    assert (sock.hub_reader, sock.hub_writer) == (None, None)

    def stop() -> None:
        hub.active -= 1
        hub.forget(ours.fileno(), sock)

    hub.run_sync(stop)


def test_a_wait_with_its_own_deadline_is_held_to_the_age_limit_only(
    hub: Hub, clock: FakeClock, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, _ = pair
    outcome: list[Any] = []
    limits = hub.run_sync(lambda: hub.limits(idle=1.0, age=4.0))
    sock = Registered(limits)

    def start() -> None:
        hub.register(ours.fileno(), sock)
        hub.active += 1
        _wait_in_greenlet(hub, sock, 100.0, outcome)  # a user's timeout

    hub.run_sync(start)
    for step in range(1, 33):  # 4 s: far past the idle limit
        clock.now = step * 0.125
        settle(hub)
        if outcome:
            break
    [error] = outcome
    assert error.setting == "max_connection_age"
    assert clock.now == 4.0

    def stop() -> None:
        hub.active -= 1
        hub.forget(ours.fileno(), sock)

    hub.run_sync(stop)


def test_the_sweep_switches_a_waiter_that_is_not_a_greenlet_with_the_expiry(
    hub: Hub, clock: FakeClock, pair: tuple[socket.socket, socket.socket]
) -> None:
    # A parked connection's starter: it closes the connection itself.
    ours, _ = pair
    seen: list[Any] = []
    limits = hub.run_sync(lambda: hub.limits(first=1.0))
    sock = Registered(limits, fresh=True)
    sock.hub_reader = Mark(seen, "starter")

    def start() -> None:
        hub.register(ours.fileno(), sock)
        hub.active += 1

    hub.run_sync(start)
    for step in range(1, 9):
        clock.now = step * 0.125
        settle(hub)
    [(name, expiry)] = seen
    assert (name, type(expiry), expiry.setting) == ("starter", Expiry, "park_timeout")

    def stop() -> None:
        hub.active -= 1
        hub.forget(ours.fileno(), sock)

    hub.run_sync(stop)


def test_no_limits_no_sweep(hub: Hub) -> None:
    assert hub.run_sync(hub.limits) is None
    assert hub.sweep_period is None
