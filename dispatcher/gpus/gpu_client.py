"""Talking to GPU services, and the reading of their answers (SPEC §4).

A job's POST to a plain ``http://`` URL goes through ``lean_http`` (a keep-alive protocol on httptools, a
quarter of aiohttp's CPU per POST); everything else through one shared aiohttp session. aiohttp rather than
httpx because measured on this hardware an httpx.AsyncClient POST costs 5-9 ms of CPU at 32 in flight
against ~0.2 ms for aiohttp.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson

from dispatcher import fds
from dispatcher.gpus.lean_http import ConnectFailed, ConnectTimeout, LeanPool, NoAnswer
from dispatcher.gpus.lean_target import Target
from dispatcher.gpus.same_service import scrubbed


class Verdict(StrEnum):
    ACCEPTED = "accepted"  # 2xx: the slot stays busy until the callback
    FINISHED = "finished"  # 2xx with {"status": "finished"}: a synchronous service
    FAILED = "failed"  # final: 400/413/422 (about the job), or {"status": "failed"}
    REFUSED = "refused"  # other 4xx, 501: about the GPU (URL, token, method); the job waits again
    RETRY = "retry"  # the attempt failed: 5xx, 408, 429, connection refused; free the slot, try again
    NOT_SENT = "not_sent"  # this process could not send it (out of file descriptors): waits again, no attempt
    UNKNOWN = "unknown"  # sent but no answer (timeout, dropped connection): the lease decides


@dataclass(frozen=True, slots=True)
class Answer:
    verdict: Verdict
    status: int | None = None
    error: str | None = None
    result: Any = None
    unhealthy: bool = False  # counts towards taking the GPU out of rotation


#: Errors of this process's own (short of file descriptors; ESHUTDOWN: its lean pool closed at a stop): not
#: the GPU's fault, so they never count towards taking it out of rotation.
_OUR_LIMITS = frozenset({errno.EMFILE, errno.ENFILE, errno.ESHUTDOWN})
#: Same-origin 307/308 redirects followed for one job's POST.
_REDIRECTS = 3
#: A GPU answers a cancel once the job has stopped; one that takes longer is asked again later.
_CANCEL_TIMEOUT = aiohttp.ClientTimeout(total=15)


class GpuClient:
    def __init__(
        self,
        *,
        bearer_token: str,
        connect_timeout: float,
        request_timeout: float,
        max_answer_bytes: int = 8 * 1024 * 1024,
        lean: bool = True,
    ) -> None:
        self.max_answer_bytes = max_answer_bytes
        self._lean_wanted = lean  # False: every POST through aiohttp (a benchmark's comparison)
        self._lean: LeanPool | None = None
        self._connect_timeout, self._request_timeout = connect_timeout, request_timeout
        self._headers = {"Content-Type": "application/json"}
        if bearer_token:
            self._headers["Authorization"] = f"Bearer {bearer_token}"
        # sock_connect, not connect: a wait for a free connection of the pool (its limit, ``fds.outbound``) is
        # no failure of the GPU, and must not take it out of rotation.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=request_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        limit = fds.outbound(fds.soft_limit())
        # Each pool has the whole share: a fleet's job URLs are http or https, so one of them carries the
        # load (aiohttp's otherwise only cancels and probes). A mixed fleet at full load can pass the share;
        # a POST that finds no descriptor then waits again (NOT_SENT), it does not fail.
        if self._lean_wanted:
            self._lean = LeanPool(
                limit=limit, connect_timeout=self._connect_timeout, read_timeout=self._request_timeout
            )
        connector = aiohttp.TCPConnector(
            limit=limit, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=60
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, json_serialize=lambda o: orjson.dumps(o).decode()
        )

    async def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
            self._lean = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, url: str, body: dict[str, Any]) -> Answer:  # noqa: PLR0911 - one per verdict
        assert self._session is not None, "GpuClient.start() first"
        try:
            payload = orjson.dumps(body)
        except TypeError as exc:  # the job itself (a lone surrogate, a 65-bit integer): no GPU can take it
            return Answer(Verdict.FAILED, error=f"the job cannot be sent as JSON: {exc}")
        to = self._lean.target(url, self._headers) if self._lean is not None else None
        if to is not None:
            return await self._send_lean(url, to, payload)
        try:
            # Redirects are followed here, not by aiohttp: it turns a 301/302/303 POST into a GET without the
            # body, whose 200 was taken as "accepted" while no GPU had the job (an outside trial: the task
            # waited out its lease three times). 307/308 keep the POST and its body (a framework's slash
            # redirect, /infer -> /infer/): followed within the URL's origin, which the bearer token is for.
            # Anything else is about the URL: refused, the GPU out of rotation (``_judge``).
            status: int | None = None
            for _ in range(_REDIRECTS + 1):
                async with self._session.post(
                    url, data=payload, headers=self._headers, allow_redirects=False
                ) as resp:
                    target = _same_origin_target(url, resp.status, resp.headers.get("Location"))
                    if target is None:
                        return await self._answer(resp)
                    status = resp.status
                url = target
            return Answer(Verdict.REFUSED, status, error=f"more than {_REDIRECTS} redirects", unhealthy=True)
        except aiohttp.ConnectionTimeoutError as exc:
            return Answer(Verdict.RETRY, error=f"connect timeout: {exc}", unhealthy=True)
        # before ClientError, which it also is: a URL aiohttp will not request (10.0.5, an invisible
        # character in the host) was taken as sent without an answer, and left to the lease (a review)
        except (aiohttp.InvalidURL, ValueError) as exc:
            return _unsendable(url, exc)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return _failed(exc, url)

    async def _send_lean(self, url: str, to: Target, payload: bytes) -> Answer:  # noqa: PLR0911 - one per verdict
        """``send`` through the lean client: the same redirects, cap and verdicts as through aiohttp."""
        assert self._lean is not None
        try:
            status: int | None = None
            for _ in range(_REDIRECTS + 1):
                reply = await self._lean.post(to, payload, self.max_answer_bytes)
                target = _same_origin_target(url, reply.status, reply.location)
                following = self._lean.target(target, self._headers) if target is not None else None
                if target is None or following is None:
                    return self._verdict(reply.status, reply.body, reply.whole, reply.location)
                status, url, to = reply.status, target, following
            return Answer(Verdict.REFUSED, status, error=f"more than {_REDIRECTS} redirects", unhealthy=True)
        except ConnectTimeout as exc:
            return Answer(Verdict.RETRY, error=f"connect timeout: {exc}", unhealthy=True)
        except ConnectFailed as exc:
            if exc.os_error.errno in _OUR_LIMITS:
                return Answer(Verdict.NOT_SENT, error=f"not sent: {exc}", unhealthy=False)
            return Answer(Verdict.RETRY, error=f"connection failed: {exc}", unhealthy=True)
        except (NoAnswer, OSError) as exc:
            return Answer(Verdict.UNKNOWN, error=f"no answer: {exc}", unhealthy=True)
        except ValueError as exc:
            return _unsendable(url, exc)

    def _verdict(self, status: int, body: bytes, whole: bool, location: str | None) -> Answer:
        """Either client's answer judged; one cut at the cap fails the attempt when it is a 2xx (a result that
        cannot be taken: retrying would only spend the GPU on it again)."""
        if not whole and 200 <= status < 300:
            return Answer(
                Verdict.FAILED,
                status,
                error=f"the GPU's answer is larger than GPU_ANSWER_MAX_BYTES ({self.max_answer_bytes} bytes);"
                " not taken",
            )
        return _judge(status, body.decode(errors="replace"), location)

    async def _answer(self, resp: aiohttp.ClientResponse) -> Answer:
        data, whole = await self._read_capped(resp)
        return self._verdict(resp.status, data, whole, resp.headers.get("Location"))

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        """(the answer, True) read to its end (``content.read(n)`` returns what happens to be buffered,
        which cut large synchronous results short), or (its first bytes, False) once it passes the cap:
        by its Content-Length at once, else as the bytes arrive."""
        limit = self.max_answer_bytes
        if resp.content_length is not None and resp.content_length > limit:
            return b"", False
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            chunks.append(chunk)
            if size > limit:
                return b"".join(chunks)[:limit], False
        return b"".join(chunks), True

    async def cancel(self, url: str, body: dict[str, Any]) -> tuple[bool, str]:
        """Ask a GPU to stop an attempt (SPEC §4); True only on a 2xx, which says it no longer runs it."""
        assert self._session is not None, "GpuClient.start() first"
        try:
            async with self._session.post(
                url,
                data=orjson.dumps(body),
                headers=self._headers,
                timeout=_CANCEL_TIMEOUT,
                allow_redirects=False,
            ) as r:
                text = (await r.content.read(2000)).decode(errors="replace")
                return 200 <= r.status < 300, f"cancel answered {r.status}: {text[:200]}"
        # Anything: a cancel that raised is one not confirmed, asked again later. A ValueError (a cancel
        # URL whose host cannot be encoded) escaped here and killed the cancel task (an outside trial).
        except Exception as exc:
            return False, f"cancel failed: {_why(url, exc)}"

    async def probe(self, url: str) -> tuple[bool, str]:
        """Is the service up again? See ``probe_ok`` for what an answer to a GET of its URL means."""
        assert self._session is not None
        try:
            async with self._session.get(  # a GET may follow redirects: it changes nothing
                url, headers=self._headers, timeout=aiohttp.ClientTimeout(total=5)
            ) as r:
                return probe_ok(r.status), f"probe answered {r.status}"
        # Anything: a probe that raised says the service is not back. An outside trial's GPU URL with
        # a password in it (aiohttp's ValueError beside the bearer token) escaped here and stopped
        # the dispatcher, on every restart.
        except Exception as exc:
            return False, f"probe failed: {_why(url, exc)}"


def _why(url: str, exc: Exception) -> str:
    """What went wrong, with the fix when it is the URL's credentials beside BEARER_TOKEN."""
    if isinstance(exc, ValueError) and "AUTHORIZATION" in str(exc) and urlsplit(url).username is not None:
        return (
            "the URL carries credentials (user:password@) and BEARER_TOKEN is set, and a request has one"
            " Authorization header: register the URL without them, or unset BEARER_TOKEN"
        )
    return scrubbed(f"{type(exc).__name__}: {exc}", url)


