"""A look at ``CALLBACK_URL`` once the dispatcher serves: does it reach a gpuq ``/callback``? In an outside
trial ``CALLBACK_URL=http://host:port/calback`` (a typo) started cleanly; every GPU's callback was answered
404, and each job waited out its lease (15 minutes by default) and failed, with nothing in the log but
"lease expired". Only a log line: the URL may well be unreachable from the dispatcher's own host (a load
balancer only the GPUs' network reaches), so nothing is refused."""

from __future__ import annotations

import asyncio
import logging

import httpx

log = logging.getLogger("gpuq.dispatcher")

#: The header that marks the look: ``/callback`` answers it 401 as any callback without a token, but does not
#: count it among refused callbacks (metric, log) (``CallbackFastPath``).
SELF_CHECK = "x-gpuq-callback-check"
#: What gpuq's 401 to a callback with no token says (``dispatcher/http/callback.py``).
_OURS = b"callback token"
#: A proxy's answers while nothing behind it serves yet (uvicorn binds only after the dispatcher's start):
#: looked at again, as an unreachable URL is.
_NOT_YET = frozenset({502, 503, 504})


async def check_callback_url(url: str, *, tries: int = 20, pause: float = 0.5) -> str:
    """POST an empty callback with no token to ``url``, retrying while nothing listens (the server is still
    starting); logs and returns the verdict: "ok", "wrong" or "unreachable"."""
    error = ""
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        for _ in range(tries):
            try:
                answer = await client.post(url, content=b"{}", headers={SELF_CHECK: "1"})
            except (httpx.InvalidURL, ValueError) as exc:  # a port typo ("h:80OO") the settings let by
                log.error(
                    f"CALLBACK_URL {url} is not a URL a GPU can call ({exc}): every job would wait out its"
                    " lease (TASK_TIMEOUT_SECONDS) and fail",
                    extra={"action": "callback_check", "url": url, "error": str(exc)},
                )
                return "wrong"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(pause)
                continue
            if answer.status_code in _NOT_YET:  # a proxy whose dispatchers are (re)starting, this one too
                error = f"answered {answer.status_code}"
                await asyncio.sleep(pause)
                continue
            if answer.status_code == 401 and _OURS in answer.content:
                log.info(
                    "CALLBACK_URL reaches a gpuq /callback", extra={"action": "callback_check", "url": url}
                )
                return "ok"
            log.error(
                f"CALLBACK_URL {url} answered {answer.status_code}, not as a gpuq /callback does: GPUs'"
                " callbacks sent there will not reach a dispatcher, and every job will wait out its lease"
                " (TASK_TIMEOUT_SECONDS) and fail; check its path (the route is /callback)",
                extra={"action": "callback_check", "url": url, "status": answer.status_code},
            )
            return "wrong"
    log.info(
        "CALLBACK_URL is not reachable from this host, or nothing serves behind it yet (fine if only the"
        " GPUs' network reaches it)",
        extra={"action": "callback_check", "url": url, "error": error},
    )
    return "unreachable"
