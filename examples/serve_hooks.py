"""Worker hooks: a resource each worker opens for itself (docs/deploying.md, "Hooks").

    cd examples && netserve serve_hooks:Journaled --hooks serve_hooks:Hooks --workers 2

Each worker appends the lines it serves to a journal of its own,
``worker-PID.log`` in the current directory, opened after the fork: a file, a
database connection or a client pool opened before it would be shared by
every worker.
"""

from __future__ import annotations

import os
from typing import IO, Any

import netserve


class Hooks:
    journal: IO[str]  # this worker's, once post_fork() has run

    @classmethod
    def post_fork(cls, worker_id: int) -> None:
        # In the new worker, before it builds its servers.
        cls.journal = open(f"worker-{os.getpid()}.log", "a", buffering=1)
        cls.journal.write(f"worker {worker_id} forked\n")

    @classmethod
    def worker_start(cls, servers: list[Any]) -> None:
        # In the worker, its servers built, before they serve.
        cls.journal.write(f"serving {len(servers)} socket(s)\n")

    @staticmethod
    def worker_exit(worker_id: int, code: int) -> None:
        # In the supervisor, once the worker has exited and been reaped.
        print(f"worker {worker_id} exited with {code}", flush=True)


class Journaled(netserve.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            Hooks.journal.write(line.decode(errors="replace"))
            self.wfile.write(b"%d %s" % (os.getpid(), line))
