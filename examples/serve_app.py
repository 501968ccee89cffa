"""A handler module for the ``netserve`` command (docs/deploying.md).

    cd examples && netserve serve_app:Shout --bind 127.0.0.1:8000

Each line a client sends comes back upper-cased; ``bye`` ends the
conversation, and so does a drain (SIGTERM) at the next line.
"""

from __future__ import annotations

import netserve


class Shout(netserve.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            if line.strip() == b"bye" or self.server.draining:
                self.wfile.write(b"bye\n")
                return
            self.wfile.write(line.upper())
