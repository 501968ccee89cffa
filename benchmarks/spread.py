"""How the `netserve` command's workers share the connections (docs/deploying.md).

    .venv/bin/python benchmarks/spread.py [--reuse-port] [--model threading]

Runs the command with 4 workers on 127.0.0.1 (port 0) serving a handler that
answers with its pid, makes 2,000 short connections from 4 client threads
(one request each), and prints how many each worker served.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

APP = """
import os
import netserve

class Pid(netserve.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"%d\\n" % os.getpid())
"""

WORKERS = 4
CONNECTIONS = 2000
CLIENTS = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reuse-port", action="store_true")
    parser.add_argument("--model", default="threading")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "pidapp.py").write_text(APP)
        command = [sys.executable, "-m", "netserve", "pidapp:Pid", "-b", "127.0.0.1:0"]
        command += ["-w", str(WORKERS), "--model", args.model, "--log-level", "warning"]
        if args.reuse_port:
            command.append("--reuse-port")
        proc = subprocess.Popen(command, cwd=directory, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            banner = proc.stdout.readline()
            match = re.search(r"on 127\.0\.0\.1:(\d+)", banner)
            assert match, banner
            port = int(match[1])
            counts: Counter[int] = Counter()
            lock = threading.Lock()

            def client() -> None:
                for _ in range(CONNECTIONS // CLIENTS):
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                        sock.sendall(b"?\n")
                        pid = int(sock.makefile("rb").readline())
                    with lock:
                        counts[pid] += 1

            threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    shares = sorted(counts.values())
    reuse = "--reuse-port" if args.reuse_port else "shared listener"
    print(f"{args.model}, {reuse}: {sum(shares)} connections, per worker {shares}")
    print(f"(worker pids {sorted(counts)}; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
