"""``SimFleet``: a simulated GPU fleet served from a background thread, for tests and benchmarks.

with SimFleet(gpus=2, service_time="fixed:0.1", token="secret") as fleet:
    env = {"GPU_ENDPOINTS": fleet.gpu_endpoints(), "BEARER_TOKEN": "secret"}
    ...                                              # run the dispatcher against it
    fleet.configure(gpu="g1", faults=["down"])       # g1 dies mid-run
    stats = fleet.wait_until(lambda s: s["totals"]["received"] >= 10)
    assert stats["totals"]["oversubscriptions"] == 0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from simgpu.config import SimConfig
from simgpu.server import SimServer
from simgpu.testing import poll_until
from simgpu.threaded import ThreadedService


class SimFleet(ThreadedService):
    def __init__(self, config: SimConfig | None = None, **options: Any) -> None:
        """``options`` are SimConfig fields; behaviour settings may be given in their textual form."""
        super().__init__()
        self.config = SimConfig.from_options(config, **options)
        self._server: SimServer | None = None
        self._urls: dict[str, str] = {}
        self.control_url = ""

    async def _startup(self) -> None:
        server = SimServer(self.config)
        await server.start()
        self._server = server
        self._urls = server.urls
        self.control_url = server.control_url

    async def _shutdown(self) -> None:
        if self._server is not None:
            await self._server.stop()

    @property
    def server(self) -> SimServer:
        if self._server is None:
            raise RuntimeError("SimFleet is not started")
        return self._server

    @property
    def urls(self) -> dict[str, str]:
        """GPU name -> the URL the dispatcher POSTs jobs to."""
        return dict(self._urls)

    def url(self, gpu: str) -> str:
        return self._urls[gpu]

    def gpu_endpoints(self) -> str:
        """The dispatcher's ``GPU_ENDPOINTS`` value: ``g0=http://...,g1=http://...``."""
        return ",".join(f"{name}={url}" for name, url in self._urls.items())

    def configure(self, gpu: str | list[str] | None = None, **changes: Any) -> dict[str, Any]:
        """Change slots, service_time, mode, faults (all GPUs, or ``gpu``) or token; returns the config."""
        if gpu is not None:
            changes["gpu"] = gpu
        server = self.server
        return self.run(server.configure(changes))

    def stats(self, *, jobs: bool = True) -> dict[str, Any]:
        server = self.server
        return self.call(lambda: server.stats(jobs=jobs))

    def reset(self, *, config: bool = False) -> None:
        server = self.server
        self.run(server.reset(config=config))

    def wait_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0, *, jobs: bool = False
    ) -> dict[str, Any]:
        """Poll the stats until ``predicate(stats)`` holds; those stats, or TimeoutError naming the last."""
        last: dict[str, Any] = {}

        def check() -> dict[str, Any] | None:
            nonlocal last
            last = self.stats(jobs=jobs)
            return last if predicate(last) else None

        return poll_until(check, timeout, what=lambda: f"fleet stats; last totals: {last.get('totals')}")
