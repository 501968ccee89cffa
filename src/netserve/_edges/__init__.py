"""The connection's edges: what a connection goes through before its handler,
and the addresses it comes from.

The PROXY protocol (a sans-IO parser, and the stage and policy that use it),
TLS (the handshake stage, its cap, the sockets handlers get), Unix socket
files and peer credentials.
"""
