"""Unix-domain sockets that behave (issue 13): stale files, clean-up, mode, peers.

A Unix socket's file outlives the process that bound it: a server that was
killed leaves it behind, and the next ``bind()`` fails with EADDRINUSE
although nothing listens. The stdlib's classes keep that behaviour (their
callers may rely on it); the new models replace a *stale* file, one whose
connect is refused, never a socket something still accepts on, nor a file
that is not a socket. Linux abstract names (a leading NUL; ``unix:@name`` on
the command line) have no file at all.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any

from netserve._core._log import get_logger

__all__ = ["FileIdentity", "PeerCredentials", "bind_unix", "peer_credentials", "remove_socket_file"]

log = get_logger("unix")

# struct ucred: pid_t pid, uid_t uid, gid_t gid.
_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCredentials:
    """The process at the other end of a Unix socket, as the kernel saw it
    when it connected (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: Any) -> PeerCredentials:
    """The peer's pid, uid and gid of a connected Unix stream socket (Linux)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))


def _is_file_path(address: Any) -> bool:
    if isinstance(address, bytes):
        return bool(address) and not address.startswith(b"\0")
    return isinstance(address, str) and bool(address) and not address.startswith("\0")


def _is_stale(path: str | bytes) -> bool:
    """A socket file nothing accepts on (its connect is refused)."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        except OSError as exc:
            # A datagram socket answers a stream connect with EPROTOTYPE: it
            # is bound by someone, so not stale.
            return exc.errno == errno.ECONNREFUSED
    return False


def bind_unix(
    sock: socket.socket, address: Any, *, replace_stale: bool, mode: int | None
) -> FileIdentity | None:
    """Bind ``sock`` to ``address``; replace a stale socket file if asked; apply
    ``mode`` to the file. Returns the file's identity (for ``remove_socket_file``)."""
    try:
        sock.bind(address)
    except OSError as exc:
        if not (
            exc.errno == errno.EADDRINUSE
            and replace_stale
            and _is_file_path(address)
            and _is_stale(address)
        ):
            raise
        log.info("replacing the stale socket file %s (nothing accepts on it)", address)
        os.unlink(address)
        sock.bind(address)
    if not _is_file_path(address):
        return None
    if mode is not None:
        os.chmod(address, mode)
    return _identity(address)


# (device, inode, change time): an inode number alone is reused at once on
# some file systems once a file is removed.
FileIdentity = tuple[int, int, int]


def _identity(path: str | bytes) -> FileIdentity:
    info = os.stat(path)
    return (info.st_dev, info.st_ino, info.st_ctime_ns)


def remove_socket_file(address: Any, identity: FileIdentity | None) -> None:
    """Remove the socket file this server bound, unless another has replaced it."""
    if identity is None or not _is_file_path(address):
        return
    try:
        if _identity(address) == identity:
            os.unlink(address)
    except FileNotFoundError:
        pass
