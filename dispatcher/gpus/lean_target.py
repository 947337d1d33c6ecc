"""Which URLs the lean client (``lean_http.py``) takes, and the head of a job's POST to one, per URL.

Anything unusual (https, credentials in the URL, a non-ASCII path, a header value with a line break, port 0)
is left to aiohttp, which quotes, encodes or refuses it with an error of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Target:
    """Where a POST goes: the connection key and the request's head up to its Content-Length."""

    host: str
    port: int
    head: bytes


def target(url: str, headers: dict[str, str]) -> Target | None:
    """The lean client's target for ``url``, or None where aiohttp must send it (https, credentials in the
    URL, anything unusual)."""
    try:
        parts = urlsplit(url)
        port = 80 if parts.port is None else parts.port
    except ValueError:
        return None
    host = parts.hostname
    if (
        parts.scheme != "http"
        or not host
        or not port
        or "@" in parts.netloc
        or any(c <= " " or c == "\x7f" for c in url)  # controls and spaces: aiohttp quotes them
    ):
        return None
    if any(c in value for value in headers.values() for c in "\r\n\0"):  # a token read with its newline
        return None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", "User-Agent: gpuq", "Accept: */*"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    try:
        head = ("\r\n".join(lines) + "\r\n").encode("ascii")
    except UnicodeEncodeError:  # a non-ASCII path: aiohttp quotes it
        return None
    return Target(host, port, head)
