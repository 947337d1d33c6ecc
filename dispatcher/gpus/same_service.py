"""When two GPU URLs name one service: registered twice under two names in one pool, that service gets the
jobs of both, more than its slots (8 at once on 4 in an outside trial, ``localhost`` beside ``127.0.0.1``).

Compared: the scheme and host without case, a default port as none, the path after what every HTTP client
and server does to it (dot segments resolved, an unreserved character's percent-encoding decoded, a trailing
slash dropped), and the query. Host spellings of one address count as one: the IPv4 shorthands a resolver
accepts (``127.1``, ``2130706433``), an IPv4-mapped IPv6 address, and ``localhost`` for 127.0.0.1. Other names
are not resolved: two names of one address may be two virtual hosts of one ingress, each its own service.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

from dispatcher.gpus.pull import is_pull

_DEFAULT_PORTS = {"http": 80, "https": 443}
_IPV4_SHORTHAND = re.compile(r"[0-9a-fx.]+")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def same_service(a: str, b: str) -> bool:
    """Do two GPU URLs name one service (see the module docstring)? Pull GPUs have no URL to share."""
    return not is_pull(a) and not is_pull(b) and url_key(a) == url_key(b)


def url_key(url: str) -> tuple[str, str, int | None, str, str]:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port == _DEFAULT_PORTS.get(scheme):
        port = None
    return scheme, _host(parts.hostname or ""), port, _path(parts.path), parts.query


def _host(host: str) -> str:
    host = host.lower().rstrip(".")
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _IPV4_SHORTHAND.fullmatch(host):
            return host
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _path(path: str) -> str:
    decoded = _ESCAPE.sub(lambda m: c if (c := chr(int(m[1], 16))) in _UNRESERVED else m[0].upper(), path)
    out: list[str] = []
    for segment in decoded.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment not in (".", ""):
            out.append(segment)
    return "/" + "/".join(out)
