"""install_as_socketserver(): stdlib modules imported afterwards run on netserve.

Each scenario runs in a fresh interpreter: the point is what *later* imports
see, and this test process has imported the stdlib modules long ago.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_later_imports_of_socketserver_get_netserve() -> None:
    result = run_python(
        """
        import sys
        assert "socketserver" not in sys.modules
        import netserve
        netserve.install_as_socketserver()
        import socketserver, http.server, xmlrpc.server, wsgiref.simple_server
        import logging.config
        assert socketserver is netserve
        assert issubclass(http.server.HTTPServer, netserve.TCPServer)
        assert issubclass(http.server.ThreadingHTTPServer, netserve.ThreadingMixIn)
        assert issubclass(http.server.BaseHTTPRequestHandler, netserve.StreamRequestHandler)
        assert issubclass(xmlrpc.server.SimpleXMLRPCServer, netserve.TCPServer)
        assert issubclass(wsgiref.simple_server.WSGIServer, netserve.TCPServer)
        assert logging.config.ThreadingTCPServer is netserve.ThreadingTCPServer
        print("bound")
        """
    )
    assert result.stdout == "bound\n"


def test_xmlrpc_server_on_netserve() -> None:
    result = run_python(
        """
        import threading
        import netserve
        netserve.install_as_socketserver()
        import xmlrpc.client, xmlrpc.server

        server = xmlrpc.server.SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False)
        server.register_function(lambda a, b: a + b, "add")
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            host, port = server.server_address
            with xmlrpc.client.ServerProxy(f"http://{host}:{port}/") as proxy:
                print(proxy.add(2, 3))
        finally:
            server.shutdown()
            thread.join()
            server.server_close()
        """
    )
    assert result.stdout == "5\n"


def test_wsgiref_on_netserve() -> None:
    result = run_python(
        """
        import http.client, threading
        import netserve
        netserve.install_as_socketserver()
        from wsgiref.simple_server import make_server, WSGIRequestHandler

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args):
                pass

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [environ["PATH_INFO"].upper().encode()]

        with make_server("127.0.0.1", 0, app, handler_class=Quiet) as server:
            assert isinstance(server, netserve.TCPServer)
            thread = threading.Thread(target=server.handle_request)
            thread.start()
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
            conn.request("GET", "/wsgi")
            print(conn.getresponse().read().decode())
            conn.close()
            thread.join()
        """
    )
    assert result.stdout == "/WSGI\n"


def test_logging_config_listen_on_netserve() -> None:
    result = run_python(
        """
        import json, logging, socket, struct
        import netserve
        netserve.install_as_socketserver()
        import logging.config

        listener = logging.config.listen(0)
        assert issubclass(listener.rcvr, netserve.ThreadingTCPServer)
        listener.start()
        assert listener.ready.wait(10)
        config = json.dumps({
            "version": 1,
            "loggers": {"configured.by.socket": {"level": "WARNING"}},
        }).encode()
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as s:
            s.sendall(struct.pack(">L", len(config)) + config)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)  # the server closes once the configuration is applied
        logging.config.stopListening()
        listener.join()
        print(logging.getLogger("configured.by.socket").level == logging.WARNING)
        """
    )
    assert result.stdout == "True\n"


def test_modules_imported_before_are_named_in_a_warning() -> None:
    result = run_python(
        """
        import warnings
        import http.server, socketserver as stdlib_socketserver
        import netserve
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            netserve.install_as_socketserver()
        assert len(caught) == 1, caught
        assert issubclass(caught[0].category, netserve.NetserveWarning)
        assert "http.server" in str(caught[0].message)
        import socketserver
        assert socketserver is netserve
        netserve.install_as_socketserver()  # idempotent: no second warning
        netserve.restore_socketserver()
        import socketserver
        assert socketserver is stdlib_socketserver
        print("restored")
        """
    )
    assert result.stdout == "restored\n"


def test_restore_removes_netserve_when_nothing_was_there() -> None:
    result = run_python(
        """
        import sys, netserve
        netserve.install_as_socketserver()
        assert sys.modules["socketserver"] is netserve
        netserve.restore_socketserver()
        assert "socketserver" not in sys.modules
        import socketserver
        assert socketserver is not netserve
        print("stdlib")
        """
    )
    assert result.stdout == "stdlib\n"
