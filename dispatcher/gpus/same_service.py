"""When two GPU URLs name one service: registered twice under two names in one pool, that service gets the
jobs of both, more than its slots (8 at once on 4 in an outside trial, ``localhost`` beside ``127.0.0.1``).

Compared: the scheme and host without case, a default port as none, the path after what every HTTP client
and server does to it (dot segments resolved, an unreserved character's percent-encoding decoded, a trailing
slash dropped), and the query. Host spellings of one address count as one: the IPv4 shorthands a resolver
accepts (``127.1``, ``2130706433``), an IPv4-mapped IPv6 address, ``localhost`` and ``0.0.0.0`` for 127.0.0.1,
fullwidth forms and IDNA spellings of one name. Other names are not resolved: two names of one address may be
two virtual hosts of one ingress, each its own service. (Where ``localhost`` resolves to ::1 first, it is
still taken for 127.0.0.1: a false "same" there costs an operator a clear refusal, a false "different" a GPU
over its slots.)
"""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from urllib.parse import urlsplit

from dispatcher.gpus.pull import is_pull

_DEFAULT_PORTS = {"http": 80, "https": 443}
_IPV4_SHORTHAND = re.compile(r"[0-9a-fx.]+")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
#: Addresses a connection reaches the loopback by: localhost (as most resolvers give it first), and the
#: unspecified addresses.
_LOOPBACK = {"localhost": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - not a bind
#: The dots IDNA reads as dots.
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def same_service(a: str, b: str) -> bool:
    """Do two GPU URLs name one service (see the module docstring)? Pull GPUs have no URL to share."""
    return not is_pull(a) and not is_pull(b) and url_key(a) == url_key(b)


def url_key(url: str) -> tuple[str, str, int | None, str, str]:
    try:
        parts = urlsplit(url.strip())
        hostname = parts.hostname or ""
    except ValueError:  # "http://[garbage]/g0", as an older registration may have stored: compared as written
        return "", url.strip(), None, "", ""
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port == _DEFAULT_PORTS.get(scheme):
        port = None
    return scheme, _host(hostname), port, _path(parts.path), parts.query


def _host(host: str) -> str:
    folded = _fold(host)
    if folded in _LOOPBACK:
        return _LOOPBACK[folded]
    try:
        address = ipaddress.ip_address(folded)
    except ValueError:
        return _shorthand(folded)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _local(str(address.ipv4_mapped))
    return _local(str(address))


def _fold(host: str) -> str:
    """What a client connects to: fullwidth digits and letters and ideographic dots folded, a name
    IDNA-encoded, as yarl and httpx do before resolving."""
    host = unicodedata.normalize("NFKC", host).translate(_DOTS).lower().rstrip(".")
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _shorthand(host: str) -> str:
    """An IPv4 address as a resolver reads it ("127.1", "2130706433"), as a dotted quad; else ``host``."""
    if not _IPV4_SHORTHAND.fullmatch(host):
        return host
    try:
        return _local(socket.inet_ntoa(socket.inet_aton(host)))
    except OSError:
        return host


def _local(address: str) -> str:
    """The unspecified address: a connection to it goes to the local host (Linux)."""
    return _LOOPBACK.get(address, address)


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


def shown_url(url: str) -> str:
    """A GPU's URL as listings and logs show it: a password in it (``user:password@``) masked, as
    DATABASE_URL's is. ``gpuq gpu list``, ``GET /gpus`` and the dashboard showed it in clear (an outside
    trial)."""
    return scrubbed(url, url)


def scrubbed(text: str, url: str) -> str:
    """``text`` (an error, a message, the URL itself) with ``url``'s credentials masked wherever it repeats
    them: aiohttp puts the whole URL in some of its errors, which land in a GPU's last_error (an outside
    review). A URL that no longer parses (stored before today's checks) leaves ``text`` as it is."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return text
    user, at, _ = parts.netloc.rpartition("@")
    if not at:
        return text
    # a name alone (https://TOKEN@host/) is sent as Basic auth too: it is as secret as a password
    masked = f"{user.partition(':')[0]}:***@" if parts.password is not None else "***@"
    text = text.replace(f"{user}@", masked)
    if parts.password and len(parts.password) >= 4:  # standing alone (a short one would mask common words)
        text = text.replace(parts.password, "***")
    return text
