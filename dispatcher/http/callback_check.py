"""A look at ``CALLBACK_URL`` once the dispatcher serves: does it reach a gpuq ``/callback`` that takes this
dispatcher's tokens? In an outside trial ``CALLBACK_URL=http://host:port/calback`` (a typo) started cleanly;
every GPU's callback was answered 404, and each job waited out its lease (15 minutes by default) and failed,
with nothing in the log but "lease expired". In another, a dispatcher behind a load balancer with another
CALLBACK_SECRET than the one answering was told the URL was fine: every callback was answered 401, and every
job ran again after its lease. The look carries a token of this dispatcher's secret. Only a log line: the URL
may well be unreachable from the dispatcher's own host (a load balancer only the GPUs' network reaches), so
nothing is refused."""

from __future__ import annotations

import asyncio
import logging

import httpx

from dispatcher.gpus.tokens import make_token

log = logging.getLogger("gpuq.dispatcher")

#: The header that marks the look: ``/callback`` answers it 401 as any callback without a token, but does not
#: count it among refused callbacks (metric, log) (``CallbackFastPath``).
SELF_CHECK = "x-gpuq-callback-check"
#: What gpuq's 401 to a callback with no token says (``dispatcher/http/callback.py``).
_OURS = b"callback token"
#: The task the look's token is made for (no task is asked about: ``CallbackFastPath`` answers the look
#: itself), and what it answers when the token is good.
CHECK_TASK = "gpuq:callback-check"
CHECK_OK = "token accepted"
#: A proxy's answers while nothing behind it serves yet (uvicorn binds only after the dispatcher's start):
#: looked at again, as an unreachable URL is.
_NOT_YET = frozenset({502, 503, 504})


async def check_callback_url(url: str, secret: bytes, *, tries: int = 20, pause: float = 0.5) -> str:
    """POST an empty callback with a token of ``secret`` to ``url``, retrying while nothing listens (the
    server is still starting); logs and returns the verdict: "ok", "secret" (a gpuq that refuses our tokens),
    "wrong" or "unreachable"."""
    error = ""
    headers = {SELF_CHECK: "1", "Authorization": f"Bearer {make_token(secret, CHECK_TASK, 1)}"}
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        for _ in range(tries):
            try:
                answer = await client.post(url, content=b"{}", headers=headers)
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
            if answer.status_code == 200 and CHECK_OK.encode() in answer.content:
                log.info(
                    "CALLBACK_URL reaches a gpuq /callback", extra={"action": "callback_check", "url": url}
                )
                return "ok"
            if answer.status_code == 401 and _OURS in answer.content:
                log.error(
                    f"CALLBACK_URL {url} reaches a gpuq /callback that refuses this dispatcher's tokens: its"
                    " CALLBACK_SECRET is not this one's (or it is a gpuq too old to say). Every callback of a"
                    " job sent from here would be answered 401, and the job would run again after its lease"
                    " (TASK_TIMEOUT_SECONDS): give every dispatcher behind that URL the same CALLBACK_SECRET",
                    extra={"action": "callback_check", "url": url, "status": 401},
                )
                return "secret"
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
