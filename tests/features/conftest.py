"""Issue 7 features reuse the dispatcher scenarios' ``stack`` (real dispatcher processes, simulated fleets,
MariaDB and Redis), the operators' in-process ``gpuq`` runner and the reference embedding service."""

from __future__ import annotations

from tests.dispatcher.conftest import stack  # noqa: F401 - the fixture, shared
from tests.operators.conftest import gpuq, gpuq_env  # noqa: F401 - the fixtures, shared
from tests.reference.conftest import service  # noqa: F401 - the reference MiniLM service, one per module
