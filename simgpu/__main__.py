"""``python -m simgpu`` / ``gpuq-simgpu``: serve a simulated GPU fleet until SIGTERM or SIGINT.

python -m simgpu --gpus 4 --port 9100 --service-time exp:0.1 --token "$BEARER_TOKEN"
# GPU i at http://127.0.0.1:9100/g{i}; faults at start: --fault http_500@0.05 --fault g2=down
python -m simgpu --pull http://dispatcher:8000 --agent g7="$TOKEN7" --agent g8="$TOKEN8"
# pull GPUs g7, g8 (gpuq gpu add g7 --pull): their agents poll the dispatcher (simgpu/agent.py)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from simgpu.config import MODES, ConfigError, Fault, SimConfig, parse_faults
from simgpu.server import SimServer
from simgpu.threaded import new_event_loop

log = logging.getLogger("simgpu")

# Attributes every LogRecord has; anything else on a record came in through `extra=` and is logged as a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpuq-simgpu", description="Serve simulated GPU inference services.")
    p.add_argument("--gpus", type=int, default=4, help="number of simulated GPUs (default 4)")
    p.add_argument("--slots", type=int, default=4, help="slots per GPU (default 4)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--port", type=int, default=9100, help="GPUs at /g0, /g1, ... and /_control, /_stats (0: any)"
    )
    p.add_argument(
        "--gpu-ports",
        type=int,
        metavar="BASE",
        help="one port per GPU: GPU i on BASE+i (0: any); --port keeps control",
    )
    p.add_argument(
        "--service-time",
        default="0",
        metavar="DIST",
        help="0 | fixed:S | uniform:A,B | exp:MEAN | lognormal:MU,SIGMA",
    )
    p.add_argument(
        "--mode", choices=MODES, default="async", help="async: 202 then callback; sync: result in the answer"
    )
    p.add_argument(
        "--token",
        default=os.environ.get("BEARER_TOKEN") or None,
        help="bearer token GPU requests must carry (default $BEARER_TOKEN; none: no check)",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="[GPU=]NAME[:S][@P]",
        help="repeatable: http_500 http_400 http_429 hang close slow_answer:S lost_callback "
        "duplicate_callback fail fail_retry heartbeat:S down; @P a probability; GPU= for one GPU only",
    )
    p.add_argument(
        "--pull",
        metavar="URL",
        help="run the GPUs as pull agents polling this dispatcher (its base URL) instead of listening",
    )
    p.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="NAME=TOKEN",
        help="with --pull, repeatable: a pull GPU's name and agent token (default: $SIMGPU_AGENTS, "
        "NAME=TOKEN,...)",
    )
    p.add_argument("--seed", type=int, help="seed of the GPUs' RNGs (service times, faults)")
    p.add_argument(
        "--callback-tries", type=int, default=8, help="tries per callback on errors and 5xx (default 8)"
    )
    p.add_argument("--callback-timeout", type=float, default=5.0, help="seconds per callback try (default 5)")
    p.add_argument(
        "--cold-callbacks",
        action="store_true",
        help="open callback connections only as needed (default: one per slot at the first job)",
    )
    p.add_argument("--endpoints-file", type=Path, help="write the GPU_ENDPOINTS value here once listening")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    everywhere: list[Fault] = []
    per_gpu: dict[str, list[Fault]] = {}
    for spec in args.fault:
        gpu, eq, fault = spec.rpartition("=")
        (per_gpu.setdefault(gpu, []) if eq else everywhere).extend(parse_faults([fault]))
    agents: dict[str, str] = {}
    for spec in args.agent or [a for a in os.environ.get("SIMGPU_AGENTS", "").split(",") if a.strip()]:
        name, eq, token = spec.strip().partition("=")
        if not eq or not name or not token:
            raise ConfigError(f"--agent {spec!r}: expected NAME=TOKEN")
        agents[name] = token
    if agents and args.pull is None:
        raise ConfigError("--agent needs --pull URL")
    return SimConfig.from_options(
        gpus=len(agents) if args.pull else args.gpus,
        pull=args.pull,
        agents=agents,
        host=args.host,
        port=args.port,
        gpu_ports=args.gpu_ports,
        token=args.token,
        seed=args.seed,
        slots=args.slots,
        service_time=args.service_time,
        mode=args.mode,
        faults=everywhere,
        gpu_faults=per_gpu,
        callback_tries=args.callback_tries,
        callback_timeout=args.callback_timeout,
        warm_callbacks=not args.cold_callbacks,
    )


def write_atomically(path: Path, text: str) -> None:
    """Readers polling for the file never see it half written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    Path(tmp).replace(path)


async def serve(config: SimConfig, endpoints_file: Path | None) -> int:
    server = SimServer(config)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc, extra={"action": "start_failed"})
        return 1
    # A full collection walked every object of aiohttp and the fleet (~30 ms, twice per 10 s benchmark run),
    # holding back every request and callback of the fleet at once: noise in what the benchmark measures of
    # the dispatcher (and of Celery). Started, those objects live as long as the process: frozen out of it.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if endpoints_file is not None:
        write_atomically(endpoints_file, server.gpu_endpoints())
    await stop.wait()
    log.info("stopping", extra={"action": "stopping"})
    await server.stop()
    log.info("stopped", extra={"action": "stopped", "totals": server.stats(jobs=False)["totals"]})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=args.log_level, handlers=[handler], force=True)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"gpuq-simgpu: error: {exc}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(serve(config, args.endpoints_file))


if __name__ == "__main__":
    sys.exit(main())
