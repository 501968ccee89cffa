"""Serving in production: the command, the prefork supervisor and its workers,
systemd, adopted sockets, and health, metrics and figures.
"""
