"""GPU_ENDPOINTS and the names and URLs a GPU may have: what a dispatcher's start, ``gpuq gpu add`` and
``gpuq gpu set`` accept alike (one parser), and why a name or URL is refused."""

from __future__ import annotations

import ipaddress
import unicodedata
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from dispatcher.gpus.pull import PULL_SCHEME, is_pull, pull_url
from dispatcher.gpus.same_service import same_service, scrubbed, shown_url
from producer.settings import split_list

DEFAULT_POOL = "default"


@dataclass(frozen=True, slots=True)
class GpuEndpoint:
    gpu_id: str
    url: str
    pool: str = DEFAULT_POOL

    @property
    def pull(self) -> bool:
        """A pull GPU (``pull:g7``): its agent fetches jobs (SPEC §9)."""
        return is_pull(self.url)


def parse_gpu_endpoints(raw: str) -> list[GpuEndpoint]:
    """``g0=http://h:1/p,transcribe:g4=http://…,embed:pull:g7`` -> endpoints; the error names the bad
    item. ``[pool:]pull:NAME`` is a pull GPU: no URL, its agent polls (SPEC §9)."""
    endpoints: list[GpuEndpoint] = []
    for item in split_list(raw):
        name, sep, url = item.partition("=")
        pool, colon, gpu_id = name.rpartition(":")
        if not colon:
            pool, gpu_id = DEFAULT_POOL, name
        gpu_id, pool, url = gpu_id.strip(), pool.strip(), url.strip()
        pull = not sep and (pool == PULL_SCHEME[:-1] or pool.endswith(":" + PULL_SCHEME[:-1]))
        if pull:
            pool = pool.rpartition(":")[0].strip() if ":" in pool else DEFAULT_POOL
        shown = scrubbed(item, url)  # a refusal repeats the item: never its password (an outside review)
        if (not sep and not pull) or not gpu_id or not pool:
            raise ValueError(f"{shown!r} is not [pool:]NAME=URL or [pool:]pull:NAME")
        _check_names(shown, gpu_id, pool)
        if any(e.gpu_id == gpu_id for e in endpoints):
            raise ValueError(f"GPU {gpu_id!r} is listed twice")
        if pull:
            endpoints.append(GpuEndpoint(gpu_id=gpu_id, url=pull_url(gpu_id), pool=pool))
            continue
        # "g0=URL;g1=URL" must not become one GPU g0 whose URL is "URL;g1=URL"
        if "=http" in url or any(c in url for c in "; \t"):
            raise ValueError(f"{shown!r}: one GPU per item, items separated by commas: g0=URL,g1=URL")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or not _port_ok(parts):
            raise ValueError(f"{shown!r}: {shown_url(url)!r} is not an http(s) URL")
        if problem := _host_problem(parts.hostname):
            raise ValueError(f"{shown!r}: {problem}")
        if twin := next((e.gpu_id for e in endpoints if e.pool == pool and same_service(e.url, url)), None):
            raise ValueError(url_taken(gpu_id, twin, url))
        endpoints.append(GpuEndpoint(gpu_id=gpu_id, url=url, pool=pool))
    return endpoints


#: Not in a GPU or pool name: what GPU_ENDPOINTS cannot hold (``,`` ``=``) or a shell, a log line or a
#: Prometheus label would need to escape. ``gpuq gpu add`` took a name with quotes, a backslash and a newline
#: that no GPU_ENDPOINTS could name (an outside trial).
_NOT_IN_NAMES = frozenset(",=\"'\\`")
#: Not in a new GPU's name either: a pull GPU's agent polls ``/agents/{name}/jobs`` (SPEC §9), where ``/``
#: makes two path segments (404 however it is escaped), ``?`` and ``#`` end the path and ``%`` starts an
#: escape. ``gpuq gpu add a/b --pull`` printed a token that no agent could ever use (an outside trial).
#: Pools are never in a URL and keep these.
NOT_IN_GPU_NAMES = frozenset("/?#%")


def name_problem(kind: str, value: str, *, colon: bool = True, in_url: bool = False) -> str | None:
    """Why ``value`` cannot be a GPU name or a pool (``kind``), or None. ``colon`` False: a GPU name given
    alone (the CLI's), where a colon would make the part before it a pool. ``in_url``: a GPU name being
    registered, which an agent's URL must hold as one path segment (``NOT_IN_GPU_NAMES``); False where a name
    may be one registered before that rule, and must still be taken (GPU_ENDPOINTS: ``register_new`` asks)."""
    bad = sorted({c for c in value if c in _NOT_IN_NAMES or c.isspace() or not c.isprintable()})
    if not colon and ":" in value:
        bad.append(":")
    if in_url:
        bad += sorted({c for c in value if c in NOT_IN_GPU_NAMES})
    if not value or bad:
        shown = " ".join(repr(c) for c in bad) or "nothing"
        allowed = "letters, digits and . _ - @ / + :" if kind == "pool" else "letters, digits and . _ - @ +"
        why = " (a pull GPU's agent polls /agents/NAME/jobs)" if set(bad) & NOT_IN_GPU_NAMES else ""
        return f"{kind} {value!r}: not a name ({shown}); use {allowed}{why}"
    return None


def _check_names(item: str, gpu_id: str, pool: str) -> None:
    if len(gpu_id) > 64 or len(pool) > 64:
        raise ValueError(f"{item!r}: GPU and pool names are at most 64 characters")
    for kind, value in (("GPU name", gpu_id), ("pool", pool)):
        if problem := name_problem(kind, value):
            raise ValueError(problem)


def url_taken(gpu_id: str, other: str, url: str) -> str:
    """Why a GPU cannot have ``url`` in its pool: ``other`` of the same pool has it. (In two pools one
    service may serve both, its slots split between the two names.)"""
    return (
        f"GPU {gpu_id}: {shown_url(url)} is GPU {other}'s URL in the same pool; one service under two names"
        f" there gets the jobs of both (more than its slots). Give {other} more slots instead (gpuq gpu set"
        f" {other} --slots N), or remove {other} first (gpuq gpu remove {other}) if {gpu_id} is its new name"
    )


def _host_problem(host: str) -> str | None:
    """A host no client can look up: an empty label (``gpu-host..internal``, a typo), one over 63
    characters. It parsed, and every request, probe and cancel to it raised (an outside trial: the probe's
    UnicodeError stopped the dispatcher)."""
    if ":" in host:  # an IPv6 address
        return None
    if invisible := [c for c in host if unicodedata.category(c) in ("Cf", "Cc", "Zs")]:
        # a soft hyphen or zero-width joiner pasted in: the URL reads right and aiohttp refuses it
        return f"host {host!r} is not a host name (invisible characters: {', '.join(map(ascii, invisible))})"
    if all(c.isdigit() or c == "." for c in host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:  # 10.0.5, 256.1.1.1: read as an address by some clients, refused by aiohttp
            return f"host {host!r} is not an IPv4 address (four numbers 0-255, as 10.0.0.5)"
        return None
    try:
        host.encode("idna")
    except UnicodeError as exc:
        return f"host {host!r} is not a host name ({exc})"
    return None


def _port_ok(parts: SplitResult) -> bool:
    """``http://h:91OO/g0`` (a typo) parses, but every request to it fails as a client error, using up the
    jobs' attempts: refuse it at start like any other malformed URL."""
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError:
        return False
    return True
