"""Changing the fleet at run time and reading its counters: ``/_control``, ``/_stats``, ``/_reset``.

``POST /_control`` takes ``{"gpu"?: NAME | [NAME...], "slots"?, "service_time"?, "mode"?, "faults"?,
"token"?}``. Without ``gpu`` a change applies to every GPU; with it, to those named. A setting replaces the
one before it (``"faults": []`` clears the faults). Everything is checked before anything changes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from simgpu.callbacks import CallbackClient
from simgpu.config import ConfigError, SimConfig
from simgpu.gpu import GpuSim
from simgpu.jobs import Job, json_object

log = logging.getLogger("simgpu")

SUMMED = ("received", "in_flight", "oversubscriptions", "callbacks_pending")
COUNTED = ("answers", "callbacks_sent", "callbacks_answered", "cancels")


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(message: str) -> web.Response:
    return json_response({"error": message}, 400)


class ControlMixin:
    config: SimConfig
    token: str | None
    gpus: dict[str, GpuSim]
    jobs: list[Job]
    callbacks: CallbackClient

    async def _apply_down(self) -> None:
        raise NotImplementedError

    async def configure(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        changes = dict(changes)
        target = changes.pop("gpu", None)
        names = self._targets(target)
        token_given = "token" in changes
        token = changes.pop("token", None)
        if token_given and target is not None:
            raise ConfigError("token is fleet-wide: it cannot be set for one GPU")
        if token is not None and not isinstance(token, str):
            raise ConfigError(f"token: expected a string or null, got {token!r}")
        updated = {name: self.gpus[name].behaviour.updated(changes) for name in names}
        if token_given:
            self.token = token
        for name, behaviour in updated.items():
            self.gpus[name].behaviour = behaviour
        await self._apply_down()
        log.info("configured", extra={"action": "configure", "gpus": names, "changes": changes})
        return self.describe()

    def _targets(self, target: object) -> list[str]:
        if target is None:
            return list(self.gpus)
        names = [target] if isinstance(target, str) else target
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ConfigError(f"gpu: expected a GPU name or a list of names, got {target!r}")
        unknown = [name for name in names if name not in self.gpus]
        if unknown:
            raise ConfigError(f"gpu: unknown GPU(s) {unknown}; GPUs are {list(self.gpus)}")
        return names

    def describe(self) -> dict[str, Any]:
        return {
            "token_required": self.token is not None,
            "gpus": {name: {"url": gpu.url, **gpu.behaviour.describe()} for name, gpu in self.gpus.items()},
        }

    def stats(self, *, jobs: bool = True) -> dict[str, Any]:
        gpus = {name: gpu.snapshot() for name, gpu in self.gpus.items()}
        totals: dict[str, Any] = {key: sum(g[key] for g in gpus.values()) for key in SUMMED}
        for key in COUNTED:
            total: dict[str, int] = {}
            for g in gpus.values():
                for label, count in g[key].items():
                    total[label] = total.get(label, 0) + count
            totals[key] = total
        totals["callback_retries"] = self.callbacks.retries
        totals["overlaps"] = sorted((o for g in gpus.values() for o in g["overlaps"]), key=lambda o: o["at"])
        result: dict[str, Any] = {"gpus": gpus, "totals": totals}
        if jobs:
            result["jobs"] = [job.record() for job in self.jobs]
        return result

    async def reset(self, *, config: bool = False) -> None:
        """Zero the counters and empty the job log; ``config``: also restore the start configuration."""
        for name, gpu in self.gpus.items():
            gpu.reset()
            if config:
                gpu.behaviour = self.config.gpu_behaviour(name)
        if config:
            self.token = self.config.token
            await self._apply_down()
        self.jobs.clear()
        self.callbacks.retries = 0

    async def handle_control(self, request: web.Request) -> web.Response:
        try:
            changes = await _json_object(request)
            return json_response(await self.configure(changes))
        except ConfigError as exc:
            return _error(str(exc))

    async def handle_describe(self, request: web.Request) -> web.Response:
        return json_response(self.describe())

    async def handle_stats(self, request: web.Request) -> web.Response:
        return json_response(self.stats(jobs=request.query.get("jobs", "1") not in ("0", "false")))

    async def handle_reset(self, request: web.Request) -> web.Response:
        try:
            body = await _json_object(request)
        except ConfigError as exc:
            return _error(str(exc))
        await self.reset(config=bool(body.get("config")))
        return json_response({"reset": True})


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    return json_object(raw, ConfigError) if raw.strip() else {}
