"""Binding the site's listening sockets on loopback addresses."""

from __future__ import annotations

import errno
import socket

_PORT_ATTEMPTS = 100


class BindError(OSError):
    """A listener address that could not be bound, or a dead host's port in use."""


def reserve_port(
    addresses: list[str], probes: list[str], port: int
) -> tuple[int, dict[str, socket.socket]]:
    """Bind a socket on each address, all on one port; return the port and sockets.

    With ``port`` 0, ports are tried until one binds on every address and probe.
    A probe address is bound and released at once: it checks that nothing listens
    there (a dead host must refuse connections) without keeping the port. The
    sockets are bound, non-blocking and not listening yet.
    """
    candidates = addresses + probes
    if not candidates:
        return port, {}

    tries = 1 if port else _PORT_ATTEMPTS
    last_error: OSError | None = None
    for _attempt in range(tries):
        try:
            chosen, sockets = _bind_on_one_port(candidates, port)
        except OSError as error:
            last_error = error
            continue

        for address in probes:
            sockets.pop(address).close()
        return chosen, sockets

    where = f"port {port}" if port else f"a common port after {tries} tries"
    raise BindError(
        errno.EADDRINUSE,
        f"cannot bind {', '.join(candidates)} on {where}: {last_error}",
    )


def _bind_on_one_port(addresses: list[str], port: int) -> tuple[int, dict[str, socket.socket]]:
    sockets: dict[str, socket.socket] = {}
    chosen = port
    try:
        for address in addresses:
            sock = bound_socket(address, chosen)
            sockets[address] = sock
            chosen = sock.getsockname()[1]
    except OSError:
        for sock in sockets.values():
            sock.close()
        raise
    return chosen, sockets


def bound_socket(address: str, port: int) -> socket.socket:
    """Return a non-blocking TCP socket bound to the address and port, not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Lets a restarted site bind a port that still has connections in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
