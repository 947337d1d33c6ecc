"""How many jobs/s one simulator process sustains: ``python -m simgpu.loadtest``.

The simulator runs as its own process (``python -m simgpu``, service time 0). This process plays the
dispatcher: ``--concurrency`` workers each POST a job, wait for its callback (received here by an aiohttp
server on the same loop), and send the next. Reported: completed jobs/s, and the CPU each process spent per
job (from /proc), which says what the simulator costs a benchmark that shares the machine with it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from simgpu.testing import poll_until
from simgpu.threaded import new_event_loop


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Driver:
    def __init__(self, urls: list[str], concurrency: int, sync: bool) -> None:
        self.urls = urls
        self.concurrency = concurrency
        self.sync = sync
        self.done = 0
        self.errors = 0
        self.callback_url = ""
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._stop = False

    async def receive(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        future = self._waiting.pop(body["task_id"], None)
        if future is not None and not future.done():
            future.set_result(None)
        answer = {"task_id": body["task_id"], "state": body["status"], "applied": True}
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def worker(self, session: aiohttp.ClientSession, index: int) -> None:
        loop = asyncio.get_running_loop()
        url = self.urls[index % len(self.urls)]
        n = 0
        while not self._stop:
            n += 1
            task_id = f"w{index}-{n}"
            body = {"task_id": task_id, "type": "load", "data": {}, "attempt": 1}
            if not self.sync:
                body |= {"callback_url": self.callback_url, "callback_token": task_id}
                future = self._waiting[task_id] = loop.create_future()
            async with session.post(url, data=orjson.dumps(body), headers=HEADERS) as answer:
                await answer.read()
                ok = answer.status == (200 if self.sync else 202)
            if not ok:
                self.errors += 1
                self._waiting.pop(task_id, None)
                continue
            if not self.sync:
                await future
            self.done += 1

    async def run(self, warmup: float, seconds: float, sim_pid: int) -> dict[str, Any]:
        app = web.Application()
        app.router.add_post("/callback", self.receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.callback_url = f"http://127.0.0.1:{runner.addresses[0][1]}/callback"
        connector = aiohttp.TCPConnector(limit=self.concurrency * 2, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            workers = [asyncio.create_task(self.worker(session, i)) for i in range(self.concurrency)]
            await asyncio.sleep(warmup)
            done0, sim0, own0, t0 = self.done, cpu_seconds(sim_pid), time.process_time(), time.monotonic()
            await asyncio.sleep(seconds)
            done1, sim1, own1, t1 = self.done, cpu_seconds(sim_pid), time.process_time(), time.monotonic()
            self._stop = True
            for future in self._waiting.values():
                future.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        await runner.cleanup()
        jobs = done1 - done0
        return {
            "mode": "sync" if self.sync else "async",
            "concurrency": self.concurrency,
            "jobs": jobs,
            "jobs_per_s": round(jobs / (t1 - t0)),
            "sim_cpu_us_per_job": round((sim1 - sim0) / jobs * 1e6) if jobs else None,
            "sim_cpu_util": round((sim1 - sim0) / (t1 - t0), 2),
            "driver_cpu_us_per_job": round((own1 - own0) / jobs * 1e6) if jobs else None,
            "errors": self.errors,
        }


HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer load"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simgpu.loadtest", description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--gpus", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--mode", choices=["async", "sync"], default="async")
    args = p.parse_args(argv)
    slots = math.ceil(args.concurrency / args.gpus)
    with tempfile.TemporaryDirectory() as tmp:
        endpoints_file = Path(tmp) / "endpoints"
        command = [sys.executable, "-m", "simgpu", "--port", "0", "--log-level", "WARNING", "--token", "load"]
        command += ["--gpus", str(args.gpus), "--slots", str(slots), "--mode", args.mode]
        sim = subprocess.Popen([*command, "--endpoints-file", str(endpoints_file)])  # noqa: S603 (our own module)
        try:
            poll_until(endpoints_file.exists, timeout=15, what="simulator start")
            urls = [item.split("=", 1)[1] for item in endpoints_file.read_text().strip().split(",")]
            driver = Driver(urls, args.concurrency, args.mode == "sync")
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                result = runner.run(driver.run(args.warmup, args.seconds, sim.pid))
        finally:
            sim.terminate()
            sim.wait(10)
    print(orjson.dumps(result).decode())
    return 0 if result["jobs"] and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
