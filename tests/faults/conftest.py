"""The fault, property, fuzz, soak and security tests reuse the dispatcher scenarios' ``stack`` fixture:
real ``python -m dispatcher`` processes, a simulated fleet, a private MariaDB database and Redis prefix."""

from __future__ import annotations

from tests.dispatcher.conftest import Stack, stack

__all__ = ["Stack", "stack"]
