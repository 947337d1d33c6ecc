"""Issue 7 features reuse the dispatcher scenarios' ``stack`` (real dispatcher processes, simulated fleets,
MariaDB and Redis)."""

from __future__ import annotations

from tests.dispatcher.conftest import stack  # noqa: F401 - the fixture, shared
