"""The callback pre-check (dispatcher/http/callback.py ``precheck``) decides on a forged callback before its body
is parsed; it used to run its task-id regex over the whole body, 8 MiB of regex work per forged request.
Now it looks at a bounded number of bytes whatever the body's size. Counted, not timed: the regex is
replaced by a spy that adds up the bytes it is given."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from dispatcher.gpus.tokens import make_token
from dispatcher.http import callback
from dispatcher.metrics import Metrics
from tests.dispatcher.harness import SECRET

#: The most bytes the pre-check may look at, whatever the body (two windows of 256 KiB, one at each end).
BOUND = 512 * 1024


class Spy:
    """Stands in for the task-id regex; counts the bytes it is asked to scan."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.scanned = 0

    def finditer(self, data: Any) -> Any:
        self.scanned += len(data)
        return self.pattern.finditer(data)


class NoParse:
    def validate_json(self, raw: bytes) -> Any:
        raise AssertionError("parsed")


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    s = Spy(callback._TASK_ID)
    monkeypatch.setattr(callback, "_TASK_ID", s)
    monkeypatch.setattr(callback, "_ADAPTER", NoParse())
    return s


def _handle(raw: bytes, authorization: str | None) -> tuple[int, dict[str, Any]]:
    d: Any = SimpleNamespace(settings=SimpleNamespace(secret=SECRET.encode()), metrics=Metrics())
    status, body, _ = asyncio.run(callback.handle(d, raw, authorization))
    return status, body


def _body(*, before: int, after: int, task_id: str = "victim") -> bytes:
    """A callback of about ``before + after`` bytes with its task_id between a result and an error."""
    return orjson.dumps(
        {"status": "failed", "result": ["x" * 64] * (before // 67), "task_id": task_id, "error": "e" * after}
    )


def test_a_forged_8_mib_callback_costs_a_bounded_scan(spy: Spy) -> None:
    forged = f"Bearer {make_token(b'not-the-secret-0123456789', 'victim', 1)}"
    for raw in (
        _body(before=0, after=8_000_000),  # its task_id first
        _body(before=8_000_000, after=0),  # its task_id last
        _body(before=4_000_000, after=4_000_000),  # its task_id in the middle
        b'{"status": "finished", "result": "' + b"x" * 8_000_000 + b'"}',  # no task_id at all
    ):
        assert len(raw) > 7_900_000
        spy.scanned = 0
        status, body = _handle(raw, forged)
        # THEN refused unparsed: 401 (a task id found, the token not its own) or 422 (none where looked)
        assert status in (401, 422), body
        assert spy.scanned <= BOUND, spy.scanned
    # AND with no token, or one not shaped like ours, nothing is scanned at all
    spy.scanned = 0
    for authorization in (None, "Bearer nope", "Basic abc"):
        assert _handle(_body(before=0, after=8_000_000), authorization)[0] == 401
    assert spy.scanned == 0


def test_a_real_8_mib_callback_is_still_parsed_when_its_task_id_is_first_or_last(spy: Spy) -> None:
    good = f"Bearer {make_token(SECRET.encode(), 'victim', 1)}"
    for raw in (_body(before=0, after=8_000_000), _body(before=8_000_000, after=0)):
        with pytest.raises(AssertionError, match="parsed"):
            _handle(raw, good)
    # AND one whose task_id hides 4 MB deep is told where to put it, unparsed
    status, body = _handle(_body(before=4_000_000, after=4_000_000), good)
    assert status == 422 and "task_id" in body["detail"] and "KiB" in body["detail"], body