def _unsendable(url: str, exc: ValueError) -> Answer:
    """A request that cannot even be made (a host name with an empty label, a header aiohttp refuses, a
    password in the URL beside BEARER_TOKEN): nothing was sent, and it is the GPU's registration that is
    wrong, not the job. Refused: the job waits again without using an attempt, the GPU counts a failure
    (SPEC §4); it used to fail the attempt, so a GPU mistyped in one place spent the backlog's attempts."""
    return Answer(Verdict.REFUSED, error=f"not sent: {_why(url, exc)}", unhealthy=True)


def _failed(exc: Exception, url: str) -> Answer:
    """What a request that raised ``exc`` (no HTTP answer) means for its attempt."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(cause, OSError) and cause.errno in _OUR_LIMITS:
        # Never sent: this process's limit, neither the GPU's fault nor the job's.
        return Answer(Verdict.NOT_SENT, error=scrubbed(f"not sent: {exc}", url), unhealthy=False)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Answer(Verdict.RETRY, error=scrubbed(f"connection failed: {exc}", url), unhealthy=True)
    # The request may have reached the GPU: only its callback or the lease can tell.
    return Answer(
        Verdict.UNKNOWN, error=scrubbed(f"no answer: {type(exc).__name__}: {exc}", url), unhealthy=True
    )


#: Answers that are about the job itself: retrying it cannot help.
JOB_REFUSALS = frozenset({400, 413, 422})


def probe_ok(status: int) -> bool:
    """A GET of a GPU's URL (redirects followed): the service is there unless it answered 5xx, or 401/403/404
    (a wrong path or token). 405 counts as there: a POST-only route answers GET that way."""
    return status < 500 and status not in (401, 403, 404)


def answer_error(status: int, text: str) -> str:
    """``GPU answered 404: Not Found``: the body's ``detail`` (FastAPI) or its text, without repeating the
    status that aiohttp and others put in front ("404: Not Found")."""
    reply = _json_object(text)
    detail = reply.get("detail") if reply else None
    body = (detail if isinstance(detail, str) else text).strip()[:500]
    for prefix in (f"{status}:", f"{status} "):
        if body.startswith(prefix):
            body = body[len(prefix) :].strip()
    return f"GPU answered {status}: {body}" if body else f"GPU answered {status}"


def _judge(status: int, text: str, location: str | None = None) -> Answer:
    if 200 <= status < 300:
        reply = _json_object(text)
        reported = reply.get("status") if reply else None
        if reported == "finished":
            return Answer(Verdict.FINISHED, status, result=reply.get("result") if reply else None)
        if reported == "failed":
            error = str((reply or {}).get("error") or "the GPU service reported failure")
            verdict = Verdict.RETRY if (reply or {}).get("retry") is True else Verdict.FAILED
            return Answer(verdict, status, error=error)
        return Answer(Verdict.ACCEPTED, status)
    # A redirect is about the URL: refused below, the GPU out of rotation.
    error = _redirected(status, location) if 300 <= status < 400 else answer_error(status, text)
    if status in JOB_REFUSALS:
        return Answer(Verdict.FAILED, status, error=error)
    if status in (408, 429) or (status >= 500 and status != 501):
        return Answer(Verdict.RETRY, status, error=error, unhealthy=status >= 500)
    return Answer(Verdict.REFUSED, status, error=error, unhealthy=True)


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text else None
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _same_origin_target(url: str, status: int, location: str | None) -> str | None:
    """Where a 307/308 answer sends the POST, when that is within ``url``'s origin; None otherwise."""
    if status not in (307, 308) or not location:
        return None
    try:
        target = urljoin(url, location)
        a, b = urlsplit(url), urlsplit(target)
    except (
        ValueError
    ):  # "http://[::1": not followed, refused as any other (a retest: it raised, the lease decided)
        return None
    return target if (a.scheme, a.netloc) == (b.scheme, b.netloc) else None


def _redirected(status: int, location: str | None) -> str:
    where = f" to {location[:200]}" if location else ""
    why = (
        "the job's POST would arrive as a GET without its body"
        if status in (301, 302, 303)
        else "not followed to another origin, or with no Location"
    )
    return f"GPU answered {status}, a redirect{where}: {why}; register the URL it points to"
