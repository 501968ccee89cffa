"""A bounded set of worker threads for the hub's blocking calls (issue 11).

``netserve.to_thread()`` (in ``_green``) suspends a handler's greenlet while
one of these threads runs a blocking call: a database driver, a DNS look-up,
file I/O on a slow disk. The hub (``Hub.run_in_thread``) owns one runner; this
module knows nothing of greenlets, only of jobs, threads and closing.

Theory of operation
-------------------
Threads start as jobs come, up to ``max_workers``; a job that finds every
thread busy waits in the queue, in order (the bound is what keeps a burst of
blocking calls from becoming a burst of threads). A thread waits for the next
job once its job is done and ends only when the runner closes; ``close()``
lets the queued jobs run, then joins every thread, so that a closed server
leaves no thread behind.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

__all__ = ["ThreadRunner"]


class ThreadRunner:
    """Run jobs (callables that never raise) on at most ``max_workers`` threads."""

    def __init__(self, max_workers: int, name: str = "netserve-to-thread") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self.name = name
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._waiting = 0  # threads waiting for a job
        self._closed = False

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; a thread runs it as soon as one is free."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the thread runner is closed")
            self._jobs.append(job)
            # A thread notified but not yet awake still counts as waiting: a
            # second job meanwhile starts a thread of its own.
            if len(self._jobs) > self._waiting and len(self._threads) < self.max_workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self.name}-{len(self._threads) + 1}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
            else:
                self._ready.notify()

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            with self._lock:
                while not jobs:
                    if self._closed:
                        return
                    self._waiting += 1
                    self._ready.wait()
                    self._waiting -= 1
                job = jobs.popleft()
            job()

    def close(self) -> None:
        """Run what is queued, then end and join every thread."""
        with self._lock:
            self._closed = True
            self._ready.notify_all()
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    @property
    def threads(self) -> int:
        """Threads started so far (they live until ``close()``)."""
        return len(self._threads)
