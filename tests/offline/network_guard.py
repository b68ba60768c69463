"""Make every network connection other than loopback (or a Unix socket) fail loudly.

`install` patches the socket module: a connect, connect_ex or sendto to another address, or a
name lookup of another host, raises NetworkBlocked and appends a line to the file named by
$LT_NETWORK_LOG, which the test session reads at its end (so an attempt that the code under
test catches still fails the suite). sitecustomize.py beside this file installs it in every
Python subprocess that has this folder first on its PYTHONPATH.
"""

import ipaddress
import os
import socket
import traceback
from typing import Any

LOG = "LT_NETWORK_LOG"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


class NetworkBlocked(RuntimeError):
    """A test tried to reach the network (not an OSError: code that handles being offline
    must not take it for a missing network and carry on)."""


def is_local(host: Any) -> bool:
    """Whether `host` (a name or address, from a socket address or a lookup) is this machine's
    loopback; None and "" (any interface, as `bind` takes) count as local."""
    if host is None or host in ("", b""):
        return True
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host).split("%")[0]  # an IPv6 scope
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def blocked(what: str, target: Any) -> NetworkBlocked:
    """Record the attempt in $LT_NETWORK_LOG and return the error to raise."""
    where = "".join(traceback.format_stack(limit=6)[:-2])
    line = f"pid {os.getpid()}: {what} {target!r}\n{where}"
    path = os.environ.get(LOG)
    if path:
        with open(path, "a") as log:
            log.write(line + "\n")
    return NetworkBlocked(f"tests run offline: {what} {target!r} was blocked")


def install() -> None:
    """Patch socket so that only loopback and Unix sockets connect (idempotent)."""
    if getattr(socket.socket.connect, "network_guard", False):
        return
    real = {name: getattr(socket.socket, name) for name in ("connect", "connect_ex", "sendto")}
    real_getaddrinfo = socket.getaddrinfo

    def checked(name: str) -> Any:
        def method(self: socket.socket, *args: Any) -> Any:
            address = args[-1]
            inet = self.family in (socket.AF_INET, socket.AF_INET6)
            if inet and isinstance(address, tuple) and not is_local(address[0]):
                raise blocked(f"socket.{name}", address)
            return real[name](self, *args)

        method.network_guard = True  # type: ignore[attr-defined]
        return method

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_local(host):
            raise blocked("getaddrinfo", host)
        return real_getaddrinfo(host, *args, **kwargs)

    for name in real:
        setattr(socket.socket, name, checked(name))
    socket.getaddrinfo = getaddrinfo
