"""Issue 7 features reuse the dispatcher scenarios' ``stack`` (real dispatcher processes, simulated fleets,
MariaDB and Redis) and the operators' in-process ``gpuq`` runner."""

from __future__ import annotations

from tests.dispatcher.conftest import stack  # noqa: F401 - the fixture, shared
from tests.operators.conftest import gpuq, gpuq_env  # noqa: F401 - the fixtures, shared
