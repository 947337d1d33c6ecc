"""Request bodies and headers as the dispatcher sends them (SPEC §4)."""

from __future__ import annotations

from typing import Any

from simgpu import CallbackReceiver

TOKEN = "gpu-token"


def job(task_id: str, receiver: CallbackReceiver | None = None, **extra: Any) -> dict[str, Any]:
    """A request body as the dispatcher sends it (SPEC §4)."""
    body: dict[str, Any] = {"task_id": task_id, "type": "embed", "data": {"text": task_id}, "attempt": 1}
    if receiver is not None:
        body |= {"callback_url": receiver.url, "callback_token": f"cb-{task_id}"}
    return body | extra


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
