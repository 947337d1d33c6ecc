"""Helpers the producer tests import (fixtures live in conftest.py)."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

EVENTS = Path(__file__).resolve().parent.parent / "events"


@cache
def _recorded(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text())
    return loaded


def load_event(name: str) -> dict[str, Any]:
    """A recorded event (tests/events/<name>.json), a fresh copy each caller may edit."""
    return copy.deepcopy(_recorded(name))


def api_body(answer: dict[str, Any]) -> Any:
    """The JSON body of an API Gateway answer."""
    return json.loads(answer["body"])
